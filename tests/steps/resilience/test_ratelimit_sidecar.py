"""Rate limits through the real sidecar, with a real upstream that counts what reaches it."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from tests.conftest import Counting, RunningSidecar, echo_app


def policy(base: str, limits: str, *, max_body: str = "10MiB") -> str:
    return f"""
        version: 1
        services:
          api:
            upstream: {base}
            max_body: {max_body}
            rate_limit:
        {limits}
        """


async def get(
    client: aiohttp.ClientSession, sc: RunningSidecar, agent: str | None = None
) -> tuple[int, dict[str, str], Any]:
    headers = {"X-Agent-Id": agent} if agent else {}
    async with client.get(f"{sc.url}/api/x", headers=headers) as resp:
        body = await resp.read()
        return resp.status, dict(resp.headers), body


async def test_burst_then_429_problem_json_with_retry_after(upstream, start_sidecar, client):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, "              - {rate: 6/min, burst: 3}"))
    for _ in range(3):
        status, _, _ = await get(client, sc)
        assert status == 200
    async with client.get(f"{sc.url}/api/x") as resp:
        assert resp.status == 429
        assert resp.headers["Content-Type"] == "application/problem+json"
        assert resp.headers["X-Sidecar-Error"] == "rate_limited"
        assert 1 <= int(resp.headers["Retry-After"]) <= 10
        assert resp.headers["RateLimit-Limit"] == "3"
        assert resp.headers["RateLimit-Remaining"] == "0"
        assert 1 <= int(resp.headers["RateLimit-Reset"]) <= 10
        body = await resp.json(content_type=None)
    assert body["reason"] == "rate_limited"
    assert body["status"] == 429
    assert body["service"] == "api"
    assert "Retry after" in body["detail"]
    assert counting.hits == 3


async def test_per_agent_limits_are_isolated(upstream, start_sidecar, client):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, "              - {rate: 1/h, burst: 2, per: agent}"))
    assert [(await get(client, sc, "alice"))[0] for _ in range(3)] == [200, 200, 429]
    assert [(await get(client, sc, "bob"))[0] for _ in range(2)] == [200, 200]
    assert (await get(client, sc, "alice"))[0] == 429
    assert counting.hits == 4


async def test_upstream_429_passes_through_unchanged_then_the_service_pauses(
    upstream, start_sidecar, client
):
    counting = Counting()
    counting.status = 429
    counting.headers = {"Retry-After": "30"}
    counting.body = b'{"error": "slow down"}'
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, "              - {rate: 100/s, per: agent}"))

    status, headers, body = await get(client, sc, "alice")
    assert status == 429
    assert body == b'{"error": "slow down"}'
    assert headers["Retry-After"] == "30"
    assert "X-Sidecar-Error" not in headers

    counting.status, counting.headers = 200, {}
    status, headers, body = await get(client, sc, "bob")
    assert status == 429
    assert headers["X-Sidecar-Error"] == "rate_limited"
    assert 28 <= int(headers["Retry-After"]) <= 30
    assert b"answered 429" in body
    assert counting.hits == 1


async def test_max_wait_queues_calls_instead_of_refusing(upstream, start_sidecar, client):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, "              - {rate: 40/s, burst: 1, max_wait: 2s}"))
    statuses = await asyncio.gather(*(get(client, sc) for _ in range(4)))
    assert [s for s, _, _ in statuses] == [200, 200, 200, 200]
    assert counting.hits == 4


async def test_max_wait_too_short_still_refuses(upstream, start_sidecar, client):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(
        policy(base, "              - {rate: 1/min, burst: 1, max_wait: 50ms}")
    )
    assert (await get(client, sc))[0] == 200
    status, headers, _ = await get(client, sc)
    assert status == 429
    assert headers["X-Sidecar-Error"] == "rate_limited"
    assert counting.hits == 1


async def test_reload_keeps_an_unchanged_bucket_and_resets_a_changed_one(
    upstream, start_sidecar, client
):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, "              - {rate: 1/h, burst: 1}"))
    assert [(await get(client, sc))[0] for _ in range(2)] == [200, 429]

    # Another part of the policy changes: the limit is the same, so is its (empty) bucket.
    sc.write("policy.yaml", policy(base, "              - {rate: 1/h, burst: 1}", max_body="1MiB"))
    result = await sc.sidecar.reload("test")
    assert result.ok and result.changed, result.errors
    assert (await get(client, sc))[0] == 429

    sc.write("policy.yaml", policy(base, "              - {rate: 2/h, burst: 1}"))
    result = await sc.sidecar.reload("test")
    assert result.ok and result.changed, result.errors
    assert [(await get(client, sc))[0] for _ in range(2)] == [200, 429]
    assert counting.hits == 2


async def test_a_custom_agents_header_keys_per_agent_limits_and_stays_local(
    upstream, start_sidecar, client
):
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        agents: {{header: X-Who}}
        services:
          api:
            upstream: {base}
            rate_limit: {{rate: 1/h, burst: 1, per: agent}}
        """
    )

    async def call(who: str) -> tuple[int, Any]:
        # X-Agent-Id is an ordinary header here: the same value for everyone.
        headers = {"X-Who": who, "X-Agent-Id": "same-for-all"}
        async with client.get(f"{sc.url}/api/x", headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    (alice, seen), (again, _), (bob, _) = [await call(w) for w in ("alice", "alice", "bob")]
    assert (alice, again, bob) == (200, 429, 200)
    lower = {k.lower(): v for k, v in seen["headers"].items()}
    assert "x-who" not in lower  # the identity header is the sidecar's, not the upstream's
    assert lower["x-agent-id"] == "same-for-all"
