"""cache: {backend: redis://...}: entries shared by two real `sidecar run` processes
through a real redis-server; an outage is a miss, never a failed call; no secret stored."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.helpers import eventually, sidecar_process
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.steps.conftest import CacheSidecar, api_cache, cache_policy, metrics, served

SECRET = "sk-cache-redis-canary-31f0"


class Origin:
    def __init__(self) -> None:
        self.base = ""  # where it serves, once started
        self.hits = 0
        self.authorization: list[str] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            self.authorization.append(request.headers.get("Authorization", ""))
            language = request.headers.get("Accept-Language", "")
            return web.json_response(
                {"n": self.hits, "path": request.path, "language": language},
                headers={"Cache-Control": "max-age=600", "Vary": "Accept-Language"},
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


origin = served(Origin)


def shared(redis_url: str) -> str:
    """The `cache:` value of an entry shared by every agent, kept in that Redis."""
    return f'{{scope: service, backend: "{redis_url}"}}'


async def everything(redis_url: str) -> list[bytes]:
    """Every key and every value in the Redis, as bytes."""
    client = Redis.from_url(redis_url)
    try:
        out: list[bytes] = []
        async for key in client.scan_iter():
            out.append(key)
            value = await client.get(key)
            if value is not None:
                out.append(value)
        return out
    finally:
        await client.aclose()


@pytest.mark.process
async def test_two_sidecar_processes_share_the_entries_and_no_secret_reaches_redis(
    origin: Origin, redis_server: RedisServer, tmp_path: Path
) -> None:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "policy.yaml").write_text(cache_policy(origin.base, shared(redis_server.url)))
    env = {**os.environ, "API_TOKEN": SECRET}
    async with (
        sidecar_process(directory, env=env) as first,
        sidecar_process(directory, env=env) as second,
        aiohttp.ClientSession() as client,
    ):

        async def get(url: str, agent: str, language: str) -> tuple[str, dict[str, object]]:
            headers = {"X-Agent-Id": agent, "Accept-Language": language}
            async with client.get(url, headers=headers) as r:
                assert r.status == 200, await r.text()
                return r.headers["X-Sidecar-Cache"], await r.json()

        result, body = await get(f"{first.url}/api/items?page=1", "a1", "en")
        assert (result, body["n"]) == ("miss", 1)

        async def stored() -> bool:
            return len(await everything(redis_server.url)) >= 4  # index and variant

        await eventually(stored, "the first sidecar to write the entry to Redis")
        # Another process, another agent (scope: service): answered from Redis.
        result, body = await get(f"{second.url}/api/items?page=1", "a2", "en")
        assert (result, body["n"]) == ("hit", 1)
        # Another Vary variant is another entry.
        result, body = await get(f"{second.url}/api/items?page=1", "a2", "fr")
        assert (result, body["language"]) == ("miss", "fr")
        assert origin.hits == 2
        assert set(origin.authorization) == {f"Bearer {SECRET}"}

        async def both() -> bool:
            return len(await everything(redis_server.url)) >= 6

        await eventually(both, "the second variant to reach Redis")
        result, body = await get(f"{first.url}/api/items?page=1", "a1", "fr")
        assert (result, body["n"]) == ("hit", 2)
        cache = await api_cache(client, first.admin)
        assert cache["backend"] == "redis"
        assert cache["where"] == f"127.0.0.1:{redis_server.port}"
        await first.stop()
        await second.stop()
        assert SECRET not in first.output + second.output
    stored_data = await everything(redis_server.url)
    assert stored_data
    for item in stored_data:
        assert SECRET.encode() not in item
        assert b"Bearer" not in item


async def test_a_redis_outage_is_a_miss_never_a_failed_call(
    origin: Origin,
    cache_sidecar: CacheSidecar,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
) -> None:
    sc = await cache_sidecar(origin.base, shared(redis_server.url), SECRET)
    url = f"{sc.url}/api/x"
    headers = {"X-Agent-Id": "a1"}
    redis_server.stop()
    for n in (1, 2):
        async with client.get(url, headers=headers) as r:
            assert r.status == 200
            assert r.headers["X-Sidecar-Cache"] == "miss"
            assert (await r.json())["n"] == n
    text = await metrics(client, sc.admin)
    assert 'sidecar_cache_backend_errors_total{service="api"}' in text
    assert SECRET not in text
    redis_server.start()

    async def cached() -> bool:
        async with client.get(url, headers=headers) as r:
            await r.read()
            return r.headers["X-Sidecar-Cache"] == "hit"

    # Back once Redis answers again (after the second the sidecar leaves it alone).
    await eventually(cached, "the cache to store and serve again once Redis is back")


async def test_the_backends_password_is_never_shown(
    origin: Origin,
    cache_sidecar: CacheSidecar,
    client: aiohttp.ClientSession,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
) -> None:
    password = "redis-pw-canary-9c2e"
    # This redis-server has no such user: every connection is refused, like a wrong password.
    url = f"redis://cacheuser:{password}@127.0.0.1:{redis_server.port}/0"
    sc = await cache_sidecar(origin.base, shared(url), SECRET)
    with caplog.at_level(logging.DEBUG):
        for _ in range(2):
            async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Id": "a1"}) as r:
                assert r.status == 200
                assert r.headers["X-Sidecar-Cache"] == "miss"
                assert password not in await r.text()
    assert "cache backend 127.0.0.1:" in caplog.text
    seen = caplog.text
    for path in ("/config", "/services", "/metrics"):
        async with client.get(f"{sc.admin}{path}") as r:
            seen += await r.text()
    assert password not in seen
    assert SECRET not in seen
    assert 'sidecar_cache_backend_errors_total{service="api"}' in seen
