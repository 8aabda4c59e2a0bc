"""The pause step with a fake upstream and a fake clock: no waiting."""

from __future__ import annotations

import email.utils
import time
from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar.core.call import Call
from sidecar.core.problems import ProblemError, problem_response
from sidecar.core.state import StateStore
from sidecar.policy.loader import ServicePolicy
from sidecar.policy.models import Service
from sidecar.policy.positions import Position
from sidecar.steps.resilience.pause import Pause, build
from tests.steps.resilience.fakes import Clock, FakeReply, Upstream


def service(upstream: str = "http://127.0.0.1:9") -> ServicePolicy:
    # No rate_limit: the pause works on every service.
    spec = Service.model_validate({"upstream": upstream})
    return ServicePolicy(name="svc", prefix="/svc", spec=spec, position=Position("p.yaml", 1, 1))


def pause(clock: Clock, store: StateStore | None = None, upstream: str | None = None) -> Pause:
    state = (store or StateStore()).begin()
    step = build(service(*([upstream] if upstream else [])), state=state, clock=clock)
    state.commit()
    return step


def call(agent: str | None = None) -> Call:
    return Call(
        service="svc", method="GET", target="/", headers=CIMultiDict(), body=None, agent=agent
    )


async def refused(step: Pause, upstream: Upstream, agent: str | None = None) -> ProblemError:
    before = upstream.calls
    with pytest.raises(ProblemError) as info:
        await step(call(agent), upstream)
    assert upstream.calls == before, "a refused call must not reach the upstream"
    return info.value


async def test_upstream_429_with_retry_after_passes_through_then_pauses_the_service() -> None:
    clock, upstream = Clock(), Upstream()
    step = pause(clock)
    upstream.reply = FakeReply(429, {"Retry-After": "30"})
    reply = await step(call("a"), upstream)
    assert reply is upstream.reply
    upstream.reply = FakeReply(200)
    err = await refused(step, upstream, "b")  # the pause is service-wide, every agent waits
    assert err.reason == "rate_limited" and err.status == 429
    assert err.retry_after == pytest.approx(30.0)
    assert "answered 429" in err.detail
    clock.now += 29.9
    await refused(step, upstream, "a")
    clock.now += 0.1
    await step(call("a"), upstream)


async def test_upstream_503_pauses_with_503_upstream_paused_and_retry_after() -> None:
    clock, upstream = Clock(), Upstream()
    step = pause(clock)
    upstream.reply = FakeReply(503, {"Retry-After": "2"})
    await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.reason == "upstream_paused" and err.status == 503
    response = problem_response(err)
    assert response.status == 503
    assert response.headers["Retry-After"] == "2"
    assert response.headers["X-Sidecar-Error"] == "upstream_paused"


async def test_upstream_503_with_an_http_date_pauses_until_that_date() -> None:
    clock, upstream = Clock(), Upstream()
    step = pause(clock)
    when = email.utils.formatdate(time.time() + 120, usegmt=True)
    upstream.reply = FakeReply(503, {"Retry-After": when})
    await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.retry_after is not None and 110 < err.retry_after <= 120
    assert "answered 503" in err.detail


async def test_pause_is_capped_at_ten_minutes() -> None:
    clock, upstream = Clock(), Upstream()
    step = pause(clock)
    upstream.reply = FakeReply(429, {"Retry-After": "86400"})
    await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.retry_after == pytest.approx(600.0)


@pytest.mark.parametrize(
    "reply",
    [FakeReply(429), FakeReply(503, {"Retry-After": "soon"}), FakeReply(500, {"Retry-After": "9"})],
)
async def test_no_pause_without_a_usable_retry_after_on_429_or_503(reply: FakeReply) -> None:
    clock, upstream = Clock(), Upstream()
    step = pause(clock)
    upstream.reply = reply
    await step(call(), upstream)
    await step(call(), upstream)
    assert upstream.calls == 2


async def test_reload_keeps_a_running_pause_unless_the_upstream_changed() -> None:
    clock, upstream, store = Clock(), Upstream(), StateStore()
    step = pause(clock, store)
    upstream.reply = FakeReply(503, {"Retry-After": "60"})
    await step(call(), upstream)
    upstream.reply = FakeReply(200)
    await refused(pause(clock, store), upstream)
    await pause(clock, store, upstream="http://127.0.0.1:10")(call(), upstream)
    assert upstream.calls == 2


def limited(clock: Clock, limits: dict[str, Any]) -> Pause:
    spec = Service.model_validate({"upstream": "http://127.0.0.1:9", "limits": limits})
    svc = ServicePolicy(name="svc", prefix="/svc", spec=spec, position=Position("p.yaml", 1, 1))
    state = StateStore().begin()
    step = build(svc, state=state, clock=clock)
    state.commit()
    return step


OPENAI_LIMITS = {
    "retry_after": ["retry-after-ms", "retry-after"],
    "quota": [
        {"remaining": "x-ratelimit-remaining-requests", "reset": "x-ratelimit-reset-requests"},
        {"remaining": "x-ratelimit-remaining-tokens", "reset": "x-ratelimit-reset-tokens"},
    ],
}


async def test_retry_after_ms_is_read_first_and_counts_milliseconds() -> None:
    clock, upstream = Clock(), Upstream()
    step = limited(clock, OPENAI_LIMITS)
    upstream.reply = FakeReply(429, {"retry-after-ms": "2500", "retry-after": "60"})
    await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.retry_after == pytest.approx(2.5)
    assert "(retry-after-ms)" in err.detail


async def test_a_429_with_only_a_used_up_quota_pauses_until_its_reset() -> None:
    clock, upstream = Clock(), Upstream()
    step = limited(clock, OPENAI_LIMITS)
    upstream.reply = FakeReply(
        429,
        {
            "x-ratelimit-remaining-requests": "12",
            "x-ratelimit-reset-requests": "1s",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": "6m0s",
        },
    )
    await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.reason == "rate_limited"
    assert err.retry_after == pytest.approx(360.0)
    assert "x-ratelimit-remaining-tokens: 0" in err.detail


async def test_a_403_reporting_zero_remaining_pauses_until_the_epoch_reset() -> None:
    # GitHub: a used-up primary limit answers 403 with x-ratelimit-reset in Unix seconds.
    clock, upstream = Clock(), Upstream()
    step = limited(
        clock, {"quota": [{"remaining": "x-ratelimit-remaining", "reset": "x-ratelimit-reset"}]}
    )
    reset = str(int(time.time()) + 45)
    upstream.reply = FakeReply(403, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": reset})
    await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.status == 429 and err.retry_after is not None and 40 < err.retry_after <= 45
    assert "answered 403 and reported a limit used up (x-ratelimit-remaining: 0)" in err.detail


@pytest.mark.parametrize(
    "reply",
    [
        # A 403 that is about permissions: quota left.
        FakeReply(403, {"x-ratelimit-remaining": "10", "x-ratelimit-reset": "30"}),
        # Some providers send -1 for "unknown".
        FakeReply(429, {"x-ratelimit-remaining": "-1", "x-ratelimit-reset": "30"}),
        # A success reporting 0 left: only with `early`.
        FakeReply(200, {"x-ratelimit-remaining": "0", "x-ratelimit-reset": "30"}),
    ],
)
async def test_no_quota_pause_unless_a_refusal_reports_zero(reply: FakeReply) -> None:
    clock, upstream = Clock(), Upstream()
    step = limited(
        clock, {"quota": [{"remaining": "x-ratelimit-remaining", "reset": "x-ratelimit-reset"}]}
    )
    upstream.reply = reply
    await step(call(), upstream)
    await step(call(), upstream)
    assert upstream.calls == 2


async def test_early_pauses_on_a_success_that_reports_zero_left() -> None:
    clock, upstream = Clock(), Upstream()
    step = limited(
        clock,
        {
            "quota": [{"remaining": "RateLimit-Remaining", "reset": "RateLimit-Reset"}],
            "early": True,
        },
    )
    upstream.reply = FakeReply(200, {"RateLimit-Remaining": "0", "RateLimit-Reset": "20"})
    await step(call(), upstream)
    err = await refused(step, upstream)
    assert err.retry_after == pytest.approx(20.0)
