"""One SQLite file, one writer thread: what the webhook queue and the budget ledger share.

The thread owns the connection, so the event loop never waits on the disk: it
awaits a future the thread resolves after the commit. The thread commits
whatever jobs queued up meanwhile in one transaction (group commit), so a burst
costs one fsync per batch, not per job.

Imported only by the stores that use it, so a sidecar without them never loads sqlite3.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

# Jobs committed together at most: bounds the latency one batch adds to the next.
_BATCH = 512


@dataclass(slots=True)
class _Job:
    work: Callable[[sqlite3.Connection], Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _settle_all(settled: list[tuple[Any, ...]]) -> None:
    for future, result, error in settled:
        _settle(future, result, error)


class SqliteWriter:
    """Runs jobs `(connection) -> result` on its own thread, one commit per batch.

    `setup` runs once on the new connection (schema, cleanup at open). A failed
    open sets `open_error` (`opened` is set either way), is logged to `log` when
    given, and fails every job with "<what> <path> could not be opened".
    """

    def __init__(
        self,
        path: Path,
        *,
        thread_name: str,
        what: str,
        setup: Callable[[sqlite3.Connection], None],
        log: logging.Logger | None = None,
    ) -> None:
        self.path = path
        self._what = what
        self._setup = setup
        self._log = log
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.opened = threading.Event()
        self.open_error: BaseException | None = None
        # `thread`, not `_thread`: compiled, mypyc names a field after its attribute with
        # one more underscore, and `__thread` is a C keyword.
        self.thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self.thread.start()

    def submit(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """A future resolved on the running loop once `work`'s transaction committed."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._jobs.put(_Job(work, future, loop))
        return future

    def stop(self) -> None:
        # The thread drains what is queued before it stops: no job is dropped.
        self._jobs.put(None)

    def join(self) -> None:
        self.thread.join()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL, not NORMAL: in WAL mode NORMAL already survives kill -9 (a commit's
        # WAL frames are in the OS before COMMIT returns), but not a power cut or
        # a kernel crash, and what was acknowledged must not be forgotten.
        # Group commit pays the fsync once per batch.
        conn.execute("PRAGMA synchronous=FULL")
        # Statement journals (a multi-row INSERT inside a job's savepoint) and the
        # ephemeral tables of `FROM (VALUES ...)` in memory: by default SQLite backs
        # them with a temp file, created, unlinked and closed again in most batches
        # (a third of the writer's time per event). Nothing durable lives there: a
        # statement journal only undoes a statement of the open transaction.
        conn.execute("PRAGMA temp_store=MEMORY")
        self._setup(conn)
        return conn

    def _run(self) -> None:
        try:
            conn: sqlite3.Connection | None = self._connect()
        except BaseException as exc:  # reported to every job, and logged once
            self.open_error = exc
            if self._log is not None:
                self._log.error("cannot open %s %s: %s", self._what, self.path, exc)
            conn = None
        self.opened.set()
        try:
            self._serve(conn)
        finally:
            if conn is not None:
                conn.close()

    def _serve(self, conn: sqlite3.Connection | None) -> None:
        while True:
            first = self._jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < _BATCH:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            self._run_batch(conn, batch)
            if stop:
                return

    def _run_batch(self, conn: sqlite3.Connection | None, batch: list[_Job]) -> None:
        outcomes: list[tuple[Any, BaseException | None]] = []
        try:
            if conn is None:
                raise OSError(f"{self._what} {self.path} could not be opened")
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                # A savepoint per job: one failing job leaves the others' work intact.
                conn.execute("SAVEPOINT job")
                try:
                    outcomes.append((job.work(conn), None))
                    conn.execute("RELEASE job")
                except Exception as exc:
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    outcomes.append((None, exc))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            outcomes = [(None, exc)] * len(batch)
        # Only now, after COMMIT: nobody hears of a write before it is on disk.
        # One wake-up per loop for the whole batch, not one per job.
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[Any, ...]]] = {}
        for job, (result, error) in zip(batch, outcomes, strict=True):
            per_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, settled in per_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle_all, settled)
