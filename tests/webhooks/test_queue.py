"""The queue's contract as its callers see it, whichever store implements it."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from pathlib import Path

import pytest

from sidecar.webhooks.inbound import Ingress
from sidecar.webhooks.outbound import Outbox
from sidecar.webhooks.queue import (
    SUBSCRIPTION,
    Accepted,
    Attempt,
    DeliveryStatus,
    Direction,
    Outcome,
    StoreUnavailable,
    Target,
)
from sidecar.webhooks.sqlite_store import DB_NAME, SqliteStore

from .conftest import github_headers, webhooks
from .test_delivery import OUTBOUND, SECRET, WHSEC, inbound_policy


async def test_a_failing_database_is_a_503_to_senders_and_agents(
    store: SqliteStore, tmp_path: Path
) -> None:
    """Intake knows the queue, not SQLite: a database error is StoreUnavailable, so the
    sender hears 503 store_unavailable (and sends again) as with Redis down."""
    body = b'{"n": 1}'
    ingress = Ingress(inbound_policy("http://127.0.0.1:1/"), store=store)
    outbox = Outbox(
        webhooks(OUTBOUND.format(secret=WHSEC, gone="http://127.0.0.1:1/", fine="http://x/")),
        store=store,
    )
    ok = await ingress.handle("/hooks/github", github_headers(body, SECRET, "d-1"), body)
    assert ok.status == 200
    # Another hand breaks the file under the running store.
    with sqlite3.connect(tmp_path / "data" / DB_NAME) as other:
        other.execute("DROP TABLE deliveries")
    with pytest.raises(StoreUnavailable):
        await store.accept(
            direction=Direction.inbound,
            source="github",
            event_type=None,
            headers=[],
            body=body,
            targets=[Target("t", "http://127.0.0.1:1/")],
        )
    refused = await ingress.handle("/hooks/github", github_headers(body, SECRET, "d-2"), body)
    published = await outbox.handle("events", {"X-Event-Type": "invoice.paid"}, body)
    for result in (refused, published):
        assert result.status == 503
        assert result.headers["X-Sidecar-Error"] == "store_unavailable"


async def _event(store: SqliteStore, dedup: str | None, n: int) -> Accepted:
    return await store.accept(
        direction=Direction.inbound,
        source="github",
        event_type="push",
        headers=[("x-n", str(n))],
        body=b'{"n": %d}' % n,
        targets=[Target("t", "http://127.0.0.1:1/t"), Target(SUBSCRIPTION, "")],
        dedup_id=dedup,
        dedup_window=10.0,
    )


async def test_events_written_in_one_turn_keep_dedup_order_and_content(tmp_path: Path) -> None:
    """Events that arrive together are written together (one writer turn): a redelivery
    within the turn or after it is still the first event, nothing else is merged."""
    now = [1000.0]
    store = await SqliteStore.open(tmp_path / "data", clock=lambda: now[0])
    try:
        first = await _event(store, "d-0", 0)
        # 40 at once: one turn. d-0 again (an earlier turn), d-1 three times in this one.
        ids = ["d-0", "d-1", "d-1", *(f"e-{n}" for n in range(36)), "d-1", None]
        results = await asyncio.gather(*(_event(store, d, n) for n, d in enumerate(ids)))
        assert results[0] == Accepted(first.message_id, duplicate=True)
        assert not results[1].duplicate
        assert [results[i] for i in (2, 39)] == [Accepted(results[1].message_id, True)] * 2
        fresh = [r for r in results if not r.duplicate]
        assert len({r.message_id for r in fresh}) == len(fresh) == 38
        # Past the window the same id is a new event.
        now[0] += 11
        again = await _event(store, "d-0", 99)
        assert not again.duplicate and again.message_id != first.message_id
        # Each stored event has its own headers, body and deliveries, in arrival order.
        view = await store.message(results[3].message_id)
        assert view is not None and view.event_type == "push"
        assert [(d.endpoint, d.status) for d in view.deliveries] == [
            ("t", DeliveryStatus.pending),
            (SUBSCRIPTION, DeliveryStatus.pending),
        ]
        pending = await store.pending("github", None, 100)
        assert [p.message_id for p in pending] == [
            first.message_id,
            *(r.message_id for r in fresh),
            again.message_id,
        ]
        assert pending[2].headers == [("x-n", "3")] and pending[2].body == b'{"n": 3}'
        # Attempts that end together are recorded together, each with its own outcome.
        due = await store.claim(limit=4, per_endpoint=4)
        assert len(due) == 4
        ok = Attempt(at=now[0], status_code=200, error=None, duration=0.1)
        failed = Attempt(at=now[0], status_code=500, error=None, duration=0.1)
        gone = Attempt(at=now[0], status_code=410, error=None, duration=0.1)
        await asyncio.gather(
            store.finish(due[0], ok, Outcome.delivered),
            store.finish(due[1], failed, Outcome.retry, now[0] + 5),
            store.finish(due[2], failed, Outcome.dead),
            store.finish(due[3], gone, Outcome.gone),
        )
        views = [await store.message(d.message_id) for d in due]
        got = [
            (v.deliveries[0].status, v.deliveries[0].next_attempt, v.deliveries[0].last_error)
            for v in views
            if v is not None
        ]
        assert got == [
            (DeliveryStatus.delivered, None, None),
            (DeliveryStatus.pending, now[0] + 5, "HTTP 500"),
            (DeliveryStatus.dead, None, "HTTP 500"),
            (DeliveryStatus.pending, now[0], "HTTP 410"),
        ]
        assert all(v is not None and len(v.deliveries[0].attempts) == 1 for v in views)
        overview = await store.overview()
        [t] = [e for e in overview.endpoints if e.endpoint == "t"]
        assert (t.successes, t.failures, t.dead, t.disabled) == (1, 3, 1, True)
    finally:
        await store.close()


async def test_an_attempt_record_is_on_disk_once_finish_returns_alone_or_with_accepts(
    tmp_path: Path,
) -> None:
    """finish returns only once its record is committed, in a turn of its own or in the
    accepts' turn, and a store closed meanwhile writes it before its writer stops."""
    store = await SqliteStore.open(tmp_path / "data")

    def on_disk(message_id: str) -> str:
        with contextlib.closing(sqlite3.connect(tmp_path / "data" / DB_NAME)) as conn:
            row = conn.execute(
                "SELECT status FROM deliveries WHERE message_id = ? AND url != ''",
                (message_id,),
            ).fetchone()
        return str(row[0])

    try:
        for n in range(3):
            await _event(store, f"d-{n}", n)
        due = await store.claim(limit=3, per_endpoint=3)
        assert len(due) == 3
        ok = Attempt(at=1000.0, status_code=200, error=None, duration=0.1)
        # No accepts come: the record goes in a turn of its own.
        await asyncio.wait_for(store.finish(due[0], ok, Outcome.delivered), 10)
        assert on_disk(due[0].message_id) == "delivered"
        # An accept comes meanwhile: the record goes in its turn.
        _, fresh = await asyncio.wait_for(
            asyncio.gather(store.finish(due[1], ok, Outcome.delivered), _event(store, "d-9", 9)),
            10,
        )
        assert on_disk(due[1].message_id) == "delivered"
        assert on_disk(fresh.message_id) == "pending"
        # Closed while a record waits: it is written before the writer stops.
        waiting = asyncio.ensure_future(store.finish(due[2], ok, Outcome.delivered))
        await asyncio.sleep(0)
        await store.close()
        await asyncio.wait_for(waiting, 10)
        assert on_disk(due[2].message_id) == "delivered"
    finally:
        await store.close()


def test_the_acknowledgement_is_the_json_it_always_was() -> None:
    import json

    from sidecar.webhooks.answers import accepted
    from sidecar.webhooks.queue import new_message_id

    message_id = new_message_id(1000.0)
    for duplicate in (False, True):
        body = accepted(200, message_id, duplicate).body
        assert body == json.dumps({"id": message_id, "duplicate": duplicate}).encode()


async def test_a_turn_that_cannot_begin_fails_its_events_and_the_next_one_is_stored(
    store: SqliteStore, tmp_path: Path
) -> None:
    """Another process holds the write lock: the writer's BEGIN gives up (SQLite's busy
    timeout), every event waiting for that turn hears 503, none hangs; then intake goes on."""
    ingress = Ingress(inbound_policy("http://127.0.0.1:1/"), store=store)
    body = b'{"n": 1}'
    other = sqlite3.connect(tmp_path / "data" / DB_NAME, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        refused = await asyncio.wait_for(
            asyncio.gather(
                *(
                    ingress.handle("/hooks/github", github_headers(body, SECRET, f"d-{n}"), body)
                    for n in range(3)
                )
            ),
            30,
        )
        assert [r.status for r in refused] == [503] * 3
        other.execute("ROLLBACK")
    finally:
        other.close()
    ok = await ingress.handle("/hooks/github", github_headers(body, SECRET, "d-0"), body)
    assert ok.status == 200 and not ok.duplicate
