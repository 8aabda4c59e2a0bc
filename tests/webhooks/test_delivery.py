"""Store and delivery worker against real receivers on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import standardwebhooks
from aiohttp import web

from sidecar.webhooks.delivery import DeliveryWorker, compile_settings
from sidecar.webhooks.inbound import Ingress
from sidecar.webhooks.outbound import Outbox
from sidecar.webhooks.queue import (
    SUBSCRIPTION,
    DeliveryStatus,
    Direction,
    MessageStatus,
    Overview,
    Queue,
    Target,
)
from tests.helpers import eventually

from .conftest import Receiver, github_headers, webhooks

SECRET = "gh-secret"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

Start = Callable[..., Any]


@pytest.fixture
async def running() -> AsyncIterator[Callable[..., Any]]:
    """Starts a worker over a store with a policy's settings; stops them all at the end."""
    workers: list[DeliveryWorker] = []

    async def start(store: Queue, policy: Any, **kw: Any) -> DeliveryWorker:
        worker = DeliveryWorker(store, compile_settings(policy), **kw)
        await worker.start()
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        await worker.stop()


def inbound_policy(*targets: str, schedule: str = "[0s, 100ms, 100ms]") -> Any:
    return webhooks(
        f"""
        inbound:
          github:
            path: /hooks/github
            verify: {{type: github, secrets: [{SECRET}]}}
            retry: {{schedule: {schedule}, jitter: 0}}
            routes:
              - deliver_to: [{", ".join(targets)}]
        """
    )


async def test_fan_out_one_failing_target_never_blocks_or_duplicates_another(
    store: Queue, receiver: Start, running: Start
) -> None:
    bad: Receiver = await receiver((500, {}))
    good: Receiver = await receiver((200, {}))
    policy = inbound_policy(bad.url + "/events", good.url + "/events")
    ingress = Ingress(policy, store=store)
    await running(store, policy)
    body = b'{"action": "opened"}'
    spoofed = {**github_headers(body, SECRET, "d-1"), "X-Sidecar-Message-Id": "msg_spoofed"}
    result = await ingress.handle("/hooks/github", spoofed, body)
    assert result.status == 200 and result.message_id is not None

    async def settled() -> bool:
        view = await store.message(result.message_id or "")
        return view is not None and all(d.status != "pending" for d in view.deliveries)

    await eventually(settled, "both deliveries to settle")
    view = await store.message(result.message_id)
    assert view is not None
    by_url = {d.url: d for d in view.deliveries}
    failing, working = by_url[bad.url + "/events"], by_url[good.url + "/events"]
    assert failing.status is DeliveryStatus.dead
    assert [a.status_code for a in failing.attempts] == [500, 500, 500]
    assert working.status is DeliveryStatus.delivered
    assert [a.status_code for a in working.attempts] == [200]
    assert len(good.received) == 1 and len(bad.received) == 3
    headers, delivered = good.received[0]
    assert delivered == body
    assert headers["X-Github-Event"] == "push"  # the original event headers travel along
    assert headers.getall("X-Sidecar-Message-Id") == [result.message_id]
    overview = await store.overview()
    stats = {s.endpoint: s for s in overview.endpoints}
    assert (stats[bad.url + "/events"].dead, stats[bad.url + "/events"].failures) == (1, 3)
    assert stats[good.url + "/events"].successes == 1


async def test_retry_after_is_honoured(store: Queue, receiver: Start, running: Start) -> None:
    # The schedule's second attempt is an hour away: only Retry-After brings it in a second.
    target: Receiver = await receiver((503, {"Retry-After": "1"}), (200, {}))
    policy = inbound_policy(target.url, schedule="[0s, 1h]")
    await running(store, policy)
    body = b"{}"
    result = await Ingress(policy, store=store).handle(
        "/hooks/github", github_headers(body, SECRET, "d-2"), body
    )
    await eventually(lambda: len(target.received) == 2, "the retry after Retry-After")
    view = await store.message(result.message_id or "")

    async def delivered() -> bool:
        view = await store.message(result.message_id or "")
        return view is not None and view.deliveries[0].status is DeliveryStatus.delivered

    await eventually(delivered, "the delivery to be recorded")
    view = await store.message(result.message_id or "")
    assert view is not None
    assert [a.status_code for a in view.deliveries[0].attempts] == [503, 200]


OUTBOUND = """
outbound:
  events:
    signing: {{secrets: [{secret}]}}
    retry: {{schedule: [0s, 100ms, 100ms], jitter: 0}}
    endpoints:
      - {{name: gone, url: "{gone}", allow_private: true}}
      - {{name: fine, url: "{fine}", events: ["invoice.*"], allow_private: true}}
"""


async def test_410_disables_the_endpoint_until_enabled(
    store: Queue, receiver: Start, running: Start
) -> None:
    gone: Receiver = await receiver((410, {}), (200, {}))
    fine: Receiver = await receiver((200, {}))
    policy = webhooks(OUTBOUND.format(secret=WHSEC, gone=gone.url, fine=fine.url))
    outbox = Outbox(policy, store=store)
    await running(store, policy)
    first = await outbox.handle("events", {"X-Event-Type": "invoice.paid"}, b'{"n": 1}')
    assert first.status == 202
    await eventually(lambda: len(gone.received) == 1 and len(fine.received) == 1, "attempts")

    async def disabled() -> bool:
        stats = {s.endpoint: s for s in (await store.overview()).endpoints}
        return stats["gone"].disabled

    await eventually(disabled, "the 410 endpoint to be disabled")
    second = await outbox.handle("events", {}, b'{"type": "invoice.sent"}')
    await eventually(lambda: len(fine.received) == 2, "the second event at the live endpoint")
    assert len(gone.received) == 1  # nothing is sent to a disabled endpoint
    stats = {s.endpoint: s for s in (await store.overview()).endpoints}
    assert stats["gone"].depth == 2  # both wait, none lost

    assert await store.enable("events", "gone")
    await eventually(lambda: len(gone.received) == 3, "both waiting events after enable")
    ids = sorted(h["webhook-id"] for h, _ in gone.received[1:])
    assert ids == sorted([first.message_id, second.message_id])


async def test_outbound_deliveries_are_signed_per_standard_webhooks(
    store: Queue, receiver: Start, running: Start
) -> None:
    gone: Receiver = await receiver((200, {}))
    fine: Receiver = await receiver((200, {}))
    policy = webhooks(OUTBOUND.format(secret=WHSEC, gone=gone.url, fine=fine.url))
    await running(store, policy)
    body = b'{"type": "user.created", "data": {"id": 7}}'
    result = await Outbox(policy, store=store).handle("events", {}, body)
    await eventually(lambda: len(gone.received) == 1, "the delivery")
    headers, delivered = gone.received[0]
    assert delivered == body
    assert headers["webhook-id"] == result.message_id
    assert standardwebhooks.Webhook(WHSEC).verify(delivered, headers) == json.loads(body)
    assert fine.received == []  # its events: ["invoice.*"] does not take user.created


async def test_dead_letter_then_retry(store: Queue, receiver: Start, running: Start) -> None:
    target: Receiver = await receiver((500, {}))
    policy = inbound_policy(target.url)
    await running(store, policy)
    body = b"{}"
    result = await Ingress(policy, store=store).handle(
        "/hooks/github", github_headers(body, SECRET, "d-3"), body
    )

    async def status() -> DeliveryStatus:
        view = await store.message(result.message_id or "")
        assert view is not None
        return view.deliveries[0].status

    async def dead() -> bool:
        return await status() is DeliveryStatus.dead

    await eventually(dead, "the delivery to be dead")
    assert len(target.received) == 3
    # What the console lists (None: a Redis queue keeps no index of them, test_redis_store).
    letters = await store.dead_letters()
    if letters is not None:
        assert [(d.message_id, d.last_error) for d in letters] == [(result.message_id, "HTTP 500")]
    target.answers = [(200, {})]
    assert await store.retry(result.message_id or "") == 1
    await eventually(lambda: len(target.received) == 4, "the retried delivery")

    async def delivered() -> bool:
        return await status() is DeliveryStatus.delivered

    await eventually(delivered, "the retried delivery to be recorded")
    assert await store.retry("msg_unknown") is None


async def test_redelivery_is_answered_but_not_delivered_twice(
    store: Queue, receiver: Start, running: Start
) -> None:
    target: Receiver = await receiver((200, {}))
    policy = inbound_policy(target.url)
    ingress = Ingress(policy, store=store)
    await running(store, policy)
    body = b'{"a": 1}'
    first = await ingress.handle("/hooks/github", github_headers(body, SECRET, "same"), body)
    again = await ingress.handle("/hooks/github", github_headers(body, SECRET, "same"), body)
    other = await ingress.handle("/hooks/github", github_headers(body, SECRET, "other"), body)
    assert (first.status, again.status) == (200, 200)
    assert (again.duplicate, again.message_id) == (True, first.message_id)
    assert other.message_id != first.message_id
    await eventually(lambda: len(target.received) == 2, "two distinct deliveries")
    assert sorted(target.header("X-Sidecar-Message-Id")) == sorted(
        [first.message_id, other.message_id]
    )


async def test_refusals_unrouted_events_and_what_is_logged(
    store: Queue, caplog: pytest.LogCaptureFixture
) -> None:
    policy = webhooks(
        f"""
        inbound:
          github:
            path: /hooks/github
            verify: {{type: github, secrets: [{SECRET}]}}
            max_body: 64
            routes:
              - match: {{event: {{one_of: [issues, pull_request]}}}}
                deliver_to: http://127.0.0.1:9/x
        """
    )
    ingress = Ingress(policy, store=store)
    body = b'{"secret-looking": "body"}'
    caplog.set_level(logging.DEBUG)
    bad = await ingress.handle("/hooks/github", github_headers(body, "wrong", "d"), body)
    assert bad.status == 401 and bad.headers["X-Sidecar-Error"] == "unauthenticated"
    assert json.loads(bad.body)["reason"] == "unauthenticated"
    missing = await ingress.handle("/hooks/github", {}, body)
    assert missing.status == 401
    big = b"{" + b" " * 64 + b"}"
    large = await ingress.handle("/hooks/github", github_headers(big, SECRET, "d"), big)
    assert large.status == 413 and large.headers["X-Sidecar-Error"] == "request_too_large"
    unknown = await ingress.handle("/hooks/nope", {}, body)
    assert unknown.status == 404 and unknown.headers["X-Sidecar-Error"] == "no_route"
    hook = ingress.hook_for("/hooks/github")
    assert hook is not None
    assert hook.counts == {"bad_signature": 1, "missing_signature": 1, "request_too_large": 1}
    assert SECRET not in caplog.text and "secret-looking" not in caplog.text

    push = await ingress.handle("/hooks/github", github_headers(body, SECRET, "p", "push"), body)
    assert push.status == 200
    view = await store.message(push.message_id or "")
    assert view is not None and view.status is MessageStatus.unrouted and view.deliveries == []
    assert (await store.overview()).unrouted == {"github": 1}


async def test_a_hanging_target_cannot_take_every_delivery_slot(
    store: Queue, receiver: Start, running: Start, upstream: Start
) -> None:
    release = asyncio.Event()
    hanging_hits: list[bytes] = []

    async def hang(request: web.Request) -> web.Response:
        hanging_hits.append(await request.read())
        await release.wait()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/", hang)
    hanging = await upstream(app) + "/"
    good: Receiver = await receiver((200, {}))
    policy = webhooks(
        f"""
        inbound:
          a:
            path: /a
            verify: {{type: github, secrets: [{SECRET}]}}
            routes: [{{deliver_to: "{hanging}"}}]
          b:
            path: /b
            verify: {{type: github, secrets: [{SECRET}]}}
            routes: [{{deliver_to: "{good.url}"}}]
        """
    )
    ingress = Ingress(policy, store=store)
    # Ten events for the hanging target arrive first, then three for the good one.
    for n in range(10):
        body = b'{"n": %d}' % n
        await ingress.handle("/a", github_headers(body, SECRET, f"a{n}"), body)
    for n in range(3):
        body = b'{"n": %d}' % n
        await ingress.handle("/b", github_headers(body, SECRET, f"b{n}"), body)
    await running(store, policy, concurrency=4, per_endpoint=2)
    try:
        await eventually(lambda: len(good.received) == 3, "the good target's events")
        assert len(hanging_hits) == 2  # at most per_endpoint at once
    finally:
        release.set()
    await eventually(lambda: len(hanging_hits) == 10, "the hanging target's events, once freed")


async def test_slack_url_verification_is_answered_not_stored(store: Queue) -> None:
    policy = webhooks(
        """
        inbound:
          slack:
            path: /hooks/slack
            verify: {type: slack, secrets: [slack-secret]}
            routes: [{deliver_to: "http://127.0.0.1:9/x"}]
        """
    )
    body = b'{"token": "t", "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P",'
    body += b' "type": "url_verification"}'
    stamp = str(int(time.time()))
    signature = hmac.new(b"slack-secret", f"v0:{stamp}:".encode() + body, hashlib.sha256)
    headers = {
        "X-Slack-Request-Timestamp": stamp,
        "X-Slack-Signature": "v0=" + signature.hexdigest(),
    }
    result = await Ingress(policy, store=store).handle("/hooks/slack", headers, body)
    assert result.status == 200
    assert json.loads(result.body) == {
        "challenge": "3eZbrw1aBm2rZgRNFdxV2595E9CY3gmdALWMmHkvFXO7tYXAYM8P"
    }
    assert (await store.overview()) == Overview([], {})
    unsigned = await Ingress(policy, store=store).handle("/hooks/slack", {}, body)
    assert unsigned.status == 401


async def test_a_subscribed_event_waits_for_its_acknowledgement(store: Queue) -> None:
    """`subscribe: true`: no worker ever sends it; the subscriber reads and acknowledges."""

    async def accept(source: str, n: int) -> str:
        accepted = await store.accept(
            direction=Direction.inbound,
            source=source,
            event_type="push",
            headers=[("x-github-event", "push")],
            body=json.dumps({"n": n}).encode(),
            targets=[Target(SUBSCRIPTION, "")],
        )
        return accepted.message_id

    first, second = await accept("gh", 1), await accept("gh", 2)
    other = await accept("other", 3)
    assert await store.claim(10, 10) == []
    pending = await store.pending("gh", None, 10)
    assert [(p.message_id, p.body, p.event_type) for p in pending] == [
        (first, b'{"n": 1}', "push"),
        (second, b'{"n": 2}', "push"),
    ]
    assert pending[0].headers == [("x-github-event", "push")]
    after = await store.pending("gh", pending[0].delivery_id, 10)
    assert [p.message_id for p in after] == [second]
    # An admin retry never hands it to the delivery worker either.
    assert await store.retry(first) == 1
    assert await store.claim(10, 10) == []
    assert await store.ack("gh", second) == 2  # it and every earlier one
    assert await store.pending("gh", None, 10) == []
    assert await store.ack("gh", second) == 0
    assert await store.ack("gh", "msg_nope") is None
    assert await store.ack("gh", other) is None  # another webhook's event
    assert [p.message_id for p in await store.pending("other", None, 10)] == [other]
    view = await store.message(first)
    assert view is not None and view.deliveries[0].status is DeliveryStatus.delivered
    stats = {s.source: s for s in (await store.overview()).endpoints}
    assert (stats["gh"].successes, stats["gh"].depth, stats["other"].depth) == (2, 0, 1)


async def test_the_first_attempt_waits_for_the_schedules_first_delay(
    store: Queue, receiver: Start, running: Start
) -> None:
    target: Receiver = await receiver((200, {}))
    policy = inbound_policy(target.url + "/events", schedule="[300ms, 100ms]")
    await running(store, policy)
    body = b'{"action": "opened"}'
    result = await Ingress(policy, store=store).handle(
        "/hooks/github", github_headers(body, SECRET, "d-first"), body
    )
    await eventually(lambda: len(target.received) == 1, "the delivery after its first delay")

    async def recorded() -> bool:
        # The receiver answered; the attempt is written just after.
        found = await store.message(result.message_id or "")
        return found is not None and len(found.deliveries[0].attempts) == 1

    await eventually(recorded, "the attempt recorded")
    view = await store.message(result.message_id or "")
    assert view is not None
    [attempt] = view.deliveries[0].attempts
    assert attempt.due is not None and attempt.due - view.created >= 0.3 - 0.001
    assert attempt.at >= attempt.due - 0.001
