"""Shared rate limits: two real sidecars, one real redis-server, one limit between them."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from redis.asyncio import Redis

from sidecar.engines.limits_redis import BackendDown, RedisBackend
from tests.conftest import Counting, RunningSidecar
from tests.helpers import eventually
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401


def policy(base: str, redis_url: str) -> str:
    return f"""
        version: 1
        services:
          api:
            upstream: {base}
            rate_limit:
              - {{rate: 1/h, burst: 4, backend: "{redis_url}"}}
          peragent:
            upstream: {base}
            rate_limit:
              - {{rate: 1/h, burst: 1, per: agent, backend: "{redis_url}"}}
          closed:
            upstream: {base}
            rate_limit:
              - {{rate: 100/s, backend: "{redis_url}", fail_open: false}}
        """


async def status(
    client: aiohttp.ClientSession, sc: RunningSidecar, path: str, agent: str | None = None
) -> int:
    headers = {"X-Agent-Id": agent} if agent else {}
    async with client.get(f"{sc.url}{path}", headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_two_sidecars_share_one_burst(upstream, start_sidecar, client, redis_server):
    counting = Counting()
    base = await upstream(counting.app())
    first = await start_sidecar(policy(base, redis_server.url))
    second = await start_sidecar(policy(base, redis_server.url))
    statuses = [await status(client, sc, "/api/x") for sc in (first, second) * 5]
    assert statuses.count(200) == 4
    assert statuses.count(429) == 6
    assert counting.hits == 4
    async with client.get(f"{second.url}/api/x") as resp:
        assert resp.status == 429
        assert resp.headers["X-Sidecar-Error"] == "rate_limited"
        assert resp.headers["RateLimit-Limit"] == "4"
        assert int(resp.headers["Retry-After"]) > 0
        body = await resp.json(content_type=None)
    assert body["reason"] == "rate_limited" and body["service"] == "api"


async def test_per_agent_buckets_in_redis(upstream, start_sidecar, client, redis_server):
    counting = Counting()
    base = await upstream(counting.app())
    first = await start_sidecar(policy(base, redis_server.url))
    second = await start_sidecar(policy(base, redis_server.url))
    assert await status(client, first, "/peragent/x", "alice") == 200
    assert await status(client, second, "/peragent/x", "alice") == 429
    assert await status(client, second, "/peragent/x", "bob") == 200
    assert await status(client, first, "/peragent/x") == 200
    assert await status(client, second, "/peragent/x") == 429
    assert counting.hits == 3


async def test_a_flushed_script_cache_falls_back_to_eval(
    upstream, start_sidecar, client, redis_server
):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, redis_server.url))
    assert await status(client, sc, "/api/x") == 200
    admin = Redis.from_url(redis_server.url)
    try:
        await admin.script_flush()
    finally:
        await admin.aclose()
    assert [await status(client, sc, "/api/x") for _ in range(4)] == [200, 200, 200, 429]


async def test_redis_down_fail_open_lets_calls_through_fail_closed_refuses(
    upstream, start_sidecar, client, redis_server: RedisServer
):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, redis_server.url))
    assert await status(client, sc, "/closed/x") == 200
    redis_server.stop()

    # fail_open (the default): the limit is not enforced while Redis is away.
    assert [await status(client, sc, "/api/x") for _ in range(6)] == [200] * 6

    async with client.get(f"{sc.url}/closed/x") as resp:
        assert resp.status == 429
        assert resp.headers["X-Sidecar-Error"] == "rate_limited"
        assert resp.headers["Retry-After"] == "1"
        body = await resp.json(content_type=None)
    assert "unavailable" in body["detail"]
    assert redis_server.url not in body["detail"]
    assert counting.hits == 7


async def test_backend_outage_is_logged_once_without_the_url(caplog, closed_port):
    backend = RedisBackend(f"redis://:canary-s3cret@127.0.0.1:{closed_port}/0")
    try:
        with caplog.at_level(logging.WARNING, logger="sidecar.ratelimit"):
            for _ in range(3):
                with pytest.raises(BackendDown):
                    await backend.run("k", 1.0, 1, 1, 0.0)
    finally:
        await backend.client.aclose()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "127.0.0.1" in caplog.text
    assert "canary-s3cret" not in caplog.text


async def test_concurrent_calls_on_two_sidecars_share_one_burst_exactly(
    upstream, start_sidecar, client, redis_server
):
    counting = Counting()
    base = await upstream(counting.app())
    # fail_open: false, so a reply slower than the backend timeout (a loaded machine)
    # refuses the call instead of letting it through uncounted.
    text = policy(base, redis_server.url).replace(
        "{rate: 1/h, burst: 4,", "{rate: 1/h, burst: 4, fail_open: false,"
    )
    first = await start_sidecar(text)
    second = await start_sidecar(text)
    # All at once: the take from the bucket must be atomic in Redis, not read-then-write.
    statuses = await asyncio.gather(*(status(client, sc, "/api/x") for sc in (first, second) * 20))
    # Never more than the burst between the two; all of it unless the backend timed out.
    assert 1 <= statuses.count(200) <= 4
    assert statuses.count(429) == 40 - statuses.count(200)
    assert counting.hits == statuses.count(200)


async def test_limits_apply_again_once_redis_is_back(
    upstream, start_sidecar, client, redis_server: RedisServer
):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base, redis_server.url))
    assert await status(client, sc, "/closed/x") == 200
    redis_server.stop()
    assert await status(client, sc, "/closed/x") == 429  # fail_open: false, Redis away
    redis_server.start()  # same port, empty: every bucket starts full

    async def closed_lets_calls_through() -> bool:
        return await status(client, sc, "/closed/x") == 200

    await eventually(closed_lets_calls_through, "fail-closed service served after Redis restart")
    # Enforced through Redis again, not failing open: the burst of 4, then refusals.
    assert [await status(client, sc, "/api/x") for _ in range(6)] == [200] * 4 + [429] * 2
