"""The rate limiter step with a fake upstream, a fake clock and a fake sleep: no waiting."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar.core.call import Call
from sidecar.core.headers import retry_after_seconds
from sidecar.core.problems import ProblemError, problem_response
from sidecar.core.state import StateStore
from sidecar.engines import limits
from sidecar.policy.loader import ServicePolicy
from sidecar.policy.models import Service
from sidecar.policy.positions import Position
from sidecar.steps.resilience import pause
from sidecar.steps.resilience.ratelimit import RateLimiter, build
from tests.steps.resilience.fakes import Clock, Upstream


class Sleeps:
    """A fake asyncio.sleep: records each delay; blocks while `gate` is closed."""

    def __init__(self) -> None:
        self.delays: list[float] = []
        self.gate: asyncio.Event | None = None
        self.slept = asyncio.Event()

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)
        self.slept.set()
        if self.gate is not None:
            await self.gate.wait()


def service(*limits: dict[str, Any]) -> ServicePolicy:
    spec = Service.model_validate({"upstream": "http://127.0.0.1:9", "rate_limit": list(limits)})
    return ServicePolicy(name="svc", prefix="/svc", spec=spec, position=Position("p.yaml", 1, 1))


def limiter(
    *limits: dict[str, Any],
    clock: Clock,
    sleeps: Sleeps | None = None,
    store: StateStore | None = None,
) -> RateLimiter:
    state = (store or StateStore()).begin()
    step = build(service(*limits), state=state, clock=clock, sleep=sleeps or Sleeps())
    state.commit()
    assert step is not None
    return step


def call(agent: str | None = None) -> Call:
    return Call(
        service="svc", method="GET", target="/", headers=CIMultiDict(), body=None, agent=agent
    )


async def refused(step: RateLimiter, upstream: Upstream, agent: str | None = None) -> ProblemError:
    before = upstream.calls
    with pytest.raises(ProblemError) as info:
        await step(call(agent), upstream)
    assert upstream.calls == before, "a refused call must not reach the upstream"
    return info.value


async def test_no_rate_limit_builds_no_step() -> None:
    assert build(service(), state=StateStore().begin()) is None


async def test_burst_then_refused_until_a_token_refills() -> None:
    clock, upstream = Clock(), Upstream()
    step = limiter({"rate": "2/s", "burst": 3}, clock=clock)
    for _ in range(3):
        await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.reason == "rate_limited" and err.status == 429
    assert err.retry_after == pytest.approx(0.5)
    assert err.headers == {
        "RateLimit-Limit": "3",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "1",
    }
    assert "svc" in err.detail and "Retry after 1 second." in err.detail
    assert "not the upstream" in err.detail

    clock.now += 0.5
    await step(call(), upstream)
    assert upstream.calls == 4
    await refused(step, upstream)


async def test_refusal_renders_as_problem_json_with_retry_after() -> None:
    clock, upstream = Clock(), Upstream()
    step = limiter({"rate": "6/min", "burst": 1}, clock=clock)
    await step(call(), upstream)
    response = problem_response(await refused(step, upstream))
    assert response.status == 429
    assert response.content_type == "application/problem+json"
    assert response.headers["Retry-After"] == "10"
    assert response.headers["X-Sidecar-Error"] == "rate_limited"
    assert response.headers["RateLimit-Reset"] == "10"


@pytest.mark.parametrize(("rate", "burst"), [("10/s", 10), ("600/min", 10), ("30/min", 1)])
async def test_default_burst_is_one_seconds_worth_and_at_least_one(rate: str, burst: int) -> None:
    clock, upstream = Clock(), Upstream()
    step = limiter({"rate": rate}, clock=clock)
    for _ in range(burst):
        await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.headers is not None and err.headers["RateLimit-Limit"] == str(burst)


async def test_bucket_never_fills_beyond_burst() -> None:
    clock, upstream = Clock(), Upstream()
    step = limiter({"rate": "1/s", "burst": 2}, clock=clock)
    clock.now += 3600
    await step(call(), upstream)
    await step(call(), upstream)
    await refused(step, upstream)


async def test_per_agent_buckets_are_separate_and_anonymous_calls_share_one() -> None:
    clock, upstream = Clock(), Upstream()
    step = limiter({"rate": "1/min", "burst": 2, "per": "agent"}, clock=clock)
    for _ in range(2):
        await step(call("alice"), upstream)
    err = await refused(step, upstream, "alice")
    assert "each agent" in err.detail
    await step(call("bob"), upstream)
    await step(call(None), upstream)
    await step(call(None), upstream)
    await refused(step, upstream, None)
    await step(call("bob"), upstream)


async def test_per_agent_buckets_are_bounded_least_recently_seen_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(limits, "MAX_AGENTS", 2)
    clock, upstream = Clock(), Upstream()
    step = limiter({"rate": "1/h", "burst": 1, "per": "agent"}, clock=clock)
    await step(call("a"), upstream)
    await step(call("b"), upstream)
    await refused(step, upstream, "a")  # a is now the most recently seen
    await step(call("c"), upstream)  # a third agent: b, the least recent, is forgotten
    await refused(step, upstream, "a")
    await step(call("b"), upstream)


async def test_every_limit_applies_and_a_refusal_spends_no_other_token() -> None:
    clock, upstream = Clock(), Upstream()
    step = limiter(
        {"rate": "1/h", "burst": 3},
        {"rate": "1/h", "burst": 1, "per": "agent"},
        clock=clock,
    )
    await step(call("a"), upstream)
    for _ in range(5):
        err = await refused(step, upstream, "a")
        assert "each agent" in err.detail
    # Agent a's refusals spent nothing from the service bucket: two tokens are left.
    await step(call("b"), upstream)
    await step(call("c"), upstream)
    err = await refused(step, upstream, "d")
    assert "all agents together" in err.detail


async def test_max_wait_queues_in_arrival_order_then_refuses() -> None:
    clock, upstream, sleeps = Clock(), Upstream(), Sleeps()
    step = limiter({"rate": "1/s", "burst": 1, "max_wait": "3s"}, clock=clock, sleeps=sleeps)
    for _ in range(4):
        await step(call(), upstream)
    # Each queued call sleeps until its own token exists: first come, first served.
    assert sleeps.delays == pytest.approx([1.0, 2.0, 3.0])
    assert upstream.calls == 4
    err = await refused(step, upstream)
    assert err.retry_after == pytest.approx(4.0)


async def test_a_call_cancelled_while_queued_gives_its_token_back() -> None:
    clock, upstream, sleeps = Clock(), Upstream(), Sleeps()
    step = limiter({"rate": "1/s", "burst": 1, "max_wait": "5s"}, clock=clock, sleeps=sleeps)
    await step(call(), upstream)
    sleeps.gate = asyncio.Event()
    waiting = asyncio.create_task(step(call(), upstream))
    await sleeps.slept.wait()
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    sleeps.gate.set()
    await step(call(), upstream)
    # The next caller waits one second, not two: the abandoned reservation was returned.
    assert sleeps.delays == pytest.approx([1.0, 1.0])
    assert upstream.calls == 2


async def test_a_call_queued_when_the_upstream_asks_for_a_pause_is_refused_after_its_wait() -> None:
    clock, upstream, sleeps, store = Clock(), Upstream(), Sleeps(), StateStore()
    state = store.begin()
    svc = service({"rate": "1/s", "burst": 1, "max_wait": "5s"})
    step = build(svc, state=state, clock=clock, sleep=sleeps)
    paused = pause.build(svc, state=state, clock=clock)
    state.commit()
    assert step is not None
    await step(call(), upstream)
    sleeps.gate = asyncio.Event()
    waiting = asyncio.create_task(step(call(), upstream))
    await sleeps.slept.wait()
    # While the call waits for its token, another call's answer starts a pause.
    paused.observe(429, {"Retry-After": "30"})
    clock.now += 1.0
    sleeps.gate.set()
    with pytest.raises(ProblemError) as info:
        await waiting
    assert info.value.reason == "rate_limited"
    assert upstream.calls == 1
    # Its token was given back: once the pause is over, the next call needs no wait.
    clock.now += 30.0
    sleeps.gate = None
    await step(call(), upstream)
    assert sleeps.delays == pytest.approx([1.0])


def test_retry_after_parsing() -> None:
    assert retry_after_seconds("12", 0.0) == 12.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412470.0) == 10.0
    assert retry_after_seconds("-3", 0.0) is None
    assert retry_after_seconds("tomorrow", 0.0) is None


async def test_reload_with_the_same_limit_keeps_the_bucket_a_changed_one_starts_full() -> None:
    clock, upstream, store = Clock(), Upstream(), StateStore()
    step = limiter({"rate": "1/h", "burst": 1}, clock=clock, store=store)
    await step(call(), upstream)
    await refused(step, upstream)
    again = limiter({"rate": "1/h", "burst": 1}, clock=clock, store=store)
    await refused(again, upstream)
    changed = limiter({"rate": "1/h", "burst": 2}, clock=clock, store=store)
    await changed(call(), upstream)
    await changed(call(), upstream)
    await refused(changed, upstream)
