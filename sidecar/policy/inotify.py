"""Linux inotify on the event loop (asyncinotify): the policy watcher's changes with no thread.

watchfiles (and anyio, which its async API runs on) cost an idle sidecar 2.8 MiB of
RSS and two threads, to watch a few directories that change once a day. asyncinotify
reads inotify's descriptor on the loop itself; what it leaves to us is the glue:
watching whole trees (it watches one directory per call) and grouping a burst of
events into one change. asyncinotify is installed on Linux only: elsewhere importing
this module raises ImportError and the watcher uses watchfiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncGenerator

from asyncinotify import Inotify, Mask

# Every change to a file or to a directory's entries (a ConfigMap's `..data` symlink
# is renamed into place: MOVED_TO); reads and opens are not changes.
MASK = (
    Mask.MODIFY
    | Mask.ATTRIB
    | Mask.CLOSE_WRITE
    | Mask.MOVED_FROM
    | Mask.MOVED_TO
    | Mask.CREATE
    | Mask.DELETE
    | Mask.DELETE_SELF
    | Mask.MOVE_SELF
)


async def changes(
    paths: list[str], *, debounce_ms: int, step_ms: int, stop: asyncio.Event
) -> AsyncGenerator[set[str], None]:
    """Yield an empty set once the watches are in place, then each burst of changes.

    A burst ends when `step_ms` pass with no new change, or `debounce_ms` after it
    began (watchfiles' step and debounce). Ends when `stop` is set. Raises OSError
    before the first yield where inotify cannot be had (its instance limit reached).
    """
    loop = asyncio.get_running_loop()
    pending: set[str] = set()
    arrived = asyncio.Event()
    with Inotify() as notify:
        for path in paths:
            _watch_tree(notify, path)
        reader = asyncio.create_task(_read(notify, pending, arrived))
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
                burst = set(pending)
                pending.clear()
                yield burst
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader


async def _read(notify: Inotify, pending: set[str], arrived: asyncio.Event) -> None:
    """Add each changed path to `pending`; new directories are watched from now."""
    async for event in notify:
        if Mask.Q_OVERFLOW in event.mask:
            pending.add("")  # events were lost: something changed
        elif Mask.IGNORED in event.mask or event.path is None:
            continue  # a watch ended (its DELETE_SELF was the change), or is gone
        else:
            pending.add(str(event.path))
            if Mask.ISDIR in event.mask and event.mask & (Mask.CREATE | Mask.MOVED_TO):
                _watch_tree(notify, str(event.path))
        arrived.set()


def _watch_tree(notify: Inotify, top: str) -> None:
    """Watch `top` and every directory under it (not through symlinks), as it is now.

    A directory that cannot be read or is gone by now is skipped, as watchfiles'
    ignore_permission_denied did.
    """
    for path, _dirs, _files in os.walk(top, onerror=lambda _exc: None):
        with contextlib.suppress(OSError):
            notify.add_watch(path, MASK)


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
