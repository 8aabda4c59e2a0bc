"""The data dir's budget ledger: one SQLite file, one writer thread.

Kept apart from ledger.py so that a policy without budgets never imports
sqlite3 (tests/test_footprint.py checks what the example policies load).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import OrderedDict
from pathlib import Path

from ..sqlite_writer import SqliteWriter
from .ledger import DB_NAME, MAX_KEYS, LedgerDown

log = logging.getLogger("sidecar.budgets")

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


def _setup(conn: sqlite3.Connection) -> None:
    conn.executescript(_SCHEMA)
    conn.execute("DELETE FROM spend WHERE until < ?", (time.time() - _KEEP_ENDED,))


class _Loading:
    """A read of one key in flight, and what was charged to it meanwhile."""

    __slots__ = ("extra", "future")

    def __init__(self, future: asyncio.Future[float]) -> None:
        self.future = future
        self.extra = 0.0


class SqliteLedger:
    def __init__(self, data_dir: str) -> None:
        self.path = Path(data_dir) / DB_NAME
        # What cannot be opened is logged once; then every read and charge is LedgerDown.
        self._writer = SqliteWriter(
            self.path,
            thread_name="sidecar-budgets-db",
            what="the budget store",
            setup=_setup,
            log=log,
        )
        self._cache: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._loading: dict[tuple[str, int], _Loading] = {}

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

            loading = self._loading[k] = _Loading(self._writer.submit(read))
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
            await self._writer.submit(write)
        except (sqlite3.Error, OSError) as exc:
            log.error("budget store %s: a charge could not be written: %s", self.path, exc)
            raise LedgerDown from None

    def retire(self) -> None:
        self._writer.stop()  # after the charges queued so far: none is dropped
