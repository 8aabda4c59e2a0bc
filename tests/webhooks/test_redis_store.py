"""The Redis Streams queue against a real redis-server.

Every delivery test of test_delivery.py runs here again on a RedisStore (the
`store` fixture is overridden), so both backends keep one contract. Then
what only Redis does: several replicas on one queue, and a replica that dies
with deliveries in flight, whose entries another replica takes over.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sidecar.webhooks.inbound import Ingress
from sidecar.webhooks.outbound import Outbox
from sidecar.webhooks.queue import (
    SUBSCRIPTION,
    Attempt,
    DeliveryStatus,
    Direction,
    Outcome,
    Target,
)
from sidecar.webhooks.redis_store import RedisStore
from tests.helpers import eventually
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401

from .conftest import Receiver, github_headers, webhooks
from .test_delivery import *  # noqa: F403  (the same tests, on Redis)
from .test_delivery import OUTBOUND, SECRET, WHSEC, inbound_policy


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    opened = await RedisStore.open(redis_server.url, prefix="t")
    yield opened
    await opened.close()


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[Any]:
    """Opens RedisStores on one queue, as separate sidecars would; closes them all."""
    opened: list[RedisStore] = []

    async def open_one(**kw: Any) -> RedisStore:
        replica = await RedisStore.open(redis_server.url, prefix="shared", **kw)
        opened.append(replica)
        return replica

    yield open_one
    for replica in opened:
        await replica.close()


async def test_replicas_share_one_queue_and_one_dedup_window(replicas, receiver, running) -> None:
    target: Receiver = await receiver((200, {}))
    policy = inbound_policy(target.url + "/events")
    a, b = await replicas(), await replicas()
    # A only receives; B only delivers.
    await running(b, policy)
    body = b'{"action": "opened"}'
    first = await Ingress(policy, store=a).handle(
        "/hooks/github", github_headers(body, SECRET, "d-1"), body
    )
    # GitHub redelivers to the other replica behind the load balancer: still one event.
    again = await Ingress(policy, store=b).handle(
        "/hooks/github", github_headers(body, SECRET, "d-1"), body
    )
    assert first.status == again.status == 200
    assert again.duplicate and again.message_id == first.message_id
    await eventually(lambda: len(target.received) == 1, "the event delivered by replica B")
    assert target.header("X-Sidecar-Message-Id") == [first.message_id]

    async def recorded() -> bool:
        # The receiver has it before B records the attempt: wait for the record too.
        view = await a.message(first.message_id or "")
        return view is not None and view.deliveries[0].status is DeliveryStatus.delivered

    await eventually(recorded, "the delivery recorded as delivered, seen from replica A")


async def test_a_dead_replicas_deliveries_are_taken_over(replicas, receiver, running) -> None:
    target: Receiver = await receiver((200, {}))
    policy = webhooks(OUTBOUND.format(secret=WHSEC, gone=target.url, fine=target.url))
    crashed = await replicas()
    outbox = Outbox(policy, store=crashed)
    ids = set()
    for n in range(5):
        result = await outbox.handle("events", {"X-Event-Type": "invoice.paid"}, b'{"n": %d}' % n)
        assert result.status == 202
        ids.add(result.message_id)
    # The replica takes its deliveries (2 endpoints x 5 events) and dies before any attempt:
    # no finish, no release, its connection just goes.
    taken = await crashed.claim(100, 100)
    assert len(taken) == 10
    await crashed.close()
    survivor = await replicas(claim_idle=0.2)
    await running(survivor, policy)
    await eventually(lambda: len(target.received) == 10, "all 10 deliveries made by the survivor")
    assert {h for h in target.header("webhook-id")} == ids

    async def recorded() -> bool:
        # The receiver has the last one before its attempt is recorded: wait for that too.
        overview = await survivor.overview()
        return {(s.endpoint, s.successes, s.depth) for s in overview.endpoints} == {
            ("gone", 5, 0),
            ("fine", 5, 0),
        }

    await eventually(recorded, "every delivery recorded as delivered")
    # Nothing is left in anyone's pending list.
    redis = survivor._redis
    assert (await redis.xpending("shared:due", "deliverers"))["pending"] == 0


async def test_a_slow_delivery_is_not_taken_from_a_live_replica(
    replicas, receiver, running, upstream
) -> None:
    import asyncio

    from aiohttp import web

    seen: list[str] = []

    async def slow(request: web.Request) -> web.Response:
        seen.append(request.headers["X-Sidecar-Message-Id"])
        await asyncio.sleep(1.0)  # longer than claim_idle: the replica must keep it alive
        return web.Response()

    app = web.Application()
    app.router.add_post("/events", slow)
    url = await upstream(app)
    policy = inbound_policy(url + "/events", schedule="[0s, 1h]")
    a = await replicas(claim_idle=0.3)
    b = await replicas(claim_idle=0.3)
    await running(a, policy)
    await running(b, policy)
    body = b"{}"
    result = await Ingress(policy, store=a).handle(
        "/hooks/github", github_headers(body, SECRET, "d-9"), body
    )

    async def delivered() -> bool:
        view = await a.message(result.message_id or "")
        return view is not None and view.deliveries[0].status is DeliveryStatus.delivered

    await eventually(delivered, "the slow delivery recorded")
    assert seen == [result.message_id]


async def test_delivered_messages_expire_after_the_retention(
    replicas, receiver, running, redis_server
) -> None:
    target: Receiver = await receiver((200, {}))
    policy = inbound_policy(target.url + "/events")
    replica = await replicas(retention=0.5)
    await running(replica, policy)
    body = b"{}"
    result = await Ingress(policy, store=replica).handle(
        "/hooks/github", github_headers(body, SECRET, "d-3"), body
    )
    await eventually(lambda: len(target.received) == 1, "the event delivered")

    async def gone() -> bool:
        return await replica.message(result.message_id or "") is None

    await eventually(gone, "the delivered message removed after its retention")
    keys = [k async for k in replica._redis.scan_iter("shared:*")]
    assert not [k for k in keys if b":msg:" in k or b":d:" in k], keys


async def test_an_acknowledged_subscription_expires_with_the_retention(
    store: RedisStore,
) -> None:
    store.configure(claim_idle=60.0, retention=0.2)
    accepted = await store.accept(
        direction=Direction.inbound,
        source="gh",
        event_type=None,
        headers=[],
        body=b"{}",
        targets=[Target(SUBSCRIPTION, "")],
    )
    assert await store.ack("gh", accepted.message_id) == 1

    async def gone() -> bool:
        return await store.message(accepted.message_id) is None

    await eventually(gone, "the acknowledged message removed after its retention")


async def test_dead_letters_are_not_listed_from_redis(store: RedisStore) -> None:
    """The console shows `dead_letters: null` for a Redis queue: it keeps no index of them."""
    assert await store.dead_letters() is None


async def test_attempts_that_end_together_are_each_recorded(store: RedisStore) -> None:
    """They go to Redis in one pipeline: each keeps its own outcome, and a delivered one
    is done while a retried one waits for its next attempt."""
    for n in range(4):
        await store.accept(
            direction=Direction.outbound,
            source="events",
            event_type="t",
            headers=[],
            body=b'{"n": %d}' % n,
            targets=[Target("e", "http://127.0.0.1:1/")],
        )
    due = await store.claim(4, 4)
    assert len(due) == 4
    now = time.time()
    ok = Attempt(at=now, status_code=200, error=None, duration=0.1)
    failed = Attempt(at=now, status_code=500, error=None, duration=0.1)
    await asyncio.gather(
        store.finish(due[0], ok, Outcome.delivered),
        store.finish(due[1], failed, Outcome.retry, now + 60),
        store.finish(due[2], failed, Outcome.dead),
        store.finish(due[3], ok, Outcome.delivered),
    )
    views = [await store.message(d.message_id) for d in due]
    assert [
        (v.deliveries[0].status, len(v.deliveries[0].attempts), v.deliveries[0].last_error)
        for v in views
        if v is not None
    ] == [
        (DeliveryStatus.delivered, 1, None),
        (DeliveryStatus.pending, 1, "HTTP 500"),
        (DeliveryStatus.dead, 1, "HTTP 500"),
        (DeliveryStatus.delivered, 1, None),
    ]
    [stats] = (await store.overview()).endpoints
    assert (stats.successes, stats.failures, stats.dead, stats.depth) == (2, 2, 1, 1)
    # Nothing is left in this replica's pending list but what waits for its retry.
    assert await store.claim(4, 4) == []


async def test_what_a_replica_holds_for_an_endpoint_that_answered_410_waits_for_enable(
    store: RedisStore,
) -> None:
    """Deliveries read while their endpoint was at its per_endpoint share are held as
    taken; a 410 meanwhile must park them with the endpoint, not attempt them."""
    ids = []
    for n in range(5):
        accepted = await store.accept(
            direction=Direction.outbound,
            source="events",
            event_type="t",
            headers=[],
            body=b'{"n": %d}' % n,
            targets=[Target("e", "http://127.0.0.1:1/")],
        )
        ids.append(accepted.message_id)
    [first] = await store.claim(5, 1)  # the other four are read and held
    assert first.message_id == ids[0]
    gone = Attempt(at=time.time(), status_code=410, error=None, duration=0.1)
    await store.finish(first, gone, Outcome.gone)
    assert await store.claim(5, 5) == []
    assert await store.enable("events", "e")
    again = await store.claim(5, 5)
    assert sorted(d.message_id for d in again) == sorted(ids)
