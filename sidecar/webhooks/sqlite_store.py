"""The webhook queue (queue.Queue) in one SQLite file, WAL mode: one process owns it.

A message is the event as received (headers, body); each of its targets gets
a delivery row (status, attempts, next attempt, last error); each attempt is a
row of its own. The contract: a message acknowledged to its sender or agent
survives `kill -9`, so `accept` returns only once its transaction committed.

Every statement runs in one writer thread that owns the connection: the event
loop never waits on the disk, it awaits a future the thread resolves after the
commit. The thread commits whatever jobs queued up meanwhile in one
transaction (group commit), so a burst costs one fsync per batch, not per event.

One process owns the file: at open, deliveries a killed process had claimed
are released, to be attempted again (at least once, never lost).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..sqlite_writer import SqliteWriter
from .queue import (
    SUBSCRIPTION,
    Accepted,
    Attempt,
    DeadLetter,
    DeliveryStatus,
    DeliveryView,
    Direction,
    Due,
    EndpointStats,
    MessageStatus,
    MessageView,
    Outcome,
    Overview,
    Pending,
    QueueDepth,
    StoreClosed,
    StoreUnavailable,
    Target,
    new_message_id,
)

log = logging.getLogger("sidecar.webhooks")

T = TypeVar("T")
Item = TypeVar("Item")
R = TypeVar("R")
Clock = Callable[[], float]


def _unavailable(error: BaseException) -> BaseException:
    """Callers know the queue, not its backend: SQLite's failures are the same 503 as
    Redis down (StoreUnavailable); any other error is left as it is."""
    if isinstance(error, (sqlite3.Error, OSError)):
        return StoreUnavailable(str(error))
    return error


DB_NAME = "webhooks.db"
_DEDUP_PURGE_EVERY = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id TEXT PRIMARY KEY, direction TEXT NOT NULL, source TEXT NOT NULL, event_type TEXT,
    status TEXT NOT NULL, headers TEXT NOT NULL, body BLOB NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY, message_id TEXT NOT NULL REFERENCES messages(id),
    direction TEXT NOT NULL, source TEXT NOT NULL, endpoint TEXT NOT NULL, url TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, next_attempt REAL,
    claimed INTEGER NOT NULL DEFAULT 0, last_error TEXT);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (status, next_attempt);
CREATE INDEX IF NOT EXISTS deliveries_message ON deliveries (message_id);
CREATE INDEX IF NOT EXISTS deliveries_claimed ON deliveries (source, endpoint) WHERE claimed = 1;
CREATE INDEX IF NOT EXISTS deliveries_ready ON deliveries (source, endpoint, next_attempt)
    WHERE status = 'pending' AND next_attempt IS NOT NULL;
CREATE TABLE IF NOT EXISTS attempts (
    id INTEGER PRIMARY KEY, delivery_id INTEGER NOT NULL REFERENCES deliveries(id),
    at REAL NOT NULL, status_code INTEGER, error TEXT, duration REAL NOT NULL,
    ok INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS attempts_delivery ON attempts (delivery_id);
CREATE TABLE IF NOT EXISTS endpoints (
    source TEXT NOT NULL, endpoint TEXT NOT NULL, disabled INTEGER NOT NULL,
    reason TEXT, since REAL, PRIMARY KEY (source, endpoint));
CREATE TABLE IF NOT EXISTS dedup (
    source TEXT NOT NULL, delivery_id TEXT NOT NULL, message_id TEXT NOT NULL,
    expires REAL NOT NULL, PRIMARY KEY (source, delivery_id));
CREATE INDEX IF NOT EXISTS dedup_expires ON dedup (expires);
"""

# Both read one endpoint's pending deliveries in due order off `deliveries_ready`
# (ties in rowid order, which the index keeps): no sort, whatever the backlog.
_READY = "status = 'pending' AND next_attempt IS NOT NULL"
_CLAIM_SQL = (
    "SELECT d.id, d.message_id, d.direction, d.source, d.endpoint, d.url, d.attempts,"
    " m.event_type, m.headers, m.body, m.created, d.next_attempt"
    " FROM deliveries d INDEXED BY deliveries_ready JOIN messages m ON m.id = d.message_id"
    " WHERE d.source = ? AND d.endpoint = ? AND d.status = 'pending'"
    " AND d.next_attempt IS NOT NULL AND d.next_attempt <= ?"
    " ORDER BY d.next_attempt, d.id LIMIT ?"
)
_NEXT_DUE_SQL = (
    "SELECT id, next_attempt FROM deliveries INDEXED BY deliveries_ready"
    f" WHERE source = ? AND endpoint = ? AND {_READY} ORDER BY next_attempt, id LIMIT ?"
)
_FIRST_READY_SQL = (
    "SELECT source, endpoint FROM deliveries INDEXED BY deliveries_ready"
    f" WHERE {_READY} ORDER BY source, endpoint LIMIT 1"
)
_NEXT_READY_SQL = (
    "SELECT source, endpoint FROM deliveries INDEXED BY deliveries_ready"
    f" WHERE {_READY} AND (source, endpoint) > (?, ?) ORDER BY source, endpoint LIMIT 1"
)


def _ready_endpoints(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    """Each (source, endpoint) with a pending delivery that has a due time.

    A skip scan over the index, one seek per endpoint, rather than a DISTINCT
    that would read every pending row.
    """
    found: list[tuple[str, str]] = []
    row = conn.execute(_FIRST_READY_SQL).fetchone()
    while row is not None:
        found.append((row[0], row[1]))
        row = conn.execute(_NEXT_READY_SQL, (row[0], row[1])).fetchone()
    return found


def _disabled(conn: sqlite3.Connection) -> set[tuple[str, str]]:
    return {
        (r[0], r[1])
        for r in conn.execute("SELECT source, endpoint FROM endpoints WHERE disabled = 1")
    }


def _prune(conn: sqlite3.Connection, before: float) -> None:
    """Remove messages older than `before` all of whose deliveries were delivered.

    Routed ones only: an unrouted message is kept for someone to look at, a
    dead or pending delivery for a retry. Runs in the writer thread.
    """
    old = (
        "SELECT m.id FROM messages m WHERE m.created < ? AND m.status = 'routed'"
        " AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.message_id = m.id"
        " AND d.status != 'delivered')"
    )
    conn.execute(
        "DELETE FROM attempts WHERE delivery_id IN"
        f" (SELECT id FROM deliveries WHERE message_id IN ({old}))",
        (before,),
    )
    conn.execute(f"DELETE FROM deliveries WHERE message_id IN ({old})", (before,))
    conn.execute(
        "DELETE FROM messages WHERE created < ? AND status = 'routed' AND NOT EXISTS"
        " (SELECT 1 FROM deliveries d WHERE d.message_id = messages.id)",
        (before,),
    )


def _setup(conn: sqlite3.Connection) -> None:
    conn.execute("PRAGMA foreign_keys=ON")
    conn.executescript(_SCHEMA)
    # Added to a table older databases already have.
    if "due" not in {row[1] for row in conn.execute("PRAGMA table_info(attempts)")}:
        conn.execute("ALTER TABLE attempts ADD COLUMN due REAL")
    # A claim held by a killed process would block its delivery forever.
    conn.execute("UPDATE deliveries SET claimed = 0 WHERE claimed = 1")


@dataclass(slots=True)
class _Event:
    """One accept waiting for the writer's next turn."""

    message_id: str
    direction: str
    source: str
    event_type: str | None
    status: str
    headers: str  # JSON
    body: bytes
    now: float
    dedup_id: str | None  # None: no dedup (no id, or no window)
    expires: float  # of its dedup entry
    targets: list[tuple[str, str]]  # (endpoint, url)
    first: float  # when its deliveries are first due


@dataclass(slots=True)
class _Finished:
    """One attempt's record waiting for the writer's next turn."""

    delivery_id: int
    source: str
    endpoint: str
    attempt: Attempt
    status: str  # the delivery's, after this attempt
    when: float | None  # its next attempt
    error: str | None  # its last error
    gone: bool  # 410: disable the endpoint
    prune_before: float | None


_PENDING = ", 'pending'"
# Rows per multi-row statement: well under SQLite's 32,766 bound variables.
_ROWS = 256


def _chunks(rows: Sequence[R]) -> list[Sequence[R]]:
    return [rows[i : i + _ROWS] for i in range(0, len(rows), _ROWS)]


def _marks(columns: int, rows: int, tail: str = "") -> str:
    """`(?, ?), (?, ?)`: the placeholders of a multi-row VALUES."""
    row = "(" + ", ".join("?" * columns) + tail + ")"
    return ", ".join([row] * rows)


class _Batched(Generic[Item, R]):
    """Calls of one kind written together: one writer job per turn for all of them.

    A job per call made the writer thread run a savepoint and a few statements per
    event, each a round of the GIL with the event loop; one job per turn writes
    everything that queued up meanwhile with a few multi-row statements. Each
    caller's future is settled once the turn's transaction committed (or failed:
    then every call in it fails, as they would have in one failed COMMIT).
    """

    def __init__(
        self,
        writer: SqliteWriter,
        write: Callable[[sqlite3.Connection, list[Item]], list[R]],
        after: Callable[[list[R]], None] | None = None,
    ) -> None:
        self._writer = writer
        self._write = write
        self._after = after
        self._items: collections.deque[tuple[Item, asyncio.Future[R]]] = collections.deque()
        # A job is queued that has not yet taken the items: a new item goes with it.
        # Set on the loop, cleared by the writer thread before it takes the items, so
        # an item added after the take always finds it cleared and queues a job.
        self._queued = False

    def add(self, item: Item) -> asyncio.Future[R]:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._items.append((item, future))
        if not self._queued:
            self._queued = True
            taken: list[tuple[Item, asyncio.Future[R]]] = []
            ran: list[bool] = []

            def work(conn: sqlite3.Connection) -> list[R]:
                ran.append(True)
                self._queued = False
                items = self._items
                while items:
                    taken.append(items.popleft())
                return self._write(conn, [item for item, _ in taken]) if taken else []

            self._writer.submit(work).add_done_callback(lambda done: self._settle(taken, ran, done))
        return future

    def _settle(
        self,
        taken: list[tuple[Item, asyncio.Future[R]]],
        ran: list[bool],
        done: asyncio.Future[list[R]],
    ) -> None:
        error = done.exception()
        if error is not None:
            error = _unavailable(error)
            if not ran:
                # The turn failed before this job took its items (BEGIN failed): no
                # other job of ours is queued, so they are ours to fail, and the next
                # item queues a job again.
                self._queued = False
                while self._items:
                    taken.append(self._items.popleft())
            for _, future in taken:
                if not future.done():
                    future.set_exception(error)
            return
        results = done.result()
        for (_, future), result in zip(taken, results, strict=True):
            if not future.done():
                future.set_result(result)
        if self._after is not None and results:
            self._after(results)


class SqliteStore:
    """The queue in SQLite. Open with `await SqliteStore.open(data_dir)`."""

    def __init__(self, writer: SqliteWriter, clock: Clock) -> None:
        self._writer = writer
        self._clock = clock
        self._closed = False
        self._last_purge = 0.0
        self._last_prune = 0.0
        # Messages all of whose deliveries succeeded go this long after they arrived.
        self.retention: float | None = None
        # Claimed deliveries per (source, endpoint): the attempts in flight. Kept here,
        # not in the table: one process owns the file, and a restart forgets its claims
        # anyway, so a claim costs no write. Touched only in the writer thread.
        self._claims: dict[tuple[str, str], set[int]] = {}
        # Called after each commit that added deliveries: wakes the delivery worker.
        self.on_new_deliveries: Callable[[], None] | None = None
        self._accepts: _Batched[_Event, Accepted] = _Batched(
            writer, self._write_accepts, self._accepted
        )
        self._finishes: _Batched[_Finished, None] = _Batched(writer, self._write_finishes)

    @classmethod
    async def open(
        cls, data_dir: str | os.PathLike[str], *, clock: Clock = time.time
    ) -> SqliteStore:
        writer = SqliteWriter(
            Path(data_dir) / DB_NAME,
            thread_name="sidecar-webhooks-db",
            what="the webhook store",
            setup=_setup,
        )
        await asyncio.to_thread(writer.opened.wait)
        if writer.open_error is not None:
            writer.stop()
            raise writer.open_error
        return cls(writer, clock)

    def configure(self, *, claim_idle: float, retention: float | None) -> None:
        """A reload's store settings (claim_idle is Redis's: one process owns this file)."""
        self.retention = retention

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._writer.stop()
        await asyncio.to_thread(self._writer.join)

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        self._check()
        try:
            return await self._writer.submit(work)
        except (sqlite3.Error, OSError) as exc:
            raise _unavailable(exc) from exc

    def _check(self) -> None:
        if self._closed:
            raise StoreClosed("the webhook store is closed")

    async def accept(
        self,
        *,
        direction: Direction,
        source: str,
        event_type: str | None,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        targets: Sequence[Target],
        dedup_id: str | None = None,
        dedup_window: float = 0.0,
        first_attempt_in: float = 0.0,
    ) -> Accepted:
        """Store a message and one pending delivery per target; returns once committed.

        Each delivery is first due `first_attempt_in` from now (the schedule's first
        delay); a subscription's is never due (its subscriber reads it).

        With a dedup_id seen for this source within the window, nothing is
        stored and the first message's id comes back as a duplicate.
        No targets: the message is kept as unrouted.

        Every event that arrives while the writer is busy waits for its next turn
        and is written with the others, a few multi-row statements for them all
        (`_write_accepts`), in the same transaction as whatever else is queued.
        """
        self._check()
        now = self._clock()
        message_id = new_message_id(now)
        event = _Event(
            message_id,
            direction.value,
            source,
            event_type,
            MessageStatus.routed.value if targets else MessageStatus.unrouted.value,
            json.dumps(list(headers)),
            body,
            now,
            dedup_id if dedup_window > 0 else None,
            now + dedup_window,
            [(t.endpoint, t.url) for t in targets],
            now + first_attempt_in,
        )
        return await self._accepts.add(event)

    def _write_accepts(self, conn: sqlite3.Connection, events: list[_Event]) -> list[Accepted]:
        """In the writer thread: the events of one turn, in arrival order."""
        now = events[-1].now
        if now - self._last_purge > _DEDUP_PURGE_EVERY:
            self._last_purge = now
            conn.execute("DELETE FROM dedup WHERE expires <= ?", (now,))
        results: list[Accepted | None] = [None] * len(events)
        keyed = [(i, e) for i, e in enumerate(events) if e.dedup_id is not None]
        if keyed:
            # (source, dedup id) -> the message it was first accepted as, until when.
            seen: dict[tuple[str, str], tuple[str, float]] = {}
            for chunk in _chunks(keyed):
                # A join, not `(source, delivery_id) IN (VALUES ...)`: SQLite scans the
                # whole table for that one, here it seeks the primary key per event.
                found_rows = conn.execute(
                    "SELECT d.source, d.delivery_id, d.message_id, d.expires"
                    f" FROM (VALUES {_marks(2, len(chunk))}) AS v JOIN dedup d"
                    " ON d.source = v.column1 AND d.delivery_id = v.column2",
                    [v for _, e in chunk for v in (e.source, e.dedup_id)],
                )
                for row in found_rows:
                    seen[row[0], row[1]] = (row[2], row[3])
            fresh: list[tuple[str, str, str, float]] = []
            for i, e in keyed:
                key = (e.source, e.dedup_id or "")
                found = seen.get(key)
                if found is not None and found[1] > e.now:
                    results[i] = Accepted(found[0], duplicate=True)
                else:
                    seen[key] = (e.message_id, e.expires)
                    fresh.append((*key, e.message_id, e.expires))
            for part in _chunks(fresh):
                conn.execute(
                    f"INSERT OR REPLACE INTO dedup VALUES {_marks(4, len(part))}",
                    [v for row in part for v in row],
                )
        stored = [e for e, r in zip(events, results, strict=True) if r is None]
        for group in _chunks(stored):
            conn.execute(
                f"INSERT INTO messages VALUES {_marks(8, len(group))}",
                [
                    v
                    for e in group
                    for v in (
                        e.message_id,
                        e.direction,
                        e.source,
                        e.event_type,
                        e.status,
                        e.headers,
                        e.body,
                        e.now,
                    )
                ],
            )
        deliveries = [
            (e.message_id, e.direction, e.source, endpoint, url, e.first if url else None)
            for e in stored
            for endpoint, url in e.targets
        ]
        for batch in _chunks(deliveries):
            conn.execute(
                "INSERT INTO deliveries (message_id, direction, source, endpoint, url,"
                f" next_attempt, status) VALUES {_marks(6, len(batch), _PENDING)}",
                [v for row in batch for v in row],
            )
        return [
            r if r is not None else Accepted(e.message_id, duplicate=False, routed=bool(e.targets))
            for e, r in zip(events, results, strict=True)
        ]

    def _accepted(self, results: list[Accepted]) -> None:
        """On the loop, once a turn's events committed: one wake-up for them all."""
        if self.on_new_deliveries is not None and any(
            r.routed and not r.duplicate for r in results
        ):
            self.on_new_deliveries()

    async def claim(self, limit: int, per_endpoint: int) -> list[Due]:
        """Up to `limit` due deliveries of enabled endpoints, earliest first, marked claimed.

        No endpoint gets more than `per_endpoint` claimed at once (those already
        in flight count), so a slow or hanging endpoint cannot take every slot.
        Each endpoint's earliest few come off the `deliveries_ready` index, so
        a claim costs the same whatever the backlog.
        """
        now = self._clock()
        claims = self._claims

        def work(conn: sqlite3.Connection) -> list[Due]:
            disabled = _disabled(conn)
            rows: list[Any] = []  # sqlite3 rows
            for pair in _ready_endpoints(conn):
                if pair in disabled:
                    continue
                held = claims.get(pair, set())
                room = min(per_endpoint - len(held), limit)
                if room <= 0:
                    continue
                # Claimed ones are still pending in the table: read past them.
                for row in conn.execute(_CLAIM_SQL, (*pair, now, room + len(held))):
                    if row[0] not in held:
                        rows.append(row)
                        room -= 1
                        if room == 0:
                            break
            rows.sort(key=lambda r: (r[11], r[0]))
            del rows[limit:]
            for r in rows:
                claims.setdefault((r[3], r[4]), set()).add(r[0])
            return [
                Due(
                    delivery_id=r[0],
                    message_id=r[1],
                    direction=Direction(r[2]),
                    source=r[3],
                    endpoint=r[4],
                    url=r[5],
                    attempts=r[6],
                    event_type=r[7],
                    headers=[(k, v) for k, v in json.loads(r[8])],
                    body=r[9],
                    created=r[10],
                    due=r[11],
                )
                for r in rows
            ]

        return await self._run(work)

    async def next_due(self) -> float | None:
        """When the earliest unclaimed pending delivery of an enabled endpoint is due."""
        claims = self._claims

        def work(conn: sqlite3.Connection) -> float | None:
            disabled = _disabled(conn)
            earliest: float | None = None
            for pair in _ready_endpoints(conn):
                if pair in disabled:
                    continue
                held = claims.get(pair, set())
                for delivery_id, when in conn.execute(_NEXT_DUE_SQL, (*pair, len(held) + 1)):
                    if delivery_id not in held:
                        if earliest is None or when < earliest:
                            earliest = float(when)
                        break
            return earliest

        return await self._run(work)

    async def finish(
        self, due: Due, attempt: Attempt, outcome: Outcome, next_attempt: float | None = None
    ) -> None:
        """Record an attempt of a claimed delivery and what follows from it.

        Attempts that end while the writer is busy are recorded together, in its next
        turn (`_write_finishes`); each call returns once its record committed.
        """
        self._check()
        if outcome is Outcome.delivered:
            status, when = DeliveryStatus.delivered, None
        elif outcome is Outcome.dead:
            status, when = DeliveryStatus.dead, None
        else:
            status, when = DeliveryStatus.pending, next_attempt or attempt.at
        await self._finishes.add(
            _Finished(
                due.delivery_id,
                due.source,
                due.endpoint,
                attempt,
                status.value,
                when,
                attempt.failure,
                outcome is Outcome.gone,
                self._prune_before(attempt.at),
            )
        )

    def _write_finishes(self, conn: sqlite3.Connection, done: list[_Finished]) -> list[None]:
        """In the writer thread: the attempts of one turn, two statements for them all."""
        claims = self._claims
        prune_before: float | None = None
        for f in done:
            claims.get((f.source, f.endpoint), set()).discard(f.delivery_id)
            if f.prune_before is not None:
                prune_before = f.prune_before
        if prune_before is not None:
            _prune(conn, prune_before)
        for part in _chunks(done):
            conn.execute(
                "INSERT INTO attempts (delivery_id, at, status_code, error, duration, ok, due)"
                f" VALUES {_marks(7, len(part))}",
                [
                    v
                    for f in part
                    for v in (
                        f.delivery_id,
                        f.attempt.at,
                        f.attempt.status_code,
                        f.attempt.error,
                        f.attempt.duration,
                        int(f.attempt.ok),
                        f.attempt.due,
                    )
                ],
            )
            conn.execute(
                "UPDATE deliveries SET status = v.column2, attempts = attempts + 1,"
                " next_attempt = v.column3, claimed = 0, last_error = v.column4"
                f" FROM (VALUES {_marks(4, len(part))}) AS v WHERE deliveries.id = v.column1",
                [v for f in part for v in (f.delivery_id, f.status, f.when, f.error)],
            )
        for f in done:
            if f.gone:
                conn.execute(
                    "INSERT OR REPLACE INTO endpoints VALUES (?, ?, 1, ?, ?)",
                    (f.source, f.endpoint, "410 Gone", f.attempt.at),
                )
        return [None] * len(done)

    def _prune_before(self, now: float) -> float | None:
        """Once a minute with a retention set: the arrival time older messages go by."""
        if self.retention is None or now - self._last_prune < _DEDUP_PURGE_EVERY:
            return None
        self._last_prune = now
        return now - self.retention

    async def release_claims(self) -> None:
        """Unclaim every delivery: the worker stopped, its attempts were cancelled."""

        claims = self._claims

        def work(conn: sqlite3.Connection) -> None:
            claims.clear()

        await self._run(work)

    async def enable(self, source: str, endpoint: str) -> bool:
        """Enable a disabled endpoint; its waiting deliveries are due at once.

        False: it was not disabled."""
        now = self._clock()

        def work(conn: sqlite3.Connection) -> bool:
            changed = conn.execute(
                "DELETE FROM endpoints WHERE source = ? AND endpoint = ? AND disabled = 1",
                (source, endpoint),
            ).rowcount
            conn.execute(
                "UPDATE deliveries SET next_attempt = ? WHERE source = ? AND endpoint = ?"
                " AND status = 'pending' AND url != ''",
                (now, source, endpoint),
            )
            return changed > 0

        enabled = await self._run(work)
        if enabled and self.on_new_deliveries is not None:
            self.on_new_deliveries()
        return enabled

    async def retry(self, message_id: str) -> int | None:
        """Send a message's dead deliveries again, with the schedule from its start.

        Pending ones become due now. The number of deliveries requeued; None: no such message.
        """
        now = self._clock()

        def work(conn: sqlite3.Connection) -> int | None:
            if (
                conn.execute("SELECT 1 FROM messages WHERE id = ?", (message_id,)).fetchone()
                is None
            ):
                return None
            return int(
                conn.execute(
                    "UPDATE deliveries SET status = 'pending', attempts = 0,"
                    " next_attempt = CASE WHEN url = '' THEN NULL ELSE ? END"
                    " WHERE message_id = ? AND status != 'delivered'",
                    (now, message_id),
                ).rowcount
            )

        requeued = await self._run(work)
        if requeued and self.on_new_deliveries is not None:
            self.on_new_deliveries()
        return requeued

    async def overview(self) -> Overview:
        """Per endpoint: depth, oldest pending age, successes, failures, dead, disabled."""
        now = self._clock()

        def work(conn: sqlite3.Connection) -> Overview:
            failures = {
                (r[0], r[1]): r[2]
                for r in conn.execute(
                    "SELECT d.source, d.endpoint, COUNT(*) FROM attempts a"
                    " JOIN deliveries d ON d.id = a.delivery_id WHERE a.ok = 0"
                    " GROUP BY d.source, d.endpoint"
                )
            }
            disabled = {
                (r[0], r[1]) for r in conn.execute("SELECT source, endpoint FROM endpoints")
            }
            stats = [
                EndpointStats(
                    direction=Direction(r[0]),
                    source=r[1],
                    endpoint=r[2],
                    depth=r[3],
                    oldest_pending_age=None if r[4] is None else max(0.0, now - r[4]),
                    successes=r[5],
                    failures=failures.get((r[1], r[2]), 0),
                    dead=r[6],
                    disabled=(r[1], r[2]) in disabled,
                )
                for r in conn.execute(
                    "SELECT d.direction, d.source, d.endpoint, SUM(d.status = 'pending'),"
                    " MIN(CASE WHEN d.status = 'pending' THEN m.created END),"
                    " SUM(d.status = 'delivered'), SUM(d.status = 'dead')"
                    " FROM deliveries d JOIN messages m ON m.id = d.message_id"
                    " GROUP BY d.direction, d.source, d.endpoint ORDER BY d.source, d.endpoint"
                )
            ]
            unrouted = dict(
                conn.execute(
                    "SELECT source, COUNT(*) FROM messages WHERE status = 'unrouted'"
                    " GROUP BY source"
                ).fetchall()
            )
            return Overview(stats, unrouted)

        return await self._run(work)

    async def dead_letters(self, limit: int = 50) -> list[DeadLetter] | None:
        """The newest dead deliveries, each with its message id (what a replay takes)."""

        def work(conn: sqlite3.Connection) -> list[DeadLetter]:
            return [
                DeadLetter(Direction(r[0]), r[1], r[2], r[3], r[4], r[5], r[6])
                for r in conn.execute(
                    "SELECT d.direction, d.source, d.endpoint, d.message_id, m.event_type,"
                    " m.created, d.last_error FROM deliveries d"
                    " JOIN messages m ON m.id = d.message_id"
                    " WHERE d.status = 'dead' ORDER BY m.created DESC LIMIT ?",
                    (limit,),
                )
            ]

        return await self._run(work)

    async def depths(self) -> list[QueueDepth]:
        """Per endpoint with pending deliveries: how many, and the oldest one's age."""
        now = self._clock()

        def work(conn: sqlite3.Connection) -> list[QueueDepth]:
            return [
                QueueDepth(Direction(r[0]), r[1], r[2], r[3], max(0.0, now - r[4]))
                for r in conn.execute(
                    "SELECT d.direction, d.source, d.endpoint, COUNT(*), MIN(m.created)"
                    " FROM deliveries d JOIN messages m ON m.id = d.message_id"
                    " WHERE d.status = 'pending' GROUP BY d.direction, d.source, d.endpoint"
                )
            ]

        return await self._run(work)

    async def message(self, message_id: str) -> MessageView | None:
        """One message with each delivery and every attempt made."""

        def work(conn: sqlite3.Connection) -> MessageView | None:
            m = conn.execute(
                "SELECT id, direction, source, event_type, status, created FROM messages"
                " WHERE id = ?",
                (message_id,),
            ).fetchone()
            if m is None:
                return None
            deliveries = []
            for d in conn.execute(
                "SELECT id, endpoint, url, status, next_attempt, last_error FROM deliveries"
                " WHERE message_id = ? ORDER BY id",
                (message_id,),
            ).fetchall():
                attempts = [
                    Attempt(at=a[0], status_code=a[1], error=a[2], duration=a[3], due=a[4])
                    for a in conn.execute(
                        "SELECT at, status_code, error, duration, due FROM attempts"
                        " WHERE delivery_id = ? ORDER BY id",
                        (d[0],),
                    )
                ]
                deliveries.append(
                    DeliveryView(
                        endpoint=d[1],
                        url=d[2],
                        status=DeliveryStatus(d[3]),
                        attempts=attempts,
                        next_attempt=d[4],
                        last_error=d[5],
                    )
                )
            return MessageView(
                id=m[0],
                direction=Direction(m[1]),
                source=m[2],
                event_type=m[3],
                status=MessageStatus(m[4]),
                created=m[5],
                deliveries=deliveries,
            )

        return await self._run(work)

    async def pending(self, source: str, after: int | None, limit: int) -> list[Pending]:
        """The subscription's unacknowledged events of `source` after delivery `after`."""

        def work(conn: sqlite3.Connection) -> list[Pending]:
            rows = conn.execute(
                "SELECT d.id, d.message_id, m.event_type, m.headers, m.body, m.created"
                " FROM deliveries d JOIN messages m ON m.id = d.message_id"
                " WHERE d.source = ? AND d.endpoint = ? AND d.status = 'pending' AND d.id > ?"
                " ORDER BY d.id LIMIT ?",
                (source, SUBSCRIPTION, -1 if after is None else after, limit),
            ).fetchall()
            return [
                Pending(r[0], r[1], r[2], [(k, v) for k, v in json.loads(r[3])], r[4], r[5])
                for r in rows
            ]

        return await self._run(work)

    async def ack(self, source: str, message_id: str) -> int | None:
        """Mark this event and every earlier one of the subscription delivered.

        How many were still pending; None: `source` has no such subscribed event."""

        def work(conn: sqlite3.Connection) -> int | None:
            row = conn.execute(
                "SELECT id FROM deliveries WHERE message_id = ? AND source = ? AND endpoint = ?",
                (message_id, source, SUBSCRIPTION),
            ).fetchone()
            if row is None:
                return None
            done = conn.execute(
                "SELECT id FROM deliveries WHERE source = ? AND endpoint = ?"
                " AND status = 'pending' AND id <= ?",
                (source, SUBSCRIPTION, row[0]),
            ).fetchall()
            conn.executemany(
                "UPDATE deliveries SET status = 'delivered', attempts = attempts + 1,"
                " last_error = NULL WHERE id = ?",
                done,
            )
            return len(done)

        return await self._run(work)
