"""The circuit breaker: its state machine with a fake upstream and clock, then for real."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.core.call import Call
from sidecar.core.problems import ProblemError
from sidecar.policy.models import CircuitBreaker
from sidecar.steps.resilience.breaker import Breaker
from tests.steps.resilience.fakes import Clock


class FakeReply:
    def __init__(self, status: int) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = CIMultiDict()


class Upstream:
    """A fake `next`: answers each call with the next outcome (a status or a ProblemError)."""

    def __init__(self) -> None:
        self.calls = 0
        self.outcome: int | ProblemError = 200

    async def __call__(self, call: Call) -> Any:
        self.calls += 1
        if isinstance(self.outcome, ProblemError):
            raise self.outcome
        return FakeReply(self.outcome)


def _call() -> Call:
    return Call(
        service="svc", method="GET", target="/", headers=CIMultiDict(), body=None, agent=None
    )


def _breaker(clock: Clock, **config: Any) -> Breaker:
    defaults: dict[str, Any] = {
        "failure_ratio": 0.5,
        "min_requests": 4,
        "window": "10s",
        "open_for": "5s",
    }
    defaults.update(config)
    return Breaker(service="svc", config=CircuitBreaker.model_validate(defaults), clock=clock)


async def _send(breaker: Breaker, up: Upstream) -> int | str:
    """One call through the breaker: the status the caller gets, or the problem's reason."""
    try:
        reply = await breaker(_call(), up)
    except ProblemError as err:
        return err.reason
    return reply.status


async def test_stays_closed_until_min_requests_then_opens_on_the_ratio():
    clock, up = Clock(), Upstream()
    b = _breaker(clock)
    up.outcome = 503
    for _ in range(3):
        assert await _send(b, up) == 503
    assert b.state == "closed"  # 3 failures of 3, but min_requests is 4
    assert await _send(b, up) == 503
    assert b.state == "open"
    assert up.calls == 4


async def test_opens_only_at_the_failure_ratio():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, failure_ratio=0.6, min_requests=5)
    for outcome in (200, 200, 503, 503, 200, 503):
        up.outcome = outcome
        await _send(b, up)
    assert b.state == "closed"  # 3 of 6 failed: 0.5 < 0.6
    up.outcome = 503
    await _send(b, up)
    assert b.state == "closed"  # 4 of 7: 0.57
    await _send(b, up)
    assert b.state == "open"  # 5 of 8: 0.625


async def test_open_refuses_without_calling_the_upstream_and_says_when_to_come_back():
    clock, up = Clock(), Upstream()
    b = _breaker(clock)
    up.outcome = 500
    for _ in range(4):
        await _send(b, up)
    clock.now += 2
    with pytest.raises(ProblemError) as info:
        await b(_call(), up)
    err = info.value
    assert err.reason == "circuit_open"
    assert err.status == 503
    assert err.service == "svc"
    assert err.retry_after == pytest.approx(3.0)
    assert "svc" in err.detail and "retry in 3 second" in err.detail
    assert up.calls == 4


async def test_4xx_never_counts_as_a_failure():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=2)
    up.outcome = 404
    for _ in range(20):
        assert await _send(b, up) == 404
    assert b.state == "closed"
    assert b.failed == 0


async def test_wire_errors_and_statuses_count_only_as_configured():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=1, failure_ratio=0.5, on=["connect-error", 502])
    up.outcome = ProblemError("upstream_unreachable", "x", cause="reset")
    await _send(b, up)
    up.outcome = ProblemError("upstream_timeout", "x", cause="timeout")
    await _send(b, up)
    up.outcome = 500
    await _send(b, up)
    # Unlisted wire errors are not counted at all; an unlisted 500 is an answer.
    assert (b.state, b.failed, b.total) == ("closed", 0, 1)
    up.outcome = 502
    await _send(b, up)
    assert b.state == "open"

    b = _breaker(clock, min_requests=1, failure_ratio=1.0)
    up.outcome = ProblemError("upstream_unreachable", "x", cause="connect-error")
    await _send(b, up)
    assert b.state == "open"


async def test_old_calls_slide_out_of_the_window():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=4, window="10s")
    up.outcome = 503
    for _ in range(3):
        await _send(b, up)
    clock.now += 11  # the three failures are now outside the window
    await _send(b, up)
    assert b.state == "closed"
    assert (b.failed, b.total) == (1, 1)


async def test_half_open_probe_success_closes_with_a_fresh_window():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=2)
    up.outcome = 503
    await _send(b, up)
    await _send(b, up)
    assert b.state == "open"
    clock.now += 5
    up.outcome = 200
    assert await _send(b, up) == 200
    assert b.state == "closed"
    assert (b.failed, b.total) == (0, 0)
    up.outcome = 503
    await _send(b, up)
    assert b.state == "closed"  # one failure after closing is not enough


async def test_half_open_probe_failure_opens_again_for_open_for():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=1, failure_ratio=1.0, open_for="5s")
    up.outcome = 503
    await _send(b, up)
    clock.now += 6
    assert await _send(b, up) == 503  # the probe went through and failed
    assert b.state == "open"
    with pytest.raises(ProblemError) as info:
        await b(_call(), up)
    assert info.value.retry_after == pytest.approx(5.0)
    assert up.calls == 2


async def test_half_open_lets_only_the_allowed_probes_through_at_once():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=1, failure_ratio=1.0, half_open_requests=2)
    up.outcome = 503
    await _send(b, up)
    clock.now += 5
    gate = asyncio.Event()
    arrived = 0

    async def slow(call: Call) -> Any:
        nonlocal arrived
        arrived += 1
        await gate.wait()
        return FakeReply(200)

    probes = [asyncio.create_task(b(_call(), slow)) for _ in range(2)]
    await asyncio.sleep(0)
    assert b.state == "half_open"
    assert await _send(b, up) == "circuit_open"  # a third call while two probes are out
    gate.set()
    assert [r.status for r in await asyncio.gather(*probes)] == [200, 200]
    assert arrived == 2
    assert b.state == "closed"


async def test_a_cancelled_probe_frees_its_slot_without_deciding():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=1, failure_ratio=1.0)
    up.outcome = 503
    await _send(b, up)
    clock.now += 5

    async def hang(call: Call) -> Any:
        await asyncio.Event().wait()

    probe = asyncio.create_task(b(_call(), hang))
    await asyncio.sleep(0)
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    assert b.state == "half_open"
    up.outcome = 200
    assert await _send(b, up) == 200
    assert b.state == "closed"


async def test_a_slow_call_from_before_the_opening_cannot_close_it():
    clock, up = Clock(), Upstream()
    b = _breaker(clock, min_requests=2, failure_ratio=1.0)
    gate = asyncio.Event()

    async def slow(call: Call) -> Any:
        await gate.wait()
        return FakeReply(200)

    straggler = asyncio.create_task(b(_call(), slow))
    await asyncio.sleep(0)
    up.outcome = 503
    await _send(b, up)
    await _send(b, up)
    assert b.state == "open"
    gate.set()
    await straggler
    assert b.state == "open"


async def test_transitions_are_reported_to_hooks():
    clock, up = Clock(), Upstream()
    seen: list[tuple[str, str, str]] = []
    b = _breaker(clock, min_requests=1, failure_ratio=1.0)
    b.on_transition.append(lambda *t: seen.append(t))
    up.outcome = 503
    await _send(b, up)
    clock.now += 5
    up.outcome = 200
    await _send(b, up)
    assert seen == [
        ("svc", "closed", "open"),
        ("svc", "open", "half_open"),
        ("svc", "half_open", "closed"),
    ]
    assert b.transitions == {"closed->open": 1, "open->half_open": 1, "half_open->closed": 1}


# --- through the real sidecar, against a real flaky upstream -------------------------------


def flaky_app() -> tuple[web.Application, dict[str, Any]]:
    """Answers with `seen["status"]` (503 until a test says otherwise) and counts calls."""
    seen: dict[str, Any] = {"calls": 0, "status": 503}

    async def handle(request: web.Request) -> web.Response:
        seen["calls"] += 1
        return web.Response(status=seen["status"], text=f"upstream says {seen['status']}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, seen


POLICY = """
version: 1
services:
  flaky:
    upstream: {base}
    circuit_breaker:
      failure_ratio: 0.5
      min_requests: 3
      window: 30s
      open_for: 15s
      half_open_requests: 1
"""


async def test_breaker_opens_refuses_and_a_probe_closes_it(upstream, start_sidecar, client):
    app, seen = flaky_app()
    base = await upstream(app)
    sc = await start_sidecar(POLICY.format(base=base))
    clock = Clock()
    (breaker,) = sc.sidecar.state.find("flaky", "breaker")
    breaker.clock = clock

    for _ in range(3):
        async with client.get(f"{sc.url}/flaky/x") as r:
            assert r.status == 503
            assert "X-Sidecar-Error" not in r.headers  # the upstream's own 503
            assert await r.text() == "upstream says 503"
    assert seen["calls"] == 3

    async with client.get(f"{sc.admin}/services") as r:
        info = (await r.json())["services"]["flaky"]
    assert info["prefix"] == "/flaky"
    assert info["upstream"] == base
    assert info["circuit_breaker"]["state"] == "open"
    assert info["circuit_breaker"]["half_open_in_seconds"] == 15

    clock.now += 10
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 503
        assert r.headers["X-Sidecar-Error"] == "circuit_open"
        assert r.headers["Retry-After"] == "5"
        assert r.content_type == "application/problem+json"
        problem = await r.json()
    assert problem["reason"] == "circuit_open"
    assert problem["service"] == "flaky"
    assert "failing" in problem["detail"]
    assert seen["calls"] == 3  # refused without calling the upstream

    clock.now += 5
    seen["status"] = 200
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 200
    assert seen["calls"] == 4
    async with client.get(f"{sc.admin}/services") as r:
        state = (await r.json())["services"]["flaky"]["circuit_breaker"]
    assert state["state"] == "closed"
    assert (state["failures"], state["requests"]) == (0, 0)


async def test_4xx_through_the_sidecar_never_opens_it(upstream, start_sidecar, client):
    app, seen = flaky_app()
    seen["status"] = 429
    sc = await start_sidecar(POLICY.format(base=await upstream(app)))
    for _ in range(6):
        async with client.get(f"{sc.url}/flaky/x") as r:
            assert r.status == 429
    assert seen["calls"] == 6
    async with client.get(f"{sc.admin}/services") as r:
        state = (await r.json())["services"]["flaky"]["circuit_breaker"]
    assert state["state"] == "closed"
    assert state["failures"] == 0


async def test_unreachable_upstream_opens_it(start_sidecar, client, closed_port):
    sc = await start_sidecar(POLICY.format(base=f"http://127.0.0.1:{closed_port}"))
    reasons = []
    for _ in range(4):
        async with client.get(f"{sc.url}/flaky/x") as r:
            reasons.append(r.headers["X-Sidecar-Error"])
    assert reasons == ["upstream_unreachable"] * 3 + ["circuit_open"]


async def test_open_state_survives_a_reload_that_keeps_its_parameters(
    upstream, start_sidecar, client
):
    app, seen = flaky_app()
    base = await upstream(app)
    sc = await start_sidecar(POLICY.format(base=base))
    for _ in range(3):
        async with client.get(f"{sc.url}/flaky/x") as r:
            assert r.status == 503
    sc.write("policy.yaml", POLICY.format(base=base) + "    max_body: 1MiB\n")
    assert (await sc.sidecar.reload("test")).changed
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.headers.get("X-Sidecar-Error") == "circuit_open"
    assert seen["calls"] == 3

    changed = POLICY.format(base=base).replace("open_for: 15s", "open_for: 20s")
    sc.write("policy.yaml", changed)
    assert (await sc.sidecar.reload("test")).changed
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 503
        assert "X-Sidecar-Error" not in r.headers  # a changed breaker starts closed
    assert seen["calls"] == 4
