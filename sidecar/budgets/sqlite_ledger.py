"""The data dir's budget ledger: one SQLite file, one writer thread.

Kept apart from ledger.py so that a policy without budgets never imports
sqlite3 (tests/test_footprint.py checks what the example policies load).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from .ledger import DB_NAME, MAX_KEYS, LedgerDown

log = logging.getLogger("sidecar.budgets")

T = TypeVar("T")

_BATCH = 512
# Rows of windows that ended longer ago than this are deleted when the file opens.
_KEEP_ENDED = 40 * 86400.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spend (
  key TEXT NOT NULL,
  window INTEGER NOT NULL,
  until INTEGER NOT NULL,
  spent REAL NOT NULL,
  PRIMARY KEY (key, window)
) WITHOUT ROWID;
"""


class _Job:
    __slots__ = ("future", "loop", "work")

    def __init__(
        self,
        work: Callable[[sqlite3.Connection], Any],
        future: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.work = work
        self.future = future
        self.loop = loop


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class _Writer(threading.Thread):
    def __init__(self, path: Path) -> None:
        super().__init__(name="sidecar-budgets-db", daemon=True)
        self.path = path
        self.jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.open_error: BaseException | None = None

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        # FULL as in the webhook queue: a charge the agent was answered for must
        # survive a power cut too, and group commit pays one fsync per batch.
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(_SCHEMA)
        conn.execute("DELETE FROM spend WHERE until < ?", (time.time() - _KEEP_ENDED,))
        return conn

    def run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to every job, and logged once
            self.open_error = exc
            log.error("cannot open the budget store %s: %s", self.path, exc)
            conn = None
        try:
            self._serve(conn)
        finally:
            if conn is not None:
                conn.close()

    def _serve(self, conn: sqlite3.Connection | None) -> None:
        while True:
            first = self.jobs.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < _BATCH:
                try:
                    job = self.jobs.get_nowait()
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
                raise OSError(f"the budget store {self.path} could not be opened")
            conn.execute("BEGIN IMMEDIATE")
            for job in batch:
                outcomes.append((job.work(conn), None))
            conn.execute("COMMIT")
        except Exception as exc:
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            outcomes = [(None, exc)] * len(batch)
        # Only after COMMIT: nobody hears of a charge before it is on disk.
        for job, (result, error) in zip(batch, outcomes, strict=True):
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                job.loop.call_soon_threadsafe(_settle, job.future, result, error)


class _Loading:
    """A read of one key in flight, and what was charged to it meanwhile."""

    __slots__ = ("extra", "future")

    def __init__(self, future: asyncio.Future[float]) -> None:
        self.future = future
        self.extra = 0.0


class SqliteLedger:
    def __init__(self, data_dir: str) -> None:
        self.path = Path(data_dir) / DB_NAME
        self._writer = _Writer(self.path)
        self._writer.start()
        self._cache: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._loading: dict[tuple[str, int], _Loading] = {}

    def _submit(self, work: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._writer.jobs.put(_Job(work, future, loop))
        return future

    def cached(self, key: str, window: int) -> float | None:
        k = (key, window)
        found = self._cache.get(k)
        if found is not None:
            self._cache.move_to_end(k)
        return found

    def _remember(self, k: tuple[str, int], spent: float) -> None:
        self._cache[k] = spent
        self._cache.move_to_end(k)
        if len(self._cache) > MAX_KEYS:
            self._cache.popitem(last=False)

    async def spent(self, key: str, window: int, until: int) -> float:
        k = (key, window)
        found = self.cached(key, window)
        if found is not None:
            return found
        loading = self._loading.get(k)
        if loading is None:

            def read(conn: sqlite3.Connection) -> float:
                row = conn.execute(
                    "SELECT spent FROM spend WHERE key = ? AND window = ?", (key, window)
                ).fetchone()
                return float(row[0]) if row is not None else 0.0

            loading = self._loading[k] = _Loading(self._submit(read))
            try:
                value = await asyncio.shield(loading.future)
            except (sqlite3.Error, OSError):
                # Logged when the file failed to open; the budget's fail_open decides.
                raise LedgerDown from None
            finally:
                del self._loading[k]
            # Charges made while the read was queued behind them are not in it.
            value += loading.extra
            if k not in self._cache:
                self._remember(k, value)
            return self._cache.get(k, value)
        # Several calls for one key wait for one read.
        try:
            await asyncio.shield(loading.future)
        except (sqlite3.Error, OSError):
            raise LedgerDown from None
        found = self._cache.get(k)
        return found if found is not None else await self.spent(key, window, until)

    async def add(self, key: str, window: int, until: int, amount: float) -> None:
        k = (key, window)
        if k in self._cache:
            self._remember(k, self._cache[k] + amount)
        elif k in self._loading:
            self._loading[k].extra += amount

        def write(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO spend VALUES (?, ?, ?, ?) ON CONFLICT (key, window)"
                " DO UPDATE SET spent = spent + excluded.spent",
                (key, window, until, amount),
            )

        try:
            await self._submit(write)
        except (sqlite3.Error, OSError) as exc:
            log.error("budget store %s: a charge could not be written: %s", self.path, exc)
            raise LedgerDown from None

    def retire(self) -> None:
        # The writer drains what is queued before it stops: no charge is dropped.
        self._writer.jobs.put(None)
