"""What each budget spent in its current window, kept in the sidecar's data dir.

The data dir's SQLite file (sqlite_ledger.py: `budgets.db`, WAL mode) holds a
row per (budget key, window start). The contract: a charge is on disk before
the answer it paid for has ended (steps/llm/llm.py awaits `add` before it ends the
reply's body), so a `kill -9` never forgets an acknowledged charge and a
restarted sidecar refuses what the old one would have.

As in the webhook queue, one writer thread owns the connection and commits
whatever queued up meanwhile in one transaction, so the event loop never waits
on the disk and a burst of answers costs one fsync per batch. Spend is also
kept in memory (at most MAX_KEYS keys, least recently used dropped first), so
an admission reads the disk once per key and window, not per call.

One process owns the file, like the webhook queue's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Protocol

DB_NAME = "budgets.db"
MAX_KEYS = 10_000


class LedgerDown(Exception):
    """The ledger cannot be reached (Redis down): the budget's `fail_open` decides."""


class Ledger(Protocol):
    """Where budgets keep their spend: `MemoryLedger`, `SqliteLedger`, `RedisLedger`."""

    def cached(self, key: str, window: int) -> float | None:
        """The spend when it is known without waiting; None: ask `spent`."""

    async def spent(self, key: str, window: int, until: int) -> float: ...

    async def add(self, key: str, window: int, until: int, amount: float) -> None: ...


class MemoryLedger:
    """This process only, for a sidecar without a data dir (embedded, unit tests)."""

    def __init__(self) -> None:
        self._spend: OrderedDict[tuple[str, int], float] = OrderedDict()

    def cached(self, key: str, window: int) -> float | None:
        return self._spend.get((key, window), 0.0)

    async def spent(self, key: str, window: int, until: int) -> float:
        return self._spend.get((key, window), 0.0)

    async def add(self, key: str, window: int, until: int, amount: float) -> None:
        k = (key, window)
        self._spend[k] = self._spend.get(k, 0.0) + amount
        self._spend.move_to_end(k)
        if len(self._spend) > MAX_KEYS:
            self._spend.popitem(last=False)
