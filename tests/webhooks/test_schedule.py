"""The retry schedule and jitter, with an injected clock: no sleeps."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.webhooks.delivery import DeliveryWorker, compile_settings, retry_after_seconds
from sidecar.webhooks.outbound import Outbox
from sidecar.webhooks.queue import DeliveryStatus, Outcome
from sidecar.webhooks.sqlite_store import SqliteStore

from .conftest import Receiver, webhooks

WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_attempts_follow_the_schedule_with_jitter_then_dead_letter(
    tmp_path: Path, receiver: Callable[..., Any]
) -> None:
    target: Receiver = await receiver((500, {}))
    policy = webhooks(
        f"""
        outbound:
          events:
            signing: {{secrets: [{WHSEC}]}}
            retry: {{schedule: [0s, 10s, 5m], jitter: 0.5}}
            endpoints: [{{name: one, url: "{target.url}", allow_private: true}}]
        """
    )
    clock = Clock()
    store = await SqliteStore.open(tmp_path, clock=clock)
    # rand() = 1.0: the largest jitter, +50 %.
    outcomes: list[Outcome] = []
    worker = DeliveryWorker(
        store,
        compile_settings(policy),
        clock=clock,
        rand=lambda: 1.0,
        on_attempt=lambda due, attempt, outcome: outcomes.append(outcome),
    )
    try:
        message_id = (await Outbox(policy, store=store).handle("events", {}, b"{}")).message_id
        assert await worker.run_once() == 1
        clock.now += 14.9  # 10 s + 50 % is 15 s: not yet due
        assert await worker.run_once() == 0
        clock.now += 0.1
        assert await worker.run_once() == 1
        clock.now += 449.9  # 5 min + 50 %
        assert await worker.run_once() == 0
        clock.now += 0.1
        assert await worker.run_once() == 1
        clock.now += 86400
        assert await worker.run_once() == 0  # the schedule is spent: dead, not retried
        view = await store.message(message_id or "")
        assert view is not None
        delivery = view.deliveries[0]
        assert delivery.status is DeliveryStatus.dead
        assert [a.at - view.created for a in delivery.attempts] == [0.0, 15.0, 465.0]
        assert delivery.last_error == "HTTP 500"
        assert len(target.received) == 3
        assert outcomes == [Outcome.retry, Outcome.retry, Outcome.dead]
    finally:
        await worker.stop()
        await store.close()


def test_retry_after_forms() -> None:
    assert retry_after_seconds("120", 0) == 120
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470) == 10
    assert retry_after_seconds("soon", 0) is None
    assert retry_after_seconds(None, 0) is None
    assert retry_after_seconds("99999999", 0) == 86400


async def test_the_first_delay_of_the_schedule_is_waited_too(
    tmp_path: Path, receiver: Callable[..., Any]
) -> None:
    target: Receiver = await receiver((200, {}))
    policy = webhooks(
        f"""
        outbound:
          events:
            signing: {{secrets: [{WHSEC}]}}
            retry: {{schedule: [2s, 10s], jitter: 0.5}}
            endpoints: [{{name: one, url: "{target.url}", allow_private: true}}]
        """
    )
    clock = Clock()
    store = await SqliteStore.open(tmp_path, clock=clock)
    worker = DeliveryWorker(store, compile_settings(policy), clock=clock)
    try:
        await Outbox(policy, store=store).handle("events", {}, b"{}")
        assert await worker.run_once() == 0
        clock.now += 1.9
        assert await worker.run_once() == 0
        clock.now += 0.1
        assert await worker.run_once() == 1
        assert len(target.received) == 1
    finally:
        await worker.stop()
        await store.close()
