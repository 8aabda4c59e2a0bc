"""Where a files call may reach: its path parsed, then opened beneath the root.

Two stages, each enough on its own to keep a call inside `root`:

1. `parse` turns the URL path into names. It refuses what could name another
   place once decoded: '.' and '..' segments (however spelt), encoded or raw
   separators (%2F, %5C, backslash), empty segments (`//etc` is no absolute
   path here), NUL and other control characters. What is left is a list of
   plain names, never a string the kernel would resolve as a whole.
2. `Beneath` opens those names one at a time, each relative to the directory
   opened before it (`openat(2)` via `os.open(..., dir_fd=)`), with O_NOFOLLOW and,
   for directories, O_DIRECTORY. A symbolic link is never followed, wherever it
   is in the path and whenever it appears (one swapped in during a call makes
   that open fail, it is not resolved); the only path resolved as a string is
   `root` itself, which the policy writes. A file that is not a regular file
   (a device, a FIFO, a socket) is never opened: the entry is looked at with
   `fstatat(AT_SYMLINK_NOFOLLOW)` first, and the file opened afterwards is checked
   to be that same regular file (O_NONBLOCK, so a FIFO swapped in between cannot
   block the open). A regular file with more than one hard link is refused: its
   other name may be outside the root, and nothing on the file tells where.

Every function here is blocking and runs in the files pool (service.py).
Refusals are `ProblemError`s whose detail names the path as the agent wrote it,
never the root's place on disk.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass
from typing import Final, NoReturn
from urllib.parse import unquote

from ..core.problems import ProblemError
from ..core.reasons import Reason

MAX_NAME: Final = 255  # bytes, as most file systems allow
MAX_DEPTH: Final = 64
# An upload in progress is written to a file of this name, next to its target: such
# names are never served, listed or written by a call.
TEMP_PREFIX: Final = ".~sidecar-"

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_ENCODED_SEPARATORS: Final = ("%2f", "%5c", "%00")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_AGENT_DIR: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]{0,127}$")


@dataclass(frozen=True, slots=True)
class FilePath:
    """A call's path, beneath the agent's root."""

    parts: tuple[str, ...]  # decoded names; () is the root itself
    directory: bool  # written with a trailing '/': a listing
    shown: str  # as the agent wrote it, decoded: for messages

    @property
    def name(self) -> str:
        return self.parts[-1] if self.parts else ""


def bad_request(detail: str) -> NoReturn:
    raise ProblemError(Reason.bad_request, detail)


def forbidden(detail: str) -> NoReturn:
    raise ProblemError(Reason.forbidden, detail)


def not_found(shown: str) -> NoReturn:
    raise ProblemError(Reason.not_found, f"There is no file or directory at {shown!r}.")


def parse(target: str) -> FilePath:
    """The names of a request target (the path after the service's prefix)."""
    raw = target.partition("?")[0]
    if not raw.startswith("/"):
        raw = "/" + raw
    lower = raw.lower()
    if "\\" in raw or any(s in lower for s in _ENCODED_SEPARATORS):
        bad_request(
            "A name may not hold a backslash, an encoded '/' or '\\' (%2F, %5C) or a NUL: "
            "write each directory as its own path segment."
        )
    directory = raw.endswith("/")
    segments = raw[1:].split("/")
    if directory:
        segments.pop()
    if len(segments) > MAX_DEPTH:
        bad_request(f"The path is more than {MAX_DEPTH} directories deep.")
    parts: list[str] = []
    for segment in segments:
        if not segment:
            bad_request("The path has an empty segment ('//'); every path is relative to the root.")
        try:
            name = unquote(segment, errors="strict")
        except UnicodeDecodeError:
            bad_request("The path is not UTF-8 once percent-decoded.")
        check_name(name)
        parts.append(name)
    shown = "/" + "/".join(parts) + ("/" if directory and parts else "")
    return FilePath(parts=tuple(parts), directory=directory, shown=shown)


def check_name(name: str) -> None:
    if name in (".", ".."):
        bad_request("The path has a '.' or '..' segment; send a normalized path.")
    if "/" in name or "\\" in name:
        bad_request("A name may not hold '/' or '\\'.")
    if _CONTROL.search(name):
        bad_request("A name may not hold a NUL or another control character.")
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME:
        bad_request(f"A name is longer than {MAX_NAME} bytes.")
    if name.startswith(TEMP_PREFIX):
        forbidden(f"Names starting with {TEMP_PREFIX!r} are the sidecar's own uploads.")


def agent_dir(agent: str | None) -> str:
    """The directory name of an agent's own files (per_agent)."""
    if not agent:
        raise ProblemError(
            Reason.unauthenticated,
            "This files service keeps each agent's files apart: name the agent (its "
            "identity header or credential).",
        )
    if not _AGENT_DIR.match(agent):
        forbidden(
            "The agent's name cannot be a directory name: use letters, digits and _ . @ : - "
            "(at most 128), starting with a letter or digit."
        )
    return agent


class Kind:
    FILE: Final = "file"
    DIRECTORY: Final = "directory"
    SYMLINK: Final = "symlink"
    OTHER: Final = "other"  # device, FIFO, socket


def kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return Kind.FILE
    if stat.S_ISDIR(mode):
        return Kind.DIRECTORY
    if stat.S_ISLNK(mode):
        return Kind.SYMLINK
    return Kind.OTHER


def refuse_kind(found: str, shown: str) -> NoReturn:
    if found == Kind.SYMLINK:
        forbidden(
            f"{shown!r} is (or passes through) a symbolic link; the files service never "
            "follows one."
        )
    forbidden(f"{shown!r} is not a regular file (a device, FIFO or socket); it is never opened.")


def _shown(parts: tuple[str, ...] | list[str]) -> str:
    return "/" + "/".join(parts)


class Beneath:
    """Opens names beneath one directory (the root, or an agent's directory in it).

    Owns the file descriptors it opens for directories; `close()` releases them.
    """

    def __init__(self, root: str, agent: str | None, *, create: bool) -> None:
        self._fds: list[int] = []
        try:
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            raise ProblemError(
                Reason.internal_error,
                "The files service's root directory cannot be opened; the sidecar's log "
                "and its operator know more.",
            ) from None
        self._fds.append(fd)
        # None: the agent's directory does not exist yet (nothing written).
        self.base: int | None = fd
        if agent is not None:
            try:
                self.base = self._enter(fd, agent, create=create, shown="/")
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def directory(self, parts: tuple[str, ...], *, create: bool = False) -> int | None:
        """The directory holding `parts` opened, or None when one of them is missing (and
        not created)."""
        fd = self.base
        if fd is None:
            return None
        for i, name in enumerate(parts):
            found = self._enter(fd, name, create=create, shown=_shown(parts[: i + 1]))
            if found is None:
                return None
            fd = found
        return fd

    def _enter(self, fd: int, name: str, *, create: bool, shown: str) -> int | None:
        try:
            sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
        except FileNotFoundError:
            if not create:
                return None
            try:
                os.mkdir(name, 0o755, dir_fd=fd)
            except FileExistsError:
                pass  # made meanwhile by another call: opened below like any other
            except OSError as exc:
                raise_os_error(exc, shown)
            try:
                # O_NOFOLLOW again: a symlink put in its place since the mkdir is refused.
                sub = os.open(name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                self._refuse_entry(fd, name, exc, shown)
        except OSError as exc:
            self._refuse_entry(fd, name, exc, shown)
        self._fds.append(sub)
        return sub

    def _refuse_entry(self, fd: int, name: str, exc: OSError, shown: str) -> NoReturn:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            found = entry(fd, name)
            if found is None:
                not_found(shown)
            if found[0] == Kind.FILE:
                bad_request(f"{shown!r} is a file, not a directory.")
            refuse_kind(found[0], shown)
        raise_os_error(exc, shown)


def entry(fd: int, name: str) -> tuple[str, os.stat_result] | None:
    """What `name` is in the directory `fd`, without following it; None when absent."""
    try:
        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    return kind(st.st_mode), st


def open_file(fd: int, name: str, shown: str) -> tuple[int, os.stat_result]:
    """A regular file beneath `fd`, opened for reading, and its fstat."""
    found = entry(fd, name)
    if found is None:
        not_found(shown)
    what, before = found
    if what == Kind.DIRECTORY:
        bad_request(f"{shown!r} is a directory: GET {shown}/ lists it.")
    if what != Kind.FILE:
        refuse_kind(what, shown)
    refuse_linked(before, shown)
    try:
        file = os.open(name, _FILE_FLAGS, dir_fd=fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            refuse_kind(Kind.SYMLINK, shown)
        raise_os_error(exc, shown)
    try:
        st = os.fstat(file)
        if not stat.S_ISREG(st.st_mode):
            refuse_kind(kind(st.st_mode), shown)
        if (st.st_dev, st.st_ino) != (before.st_dev, before.st_ino):
            # Replaced between the look and the open: refused, not retried.
            forbidden(f"{shown!r} was replaced while it was being opened; try again.")
        refuse_linked(st, shown)
    except BaseException:
        os.close(file)
        raise
    return file, st


def refuse_linked(st: os.stat_result, shown: str) -> None:
    if st.st_nlink > 1:
        forbidden(
            f"{shown!r} has more than one hard link; such a file is never served, as its "
            "other name may be outside the service's root."
        )


def raise_os_error(exc: OSError, shown: str) -> NoReturn:
    """An unexpected OSError as the agent may see it: no path but its own, no strerror
    that could quote the root."""
    code = exc.errno
    if code == errno.ENOENT:
        not_found(shown)
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        forbidden(f"The sidecar may not access {shown!r} on its volume.")
    if code == errno.ENAMETOOLONG:
        bad_request("The path is too long for the volume.")
    if code in (errno.ENOSPC, errno.EDQUOT):
        raise ProblemError(Reason.quota_exceeded, "The volume of this files service is full.")
    if code == errno.EISDIR:
        bad_request(f"{shown!r} is a directory.")
    if code == errno.ENOTDIR:
        not_found(shown)
    raise ProblemError(
        Reason.internal_error,
        f"The sidecar could not access {shown!r} ({errno.errorcode.get(code or 0, 'error')}).",
    )
