"""The files service: GET, HEAD, PUT and DELETE on the files beneath a root.

It is the innermost handler of a service with `files:` (in place of the
upstream, http/router.py), so identity, allow rules, rate limits, metrics,
spans and the access log apply to it as to any service. It answers for
itself like a mock does, with a `Reply` whose body is read from disk a chunk
at a time on the files pool (pool.py): nothing here blocks the event loop,
and no file is ever held in memory whole.

Paths are opened beneath the root name by name (paths.py). An upload is
written to a temporary file next to its target, fsynced, renamed over it (or
hard-linked, for If-None-Match: *, so a file made meanwhile is never
replaced), and the directory fsynced: a reader sees the old file or the new
one, never half of one, and a crash leaves no torn file.
"""

from __future__ import annotations

import contextlib
import json
import mimetypes
import os
import secrets
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator
from datetime import UTC, datetime
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from ..core.call import Call, Reply
from ..core.headers import SERVER
from ..core.problems import ProblemError
from ..core.reasons import Reason
from ..core.state import StateBuild
from ..policy.files import Files
from ..policy.loaded import ServicePolicy
from ..steps.operation import annotate
from . import conditions, paths
from .paths import Beneath, FilePath, Kind
from .pool import Held, run, run_owned

# Read and write sizes: large enough that the thread hop is a small part of each.
CHUNK: Final = 256 * 1024
ALLOWED: Final = "GET, HEAD, PUT, DELETE"
_READ_ALLOWED: Final = "GET, HEAD"
# How long a measured quota usage is trusted before the directory is walked again;
# in between, this sidecar's own writes keep it current.
USAGE_TTL: Final = 10.0

_JSON: Final = "application/json"


class FileReply:
    """A file (or a listing) as an answer; its descriptor is closed by the end of the
    body, or by `release()` when the body is never read (HEAD, a refusal upstream of it)."""

    __slots__ = ("_file", "body", "content_length", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str],
        *,
        body: AsyncIterable[bytes] | None = None,
        content_length: int | None = None,
        file: Held | None = None,
    ) -> None:
        self.status = status
        self.reason: str | None = None
        headers.setdefault("Server", SERVER)
        self.headers = CIMultiDictProxy(headers)
        self.body = body
        self.content_length = content_length
        self._file = file

    def release(self) -> None:
        if self._file is not None:
            self._file.close()


class OpenFile(Held):
    def __init__(self, fd: int, st: os.stat_result) -> None:
        super().__init__()
        self.fd = fd
        self.stat = st

    def release(self) -> None:
        os.close(self.fd)


async def _read(file: OpenFile, start: int, length: int) -> AsyncIterator[bytes]:
    try:
        offset, left = start, length
        while left > 0:
            data = await file.run(os.pread, file.fd, min(CHUNK, left), offset)
            if not data:
                return  # shrank meanwhile: the listener cuts the answer short, honestly
            offset += len(data)
            left -= len(data)
            yield data
    finally:
        file.close()


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


class Upload(Held):
    """A PUT in progress: the directory it goes to (a descriptor it owns), its temporary
    file, what it replaces."""

    def __init__(self, directory: int, name: str, old: os.stat_result | None):
        super().__init__()
        self.directory = directory
        self.name = name
        self.old = old
        self.temp = f"{paths.TEMP_PREFIX}{secrets.token_hex(8)}.tmp"
        self.fd: int | None = os.open(
            self.temp,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o644,
            dir_fd=directory,
        )
        self.done = False

    def write(self, data: bytes) -> None:
        assert self.fd is not None
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]

    def release(self) -> None:
        try:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
            if not self.done:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.temp, dir_fd=self.directory)
        finally:
            os.close(self.directory)


class Usage:
    """Bytes each agent's directory holds, for `quota`: measured on disk (at most every
    USAGE_TTL seconds), kept current by this sidecar's own writes, plus what uploads in
    flight have written so far (`reserved`, touched on the loop only)."""

    def __init__(self, quota: int) -> None:
        self.quota = quota
        # `used` and `measured` change on the pool with the service's commit lock held.
        self.used: dict[str, int] = {}
        self.measured: dict[str, float] = {}
        self.reserved: dict[str, int] = {}

    def measure(self, agent: str, base: int | None) -> int:
        """The agent's usage (blocking: on the pool, commit lock held)."""
        now = time.monotonic()
        if now - self.measured.get(agent, -USAGE_TTL - 1) <= USAGE_TTL and agent in self.used:
            return self.used[agent]
        total = 0
        if base is not None:
            for _, _, files, fd in os.fwalk(".", dir_fd=base, follow_symlinks=False):
                for name in files:
                    if name.startswith(paths.TEMP_PREFIX):
                        continue  # an upload in flight: counted in `reserved`
                    try:
                        st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if paths.kind(st.st_mode) == Kind.FILE:
                        total += st.st_size
        self.used[agent] = total
        self.measured[agent] = now
        return total

    def add(self, agent: str, delta: int) -> None:
        self.used[agent] = self.used.get(agent, 0) + delta


class FilesState:
    """What outlives a reload of the same `files:` settings: the lock that orders the
    last step of each write, and the quota usage."""

    def __init__(self, config: Files) -> None:
        self.commit = threading.Lock()
        self.usage = Usage(config.quota) if config.quota is not None else None


class FilesService:
    """The handler that answers a files service's calls (in place of an upstream)."""

    def __init__(self, *, service: str, config: Files, state: FilesState) -> None:
        self.service = service
        self.config = config
        self.root = config.root
        self.state = state
        self.extensions = tuple(config.extensions) if config.extensions is not None else None

    async def __call__(self, call: Call) -> Reply:
        method = call.method
        path = paths.parse(call.target)
        agent = paths.agent_dir(call.agent) if self.config.per_agent else None
        if method == "GET" or method == "HEAD":
            if path.directory:
                annotate(call, {"sidecar.files.operation": "list"})
                return await self._list(path, agent)
            self._check_extension(path)
            annotate(call, {"sidecar.files.operation": "read"})
            return await self._get(call, path, agent)
        if method == "PUT" or method == "DELETE":
            if self.config.read_only:
                raise ProblemError(
                    Reason.forbidden,
                    f"Service '{self.service}' is read-only: it answers GET and HEAD only.",
                    service=self.service,
                    headers={"Allow": _READ_ALLOWED},
                )
            if path.directory or not path.parts:
                raise ProblemError(
                    Reason.bad_request,
                    f"{method} names a file: write its path without a trailing '/'.",
                    service=self.service,
                )
            self._check_extension(path)
            if method == "PUT":
                annotate(call, {"sidecar.files.operation": "write"})
                return await self._put(call, path, agent)
            annotate(call, {"sidecar.files.operation": "delete"})
            return await self._delete(call, path, agent)
        raise ProblemError(
            Reason.method_not_allowed,
            f"Service '{self.service}' serves files: use GET or HEAD to read (a path ending "
            "in '/' lists a directory), PUT to write, DELETE to remove.",
            service=self.service,
            headers={"Allow": _READ_ALLOWED if self.config.read_only else ALLOWED},
        )

    def _check_extension(self, path: FilePath) -> None:
        allowed = self.extensions
        if allowed is None or path.name.lower().endswith(allowed):
            return
        raise ProblemError(
            Reason.forbidden,
            f"Service '{self.service}' serves only files ending in {', '.join(allowed)}; "
            f"{path.shown!r} is not one.",
            service=self.service,
        )

    # -- reading ------------------------------------------------------------------------

    def _open(self, path: FilePath, agent: str | None) -> OpenFile:
        beneath = Beneath(self.root, agent, create=False)
        try:
            directory = beneath.directory(path.parts[:-1])
            if directory is None:
                paths.not_found(path.shown)
            fd, st = paths.open_file(directory, path.name, path.shown)
        finally:
            beneath.close()
        return OpenFile(fd, st)

    async def _get(self, call: Call, path: FilePath, agent: str | None) -> Reply:
        file = await run_owned(self._open, path, agent)
        try:
            st = file.stat
            tag = conditions.etag(st)
            headers: CIMultiDict[str] = CIMultiDict()
            headers["ETag"] = tag
            headers["Last-Modified"] = conditions.last_modified(st)
            headers["Accept-Ranges"] = conditions.RANGE_UNIT
            if_match = call.header("If-Match")
            if if_match is not None and not conditions.matches_strong(if_match, tag):
                raise conditions.precondition_failed(f"{path.shown!r} has changed (If-Match).")
            if_none_match = call.header("If-None-Match")
            if if_none_match is not None and conditions.matches_weak(if_none_match, tag):
                file.close()
                return FileReply(304, headers)
            headers["Content-Type"] = _media_type(path.name)
            headers["X-Content-Type-Options"] = "nosniff"
            # The egress origin is shared by every service: an HTML or SVG file an agent
            # wrote must not run scripts there (they could call other services, with the
            # credentials the sidecar injects), so a browser gets it sandboxed.
            headers["Content-Security-Policy"] = "sandbox; default-src 'none'"
            size = st.st_size
            start, length, status = 0, size, 200
            asked = call.header("Range")
            if_range = call.header("If-Range")
            if asked is not None and (if_range is None or if_range.strip() == tag):
                span = conditions.byte_range(asked, size)
                if span is not None:
                    start, length, status = span[0], span[1] - span[0] + 1, 206
                    headers["Content-Range"] = f"bytes {span[0]}-{span[1]}/{size}"
        except BaseException:
            file.close()
            raise
        annotate(call, {"sidecar.files.bytes": length})
        if call.method == "HEAD" or length == 0:
            file.close()
            return FileReply(status, headers, content_length=length)
        return FileReply(
            status,
            headers,
            body=_read(file, start, length),
            content_length=length,
            file=file,
        )

    def _listing(self, path: FilePath, agent: str | None) -> bytes:
        beneath = Beneath(self.root, agent, create=False)
        entries: list[dict[str, object]] = []
        truncated = False
        try:
            directory = beneath.directory(path.parts)
            if directory is None:
                if path.parts:
                    paths.not_found(path.shown)
                # Else an agent that never wrote anything: an empty listing.
            else:
                entries, truncated = self._entries(directory)
        finally:
            beneath.close()
        entries.sort(key=lambda e: str(e["name"]))
        document = {"path": path.shown, "entries": entries, "truncated": truncated}
        return json.dumps(document, ensure_ascii=False).encode()

    def _entries(self, directory: int) -> tuple[list[dict[str, object]], bool]:
        limit = self.config.list_limit
        allowed = self.extensions
        entries: list[dict[str, object]] = []
        # scandir on a descriptor: each entry's stat is an fstatat beneath it, not followed.
        with os.scandir(directory) as found:
            for item in found:
                name = item.name
                if name.startswith(paths.TEMP_PREFIX) or not _plain(name):
                    continue
                try:
                    st = item.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                what = paths.kind(st.st_mode)
                if what == Kind.FILE:
                    # Only what a GET could read: symlinks, devices, FIFOs, sockets, hard
                    # links and other extensions are not shown.
                    if st.st_nlink > 1 or (
                        allowed is not None and not name.lower().endswith(allowed)
                    ):
                        continue
                elif what != Kind.DIRECTORY:
                    continue
                if len(entries) >= limit:
                    return entries, True
                entry: dict[str, object] = {"name": name, "type": what}
                if what == Kind.FILE:
                    entry["size"] = st.st_size
                entry["mtime"] = (
                    datetime.fromtimestamp(st.st_mtime, UTC)
                    .isoformat(timespec="seconds")
                    .replace("+00:00", "Z")
                )
                entries.append(entry)
        return entries, False

    async def _list(self, path: FilePath, agent: str | None) -> Reply:
        data = await run(self._listing, path, agent)
        headers: CIMultiDict[str] = CIMultiDict()
        headers["Content-Type"] = _JSON
        headers["Cache-Control"] = "no-store"
        return FileReply(200, headers, body=_once(data), content_length=len(data))

    # -- writing ------------------------------------------------------------------------

    def _begin(
        self,
        path: FilePath,
        agent: str | None,
        if_match: str | None,
        if_none_match: str | None,
    ) -> Upload:
        beneath = Beneath(self.root, agent, create=True)
        try:
            directory = beneath.directory(path.parts[:-1], create=True)
            assert directory is not None  # created
            old = _checked(directory, path, if_match, if_none_match)
            usage = self.state.usage
            if usage is not None and agent is not None:
                with self.state.commit:
                    usage.measure(agent, beneath.base)
            # The upload keeps its own directory only, not one descriptor per level of the
            # path, while its body streams.
            owned = os.dup(directory)
            try:
                return Upload(owned, path.name, old)
            except OSError as exc:
                os.close(owned)
                paths.raise_os_error(exc, path.shown)
        finally:
            beneath.close()

    def _commit(
        self,
        upload: Upload,
        path: FilePath,
        agent: str | None,
        if_match: str | None,
        if_none_match: str | None,
    ) -> tuple[bool, os.stat_result]:
        fd = upload.fd
        assert fd is not None
        os.fsync(fd)
        size = os.fstat(fd).st_size
        upload.fd = None
        os.close(fd)
        directory, name, temp = upload.directory, upload.name, upload.temp
        usage = self.state.usage
        with self.state.commit:
            # Again, now: another call may have written or removed the file meanwhile.
            old = _checked(directory, path, if_match, if_none_match)
            grows = size - (old.st_size if old is not None else 0)
            if usage is not None and agent is not None and grows > 0:
                # Again too: the bytes of the file it replaces, credited while it streamed,
                # may have been freed (and spent) by other calls since.
                self._check_quota(usage, agent, grows, committed=True)
            try:
                if if_none_match is not None and if_none_match.strip() == "*":
                    # link(2) never replaces: a file made by anyone since is kept.
                    try:
                        os.link(
                            temp, name, src_dir_fd=directory, dst_dir_fd=directory,
                            follow_symlinks=False,
                        )  # fmt: skip
                    except FileExistsError:
                        raise conditions.precondition_failed(
                            f"{path.shown!r} already exists (If-None-Match: *)."
                        ) from None
                    os.unlink(temp, dir_fd=directory)
                else:
                    os.rename(temp, name, src_dir_fd=directory, dst_dir_fd=directory)
                upload.done = True
                st = os.stat(name, dir_fd=directory, follow_symlinks=False)
            except OSError as exc:
                paths.raise_os_error(exc, path.shown)
            if usage is not None and agent is not None:
                usage.add(agent, st.st_size - (old.st_size if old is not None else 0))
        # The rename itself made durable: the directory's entry, not just the file's data.
        os.fsync(directory)
        return old is None, st

    async def _put(self, call: Call, path: FilePath, agent: str | None) -> Reply:
        max_size = self.config.max_size
        length = call.content_length
        if max_size is not None and length is not None and length > max_size:
            raise self._too_large(length)
        if_match = call.header("If-Match")
        if_none_match = call.header("If-None-Match")
        usage = self.state.usage
        upload = await run_owned(self._begin, path, agent, if_match, if_none_match)
        reserved = 0
        try:
            credit = upload.old.st_size if upload.old is not None else 0
            if usage is not None and agent is not None and length is not None:
                self._check_quota(usage, agent, length - credit)
            written = 0
            buffer = bytearray()
            body = call.body
            source: AsyncIterable[bytes] = (
                _once(body) if isinstance(body, bytes) else body if body is not None else _none()
            )
            async for chunk in source:
                size = len(chunk)
                written += size
                if max_size is not None and written > max_size:
                    raise self._too_large(None)
                if usage is not None and agent is not None:
                    usage.reserved[agent] = usage.reserved.get(agent, 0) + size
                    reserved += size
                    self._check_quota(usage, agent, -credit)
                buffer += chunk
                if len(buffer) >= CHUNK:
                    data, buffer = bytes(buffer), bytearray()
                    await upload.run(upload.write, data)
            if buffer:
                await upload.run(upload.write, bytes(buffer))
            created, st = await upload.run(
                self._commit, upload, path, agent, if_match, if_none_match
            )
        finally:
            if reserved and usage is not None and agent is not None:
                usage.reserved[agent] -= reserved
            upload.close()
        annotate(call, {"sidecar.files.bytes": written})
        headers: CIMultiDict[str] = CIMultiDict()
        headers["ETag"] = conditions.etag(st)
        headers["Last-Modified"] = conditions.last_modified(st)
        if created:
            headers["Content-Type"] = _JSON
            data = json.dumps({"path": path.shown, "size": st.st_size}).encode()
            return FileReply(201, headers, body=_once(data), content_length=len(data))
        return FileReply(204, headers)

    def _check_quota(
        self, usage: Usage, agent: str, extra: int, *, committed: bool = False
    ) -> None:
        """Refused once the agent's usage (with the uploads in flight, unless only what is
        `committed` counts, and `extra`) is over."""
        total = usage.used.get(agent, 0) + extra
        if not committed:
            total += usage.reserved.get(agent, 0)
        if total > usage.quota:
            raise ProblemError(
                Reason.quota_exceeded,
                f"Agent '{agent}' would hold more than its quota of {usage.quota} bytes in "
                f"service '{self.service}'; delete files first.",
                service=self.service,
            )

    def _too_large(self, length: int | None) -> ProblemError:
        most = self.config.max_size
        size = f"The file is {length} bytes" if length is not None else "The file is larger"
        return ProblemError(
            Reason.request_too_large,
            f"{size}; service '{self.service}' accepts files of at most {most} bytes.",
            service=self.service,
        )

    def _remove(
        self, path: FilePath, agent: str | None, if_match: str | None, if_none_match: str | None
    ) -> None:
        beneath = Beneath(self.root, agent, create=False)
        try:
            directory = beneath.directory(path.parts[:-1])
            if directory is None:
                paths.not_found(path.shown)
            with self.state.commit:
                old = _current(directory, path)
                if old is None:
                    paths.not_found(path.shown)
                conditions.check_write(path.shown, conditions.etag(old), if_match, if_none_match)
                try:
                    os.unlink(path.name, dir_fd=directory)
                except OSError as exc:
                    paths.raise_os_error(exc, path.shown)
                usage = self.state.usage
                if usage is not None and agent is not None:
                    usage.add(agent, -old.st_size)
            os.fsync(directory)
        finally:
            beneath.close()

    async def _delete(self, call: Call, path: FilePath, agent: str | None) -> Reply:
        await run(self._remove, path, agent, call.header("If-Match"), call.header("If-None-Match"))
        return FileReply(204, CIMultiDict())


async def _none() -> AsyncIterator[bytes]:
    return
    yield b""  # an async generator that yields nothing


def _checked(
    directory: int, path: FilePath, if_match: str | None, if_none_match: str | None
) -> os.stat_result | None:
    """The file a write would replace (None: none), once its preconditions hold."""
    old = _current(directory, path)
    conditions.check_write(
        path.shown, conditions.etag(old) if old is not None else None, if_match, if_none_match
    )
    return old


def _current(directory: int, path: FilePath) -> os.stat_result | None:
    """The regular file a write would replace, None when there is none; anything else
    there (a directory, a symlink, a device) refuses the write."""
    found = paths.entry(directory, path.name)
    if found is None:
        return None
    what, st = found
    if what == Kind.DIRECTORY:
        paths.bad_request(f"{path.shown!r} is a directory.")
    if what != Kind.FILE:
        paths.refuse_kind(what, path.shown)
    return st


def _plain(name: str) -> bool:
    """A name a call could ask for: UTF-8, no control characters."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False  # not UTF-8 on disk (surrogate-escaped)
    return not any(ord(c) < 32 or ord(c) == 127 for c in name)


def _media_type(name: str) -> str:
    media, encoding = mimetypes.guess_type(name, strict=False)
    if media is None or encoding is not None:
        # A .gz is served as the bytes it is, never as a compressed text.
        return "application/octet-stream"
    if media.startswith("text/") or media == _JSON:
        return f"{media}; charset=utf-8"
    return media


def build(service: ServicePolicy, *, state: StateBuild) -> FilesService:
    config = service.spec.files
    assert config is not None
    # mimetypes reads the system's tables on first use: here, at load, not on a call.
    if not mimetypes.inited:
        mimetypes.init()
    files_state = state.get(
        service.name,
        "files",
        (config.root, config.per_agent, config.quota),
        lambda: FilesState(config),
    )
    return FilesService(service=service.name, config=config, state=files_state)
