"""Retries: the decisions with a fake upstream and sleep, then for real against a flaky one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from email.utils import formatdate
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.core.call import Call
from sidecar.core.problems import ProblemError
from sidecar.policy.models import Retry as RetryConfig
from sidecar.steps.resilience.retry import Retry

NOW = 1_700_000_000.0


class FakeReply:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = CIMultiDict(headers or {})
        self.released = False

    def release(self) -> None:
        self.released = True


class Upstream:
    """A fake `next`: plays its outcomes in order (the last one repeats)."""

    def __init__(self, *outcomes: int | FakeReply | ProblemError) -> None:
        self.outcomes = list(outcomes)
        self.attempts: list[int] = []
        self.replies: list[FakeReply] = []

    async def __call__(self, call: Call) -> Any:
        self.attempts.append(call.attempt)
        outcome = self.outcomes[min(len(self.attempts), len(self.outcomes)) - 1]
        if isinstance(outcome, ProblemError):
            raise outcome
        reply = outcome if isinstance(outcome, FakeReply) else FakeReply(outcome)
        self.replies.append(reply)
        return reply


class Sleeps:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


def _retry(**config: Any) -> tuple[Retry, Sleeps]:
    sleeps = Sleeps()
    step = Retry(
        service="svc",
        config=RetryConfig.model_validate(config),
        sleep=sleeps,
        uniform=lambda lo, hi: hi,  # always the longest backoff: easy to check
        wall=lambda: NOW,
    )
    return step, sleeps


def _call(method: str = "GET", body: Any = None, **headers: str) -> Call:
    return Call(
        service="svc",
        method=method,
        target="/",
        headers=CIMultiDict(headers),
        body=body,
        agent=None,
    )


def _unreachable() -> ProblemError:
    return ProblemError("upstream_unreachable", "down", service="svc", cause="connect-error")


async def test_retries_a_503_until_it_succeeds_releasing_the_failed_answers():
    step, sleeps = _retry(attempts=3)
    up = Upstream(503, 503, 200)
    call = _call()
    reply = await step(call, up)
    assert reply.status == 200
    assert up.attempts == [1, 2, 3]
    assert call.attempt == 3
    assert [r.released for r in up.replies] == [True, True, False]
    assert len(sleeps.delays) == 2


async def test_out_of_attempts_the_last_answer_comes_back_unchanged():
    step, _ = _retry(attempts=2)
    up = Upstream(503)
    reply = await step(_call(), up)
    assert reply is up.replies[-1]
    assert not reply.released
    assert up.attempts == [1, 2]


async def test_statuses_not_listed_and_4xx_are_not_retried():
    step, _ = _retry(attempts=3, on=["5xx"])
    for status in (200, 400, 404, 429):
        up = Upstream(status)
        assert (await step(_call(), up)).status == status
        assert up.attempts == [1]
    step, _ = _retry(attempts=3, on=["gateway-error"])
    up = Upstream(500)
    assert (await step(_call(), up)).status == 500
    assert up.attempts == [1]
    up = Upstream(504, 200)
    assert (await step(_call(), up)).status == 200


async def test_only_idempotent_methods_unless_an_idempotency_key_is_sent():
    step, _ = _retry(attempts=3)
    for method in ("POST", "PATCH"):
        up = Upstream(503, 200)
        assert (await step(_call(method), up)).status == 503
        assert up.attempts == [1]
    for method in ("GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"):
        up = Upstream(503, 200)
        assert (await step(_call(method), up)).status == 200
    up = Upstream(503, 200)
    assert (await step(_call("POST", **{"Idempotency-Key": "k1"}), up)).status == 200
    assert up.attempts == [1, 2]


async def test_wire_errors_are_retried_and_the_last_one_raised():
    step, _ = _retry(attempts=3, on=["connect-error", "timeout"])
    errors = [_unreachable(), ProblemError("upstream_timeout", "slow", cause="timeout")]
    up = Upstream(errors[0], errors[1], errors[0], errors[1])
    with pytest.raises(ProblemError) as info:
        await step(_call(), up)
    assert info.value is errors[0]  # the third try's error
    assert up.attempts == [1, 2, 3]

    reset = ProblemError("upstream_unreachable", "closed", cause="reset")
    up = Upstream(reset, 200)
    with pytest.raises(ProblemError):
        await step(_call(), up)  # "reset" is not in `on`
    assert up.attempts == [1]


async def test_an_open_breaker_ends_the_retries():
    step, _ = _retry(attempts=5, on=["5xx"])
    refusal = ProblemError("circuit_open", "open", service="svc", retry_after=10)
    up = Upstream(503, refusal, 200)
    with pytest.raises(ProblemError) as info:
        await step(_call(), up)
    assert info.value is refusal
    assert up.attempts == [1, 2]


async def test_backoff_doubles_and_is_capped_with_full_jitter():
    step, sleeps = _retry(attempts=5, backoff={"initial": "100ms", "max": "300ms"})
    bounds: list[tuple[float, float]] = []

    def uniform(lo: float, hi: float) -> float:
        bounds.append((lo, hi))
        return hi / 2

    step.uniform = uniform
    await step(_call(), Upstream(503))
    assert bounds == [(0.0, 0.1), (0.0, 0.2), (0.0, 0.3), (0.0, 0.3)]
    assert sleeps.delays == [0.05, 0.1, 0.15, 0.15]


async def test_retry_after_wins_over_the_backoff_in_seconds_or_as_a_date():
    step, sleeps = _retry(attempts=3, backoff={"initial": "100ms", "max": "60s"})
    later = formatdate(NOW + 30, usegmt=True)
    up = Upstream(FakeReply(503, {"Retry-After": "7"}), FakeReply(503, {"Retry-After": later}), 200)
    assert (await step(_call(), up)).status == 200
    assert sleeps.delays == [7.0, 30.0]


async def test_a_retry_after_longer_than_backoff_max_is_passed_to_the_agent():
    step, sleeps = _retry(attempts=3, backoff={"initial": "100ms", "max": "5s"})
    up = Upstream(FakeReply(503, {"Retry-After": "120"}), 200)
    reply = await step(_call(), up)
    assert reply.status == 503
    assert reply.headers["Retry-After"] == "120"
    assert not reply.released
    assert up.attempts == [1]
    assert sleeps.delays == []


async def test_the_budget_refuses_retries_beyond_its_share():
    step, _ = _retry(attempts=3, budget={"ratio": 0, "min_concurrency": 0})
    up = Upstream(503, 200)
    assert (await step(_call(), up)).status == 503
    assert step.denied == 1

    # One retry at a time: while the first call waits to retry, the second may not.
    step, _ = _retry(attempts=3, budget={"ratio": 0.1, "min_concurrency": 1})
    gate = asyncio.Event()

    async def held(delay: float) -> None:
        await gate.wait()

    step.sleep = held
    first_up, second_up = Upstream(503, 200), Upstream(503, 200)
    first = asyncio.create_task(step(_call(), first_up))
    await asyncio.sleep(0)
    assert step.retrying == 1
    assert (await step(_call(), second_up)).status == 503
    assert second_up.attempts == [1]
    gate.set()
    assert (await first).status == 200
    assert (step.active, step.retrying) == (0, 0)


async def test_a_body_that_cannot_be_replayed_gets_one_try():
    async def stream() -> AsyncIterator[bytes]:
        yield b"chunk"

    step, _ = _retry(attempts=3)
    up = Upstream(503, 200)
    assert (await step(_call("PUT", body=stream()), up)).status == 503
    assert up.attempts == [1]


# --- through the real sidecar, against a real flaky upstream -------------------------------


def flaky_app(fail: int, how: str = "503", headers: dict[str, str] | None = None) -> Any:
    """Fails the first `fail` calls (503, a dropped connection, or too slow), then echoes."""
    seen: dict[str, Any] = {"calls": 0, "bodies": []}

    async def handle(request: web.Request) -> web.StreamResponse:
        seen["calls"] += 1
        seen["bodies"].append(await request.read())
        if seen["calls"] <= fail:
            if how == "drop":
                assert request.transport is not None
                request.transport.close()
                return web.Response()
            if how == "slow":
                await asyncio.Event().wait()  # never answers: only the deadline ends it
            elif how.isdigit():
                return web.Response(
                    status=int(how), text=f"busy, call {seen['calls']}", headers=headers
                )
        return web.Response(text=f"ok on call {seen['calls']}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, seen


def policy(base: str, retry: str, extra: str = "", total: str = "10s") -> str:
    return f"""
    version: 1
    services:
      flaky:
        upstream: {base}
        timeout: {{total: {total}}}
        retry: {retry}
    {extra}"""


RETRY = "{attempts: 3, on: [connect-error, timeout, reset, 5xx], backoff: {initial: 1ms, max: 5s}}"


async def _sidecar(start_sidecar, base: str, retry: str = RETRY, total: str = "10s") -> Any:
    sc = await start_sidecar(policy(base, retry, total=total))
    (step,) = sc.sidecar.state.find("flaky", "retry")
    sleeps = Sleeps()
    step.sleep = sleeps
    return sc, sleeps


@pytest.mark.parametrize("how", ["503", "drop", "slow"])
async def test_a_get_is_retried_until_it_succeeds(upstream, start_sidecar, client, how):
    app, seen = flaky_app(2, how)
    # Each stalled try costs the whole deadline; the good one has ample time within it.
    total = "500ms" if how == "slow" else "10s"
    sc, _ = await _sidecar(start_sidecar, await upstream(app), total=total)
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 200
        assert await r.text() == "ok on call 3"
    assert seen["calls"] == 3


async def test_out_of_attempts_the_agent_gets_the_upstreams_last_503(
    upstream, start_sidecar, client
):
    app, seen = flaky_app(10)
    sc, _ = await _sidecar(start_sidecar, await upstream(app))
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 503
        assert "X-Sidecar-Error" not in r.headers
        assert await r.text() == "busy, call 3"
    assert seen["calls"] == 3


async def test_out_of_attempts_on_errors_the_agent_gets_the_sidecars_problem(
    upstream, start_sidecar, client
):
    app, seen = flaky_app(10, "slow")
    sc, _ = await _sidecar(start_sidecar, await upstream(app), total="200ms")
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 504
        assert r.headers["X-Sidecar-Error"] == "upstream_timeout"
    assert seen["calls"] == 3


async def test_a_post_is_retried_only_with_an_idempotency_key(upstream, start_sidecar, client):
    app, seen = flaky_app(1)
    sc, _ = await _sidecar(start_sidecar, await upstream(app))
    async with client.post(f"{sc.url}/flaky/x", data=b'{"n": 1}') as r:
        assert r.status == 503
    assert seen["calls"] == 1

    app, seen = flaky_app(1)
    sc, _ = await _sidecar(start_sidecar, await upstream(app))
    async with client.post(
        f"{sc.url}/flaky/x", data=b'{"n": 1}', headers={"Idempotency-Key": "abc"}
    ) as r:
        assert r.status == 200
    assert seen["bodies"] == [b'{"n": 1}', b'{"n": 1}']  # the same body, sent again


async def test_4xx_is_never_retried(upstream, start_sidecar, client):
    app, seen = flaky_app(1, "409")
    sc, _ = await _sidecar(start_sidecar, await upstream(app))
    async with client.put(f"{sc.url}/flaky/x", data=b"x") as r:
        assert r.status == 409
    assert seen["calls"] == 1


async def test_retry_after_is_honoured(upstream, start_sidecar, client):
    app, seen = flaky_app(1, headers={"Retry-After": "2"})
    sc, sleeps = await _sidecar(start_sidecar, await upstream(app))
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 200
    assert sleeps.delays == [2.0]
    assert seen["calls"] == 2

    app, seen = flaky_app(1, headers={"Retry-After": "60"})
    sc, sleeps = await _sidecar(start_sidecar, await upstream(app))
    async with client.get(f"{sc.url}/flaky/x") as r:
        assert r.status == 503  # longer than backoff.max: the agent decides
        assert r.headers["Retry-After"] == "60"
    assert seen["calls"] == 1


async def test_an_open_breaker_is_not_retried(upstream, start_sidecar, client):
    app, seen = flaky_app(10)
    base = await upstream(app)
    breaker = "circuit_breaker: {min_requests: 2, failure_ratio: 0.5, open_for: 1m}"
    sc = await start_sidecar(policy(base, RETRY, extra=f"    {breaker}"))
    (step,) = sc.sidecar.state.find("flaky", "retry")
    step.sleep = Sleeps()
    async with client.get(f"{sc.url}/flaky/x") as r:
        # Two 503s opened the breaker; the third try was refused by it.
        assert r.status == 503
        assert r.headers["X-Sidecar-Error"] == "circuit_open"
        assert int(r.headers["Retry-After"]) == 60
    assert seen["calls"] == 2
    async with client.get(f"{sc.admin}/services") as r:
        info = (await r.json())["services"]["flaky"]
    assert info["circuit_breaker"]["state"] == "open"
    assert info["retry"]["attempts"] == 3
    assert info["retry"]["retries"] == 2


async def test_never_replayed_once_response_bytes_reached_the_agent(
    upstream, start_sidecar, client
):
    calls = 0

    async def breaks_off(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        resp = web.StreamResponse()
        resp.content_length = 1000
        await resp.prepare(request)
        await resp.write(b"x" * 100)
        assert request.transport is not None
        request.transport.close()  # the connection drops with 900 bytes still owed
        return resp

    app = web.Application()
    app.router.add_get("/x", breaks_off)
    sc, _ = await _sidecar(start_sidecar, await upstream(app))
    async with asyncio.timeout(10):
        async with client.get(f"{sc.url}/flaky/x") as r:
            assert r.status == 200
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()  # truncated: the agent can tell the answer is incomplete
    assert calls == 1  # `reset` is in `on`, yet nothing was sent again
