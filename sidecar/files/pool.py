"""The threads file I/O runs on, so it never blocks the event loop.

Every open, read, write, fsync, rename and listing of the files service runs
here, a chunk at a time. A file descriptor used from these threads is `Held`:
it is closed only once the last operation started on it has returned, even
when the call that started it was cancelled meanwhile (an agent hanging up
mid-download), so a descriptor number is never closed under a running read,
nor reused by another file while one still points at it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

log = logging.getLogger("sidecar.files")

T = TypeVar("T")

# I/O-bound work: a few threads are enough, and the machine's cores are the agents'.
_WORKERS = 4
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def pool() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        with _pool_lock:
            if _pool is None:
                _pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=_WORKERS, thread_name_prefix="sidecar-files"
                )
    return _pool


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


async def run(fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` on the pool, awaited."""
    return await asyncio.wrap_future(pool().submit(fn, *args))


async def run_owned(fn: Callable[..., C], *args: Any) -> C:
    """`fn(*args)` on the pool, where what it returns holds descriptors: if the caller is
    cancelled before it returns, what it returns is closed when it does."""
    future = pool().submit(fn, *args)
    try:
        return await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.add_done_callback(_close_result)
        raise


def _close_result(future: concurrent.futures.Future[Any]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    try:
        future.result().close()
    except Exception:
        log.exception("closing a file after a cancelled call failed")


class Held:
    """Descriptors used from the pool: `close()` releases them once nothing runs on them."""

    def __init__(self) -> None:
        self._pending: concurrent.futures.Future[Any] | None = None
        self._closed = False

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        future = pool().submit(fn, *args)
        self._pending = future
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        """Safe to call more than once, from the loop or a pool thread."""
        if self._closed:
            return
        self._closed = True
        pending = self._pending
        if pending is not None and not pending.done():
            # Runs on the pool thread as soon as the running operation returns.
            pending.add_done_callback(lambda _: self._release_logged())
        else:
            # Even a close (an unlink, for an upload given up) is file I/O: not on the loop.
            pool().submit(self._release_logged)

    def _release_logged(self) -> None:
        try:
            self.release()
        except Exception:
            log.exception("releasing a file of the files service failed")

    def release(self) -> None:
        """Close the descriptors (and undo what is left undone); blocking, short."""
        raise NotImplementedError
