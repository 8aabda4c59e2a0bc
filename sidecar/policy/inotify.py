"""Linux inotify on the event loop: the policy watcher's changes with no thread and no library.

watchfiles (and anyio, which its async API runs on) cost an idle sidecar 2.8 MiB of
RSS and two threads, to watch a few directories that change once a day. inotify's
descriptor is read by the loop itself (add_reader); ctypes reaches libc's three calls.
Elsewhere (macOS) `open()` raises OSError and the watcher uses watchfiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import struct
import sys
from collections.abc import AsyncGenerator

_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name
IN_MODIFY = 0x2
IN_ATTRIB = 0x4
IN_CLOSE_WRITE = 0x8
IN_MOVED_FROM = 0x40
IN_MOVED_TO = 0x80
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# Every change to a file or to a directory's entries (a ConfigMap's `..data` symlink
# is renamed into place: IN_MOVED_TO); reads and opens are not changes.
MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
)


class Inotify:
    """One inotify descriptor watching directory trees; `read()` returns what changed."""

    def __init__(self) -> None:
        if not sys.platform.startswith("linux"):
            raise OSError("inotify is Linux's")
        libc = ctypes.CDLL(None, use_errno=True)
        try:
            init, self._add = libc.inotify_init1, libc.inotify_add_watch
        except AttributeError:
            raise OSError("this libc has no inotify") from None
        self._add.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32)
        self.fd: int = init(IN_NONBLOCK | IN_CLOEXEC)
        if self.fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        self._dirs: dict[int, str] = {}

    def add_tree(self, top: str) -> None:
        """Watch `top` and every directory under it (not through symlinks), as it is now.

        A directory that cannot be read or is gone by now is skipped, as watchfiles'
        ignore_permission_denied did.
        """
        for path, _dirs, _files in os.walk(top, onerror=lambda _exc: None):
            wd = self._add(self.fd, os.fsencode(path), MASK)
            if wd >= 0:
                self._dirs[wd] = path

    def read(self) -> set[str]:
        """The paths changed since the last read; new directories are watched from now."""
        changed: set[str] = set()
        while True:
            try:
                data = os.read(self.fd, 64 * 1024)
            except BlockingIOError:
                return changed
            offset = 0
            while offset < len(data):
                wd, mask, _cookie, size = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = os.fsdecode(data[offset : offset + size].rstrip(b"\0"))
                offset += size
                if mask & IN_Q_OVERFLOW:
                    changed.add("")  # events were lost: something changed
                    continue
                directory = self._dirs.get(wd)
                if mask & IN_IGNORED:
                    self._dirs.pop(wd, None)
                    continue
                if directory is None:
                    continue
                path = os.path.join(directory, name) if name else directory
                changed.add(path)
                if mask & IN_ISDIR and mask & (IN_CREATE | IN_MOVED_TO):
                    self.add_tree(path)

    def close(self) -> None:
        os.close(self.fd)


async def changes(
    paths: list[str], *, debounce_ms: int, step_ms: int, stop: asyncio.Event
) -> AsyncGenerator[set[str], None]:
    """Yield an empty set once the watches are in place, then each burst of changes.

    A burst ends when `step_ms` pass with no new change, or `debounce_ms` after it
    began (watchfiles' step and debounce). Ends when `stop` is set. Raises OSError
    before the first yield where there is no inotify.
    """
    notify = Inotify()
    loop = asyncio.get_running_loop()
    pending: set[str] = set()
    arrived = asyncio.Event()

    def readable() -> None:
        pending.update(notify.read())
        if pending:
            arrived.set()

    try:
        for path in paths:
            notify.add_tree(path)
        loop.add_reader(notify.fd, readable)
        try:
            yield set()
            while not stop.is_set():
                await _either(arrived, stop, within=None)
                if stop.is_set():
                    return
                began = loop.time()
                while loop.time() - began < debounce_ms / 1000:
                    arrived.clear()
                    await _either(arrived, stop, within=step_ms / 1000)
                    if not arrived.is_set() or stop.is_set():
                        break
                arrived.clear()
                burst, pending = pending, set()
                yield burst
        finally:
            loop.remove_reader(notify.fd)
    finally:
        notify.close()


async def _either(one: asyncio.Event, other: asyncio.Event, *, within: float | None) -> None:
    """Until one of the events is set, or `within` seconds have passed."""
    waits = [asyncio.ensure_future(one.wait()), asyncio.ensure_future(other.wait())]
    try:
        await asyncio.wait(waits, timeout=within, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await wait
