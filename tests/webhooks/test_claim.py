"""The SQLite queue's claim, which reads each endpoint's earliest deliveries off an
index and keeps its claims in memory: earliest first across endpoints behind a
backlog, per_endpoint held in flight, never the same delivery twice, disabled
endpoints skipped until enabled, claims released when the worker stops."""

from __future__ import annotations

import asyncio
import itertools

from sidecar.webhooks.queue import Attempt, Direction, Outcome, Target
from sidecar.webhooks.sqlite_store import SqliteStore

OK = Attempt(at=0.0, status_code=200, error=None, duration=0.0)


async def test_claim_keeps_order_limits_and_skips_what_is_in_flight(tmp_path) -> None:
    clock = itertools.count(1000.0, 0.001)
    store = await SqliteStore.open(tmp_path / "data", clock=lambda: next(clock))
    try:
        a, b = Target("a", "http://127.0.0.1:9/a"), Target("b", "http://127.0.0.1:9/b")
        # A backlog of 600 events to `a`, then 3 to `b`: due in that order.
        accepted = await asyncio.gather(
            *(_accept(store, [a if n < 600 else b], n) for n in range(603))
        )
        ids = dict(enumerate(accepted))
        first = await store.claim(limit=5, per_endpoint=2)
        assert [(d.endpoint, d.message_id) for d in first] == [
            ("a", ids[0]),
            ("a", ids[1]),
            ("b", ids[600]),
            ("b", ids[601]),
        ]
        # Both endpoints at their per_endpoint share: nothing more, nothing twice.
        assert await store.claim(limit=5, per_endpoint=2) == []
        await store.finish(first[0], OK, Outcome.delivered)
        [next_a] = await store.claim(limit=5, per_endpoint=2)
        assert next_a.message_id == ids[2]
        # A 410 disables `b`: its deliveries wait, `a`'s go on.
        gone = Attempt(at=0.0, status_code=410, error=None, duration=0.0)
        await store.finish(first[2], gone, Outcome.gone)
        await store.finish(first[3], OK, Outcome.delivered)
        claimed = await store.claim(limit=5, per_endpoint=4)
        assert {d.endpoint for d in claimed} == {"a"}
        assert [d.message_id for d in claimed] == [ids[3], ids[4]]
        # After a release (the worker stopped), in-flight ones are claimable again.
        await store.release_claims()
        again = await store.claim(limit=3, per_endpoint=4)
        assert [d.message_id for d in again] == [ids[1], ids[2], ids[3]]
        # Enabled again: `b`'s waiting deliveries come back, behind nothing of `a`'s.
        assert await store.enable("a", "b")
        claimed = await store.claim(limit=5, per_endpoint=4)
        assert [(d.endpoint, d.message_id) for d in claimed] == [
            ("a", ids[4]),
            ("b", ids[600]),
            ("b", ids[602]),
        ]
    finally:
        await store.close()


async def _accept(store: SqliteStore, targets: list[Target], n: int) -> str:
    accepted = await store.accept(
        direction=Direction.outbound,
        source="a",
        event_type="t",
        headers=[],
        body=b"%d" % n,
        targets=targets,
    )
    return accepted.message_id
