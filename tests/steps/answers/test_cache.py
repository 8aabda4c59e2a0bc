"""cache: answers served again without the upstream, per agent, as Cache-Control says."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from sidecar.core.call import Call, Reply, StaticReply
from sidecar.steps.answers.cache import CacheStore, Entry
from tests.conftest import StartSidecar
from tests.helpers import eventually
from tests.steps.conftest import (
    CacheSidecar,
    cache_policy,
    cache_step,
    get_through,
    metrics,
    served,
)

SECRET = "sk-cache-canary-5e1d"


class Upstream:
    """Counts the calls it gets per path; what each path answers is its name."""

    def __init__(self) -> None:
        self.base = ""  # where it serves, once started
        self.hits: dict[str, int] = {}
        self.authorization: list[str] = []
        self.release = asyncio.Event()
        self.bodies: list[bytes] = []

    def count(self, path: str) -> int:
        return self.hits.get(path, 0)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.path
            self.hits[path] = self.count(path) + 1
            self.authorization.append(request.headers.get("Authorization", ""))
            n = self.hits[path]
            if path == "/stream":
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                await response.write(b"data: first\n\n")
                # The second chunk waits until the agent has read the first one.
                await self.release.wait()
                await response.write(b"data: second\n\n")
                await response.write_eof()
                return response
            if path == "/no-store":
                return web.json_response({"n": n}, headers={"Cache-Control": "no-store"})
            if path == "/cookie":
                return web.json_response({"n": n}, headers={"Set-Cookie": "s=1"})
            if path == "/missing":
                return web.json_response({"n": n}, status=404)
            if path == "/short":
                return web.json_response({"n": n}, headers={"Cache-Control": "max-age=0"})
            if path == "/cut" and n == 1:
                response = web.StreamResponse(headers={"Content-Type": "text/plain"})
                response.content_length = 100
                await response.prepare(request)
                await response.write(b"only ten b")
                assert request.transport is not None
                request.transport.close()
                return response
            if path == "/cut":
                return web.Response(text="whole")
            if path == "/big":
                return web.Response(body=b"x" * 4096)
            if request.method == "POST":
                self.bodies.append(await request.read())
            return web.json_response({"n": n, "path": path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


up = served(Upstream)


async def get(client: aiohttp.ClientSession, url: str, agent: str = "a1") -> tuple[Any, Any]:
    async with client.get(url, headers={"X-Agent-Id": agent}) as r:
        assert r.status in (200, 404), await r.text()
        return r.headers, await r.json()


async def test_second_identical_get_is_a_hit_and_the_upstream_saw_one_call(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{}", SECRET)
    headers, body = await get(client, f"{sc.url}/api/x?q=1")
    assert headers["X-Sidecar-Cache"] == "miss"
    assert body == {"n": 1, "path": "/x"}
    headers, body = await get(client, f"{sc.url}/api/x?q=1")
    assert headers["X-Sidecar-Cache"] == "hit"
    assert int(headers["Age"]) >= 0
    assert body == {"n": 1, "path": "/x"}
    assert up.count("/x") == 1
    # Another query is another key.
    headers, body = await get(client, f"{sc.url}/api/x?q=2")
    assert headers["X-Sidecar-Cache"] == "miss"
    assert up.count("/x") == 2
    # HEAD is keyed on its own and answered with no body.
    async with client.head(f"{sc.url}/api/x?q=1", headers={"X-Agent-Id": "a1"}) as r:
        assert r.headers["X-Sidecar-Cache"] == "miss"
    async with client.head(f"{sc.url}/api/x?q=1", headers={"X-Agent-Id": "a1"}) as r:
        assert r.status == 200
        assert r.headers["X-Sidecar-Cache"] == "hit"
        assert await r.read() == b""
    text = await metrics(client, sc.admin)
    assert 'sidecar_cache_requests_total{result="hit",service="api"} 2.0' in text
    assert 'sidecar_cache_requests_total{result="miss",service="api"} 3.0' in text
    assert SECRET not in text


async def test_agents_do_not_share_entries_unless_shared(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{}", SECRET)
    await get(client, f"{sc.url}/api/x", agent="a1")
    headers, body = await get(client, f"{sc.url}/api/x", agent="a2")
    assert headers["X-Sidecar-Cache"] == "miss"
    assert body["n"] == 2

    shared = await cache_sidecar(up.base, "{shared: true}", SECRET)
    await get(client, f"{shared.url}/api/y", agent="a1")
    headers, body = await get(client, f"{shared.url}/api/y", agent="a2")
    assert headers["X-Sidecar-Cache"] == "hit"
    assert up.count("/y") == 1


async def test_what_must_not_be_kept_is_not(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{max_body: 1KiB}", SECRET)
    for path in ("/no-store", "/cookie", "/missing", "/short"):
        await get(client, f"{sc.url}/api{path}")
        headers, body = await get(client, f"{sc.url}/api{path}")
        assert headers["X-Sidecar-Cache"] == "miss", path
        assert body["n"] == 2, path
    for _ in range(2):
        async with client.get(f"{sc.url}/api/big", headers={"X-Agent-Id": "a1"}) as r:
            assert r.headers["X-Sidecar-Cache"] == "miss"
            assert await r.read() == b"x" * 4096
    assert up.count("/big") == 2
    # An agent asking for a fresh answer gets one, and it bypasses the cache.
    await get(client, f"{sc.url}/api/x")
    async with client.get(
        f"{sc.url}/api/x", headers={"X-Agent-Id": "a1", "Cache-Control": "no-cache"}
    ) as r:
        assert "X-Sidecar-Cache" not in r.headers
        assert (await r.json())["n"] == 2
    # The credential went upstream on every call the cache let through.
    assert set(up.authorization) == {f"Bearer {SECRET}"}


async def test_post_is_keyed_by_its_canonical_json_body_when_enabled(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{methods: [POST]}", SECRET)
    url = f"{sc.url}/api/v1/chat/completions"
    ask = {"model": "m", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}

    async def post(data: bytes) -> tuple[str, Any]:
        async with client.post(
            url, data=data, headers={"X-Agent-Id": "a1", "Content-Type": "application/json"}
        ) as r:
            return r.headers["X-Sidecar-Cache"], await r.json()

    assert (await post(json.dumps(ask).encode()))[0] == "miss"
    # The same JSON with other key order and spacing is the same call.
    same = json.dumps(dict(reversed(ask.items())), indent=2).encode()
    result, body = await post(same)
    assert result == "hit"
    assert body["n"] == 1
    other = json.dumps({**ask, "messages": [{"role": "user", "content": "bye"}]}).encode()
    result, body = await post(other)
    assert result == "miss"
    assert body["n"] == 2
    assert up.bodies[0] == json.dumps(ask).encode()
    # GET is not in methods: never cached.
    async with client.get(f"{sc.url}/api/g", headers={"X-Agent-Id": "a1"}) as r:
        assert "X-Sidecar-Cache" not in r.headers


async def test_an_entry_expires_after_its_ttl(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{ttl: 50ms}", SECRET)
    await get(client, f"{sc.url}/api/x")

    async def fresh() -> bool:
        headers, _ = await get(client, f"{sc.url}/api/x")
        return bool(headers["X-Sidecar-Cache"] == "miss")

    await eventually(fresh, "the entry expired and the upstream was asked again")
    assert up.count("/x") >= 2


async def test_a_miss_streams_chunk_by_chunk_and_is_stored_once_complete(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{}", SECRET)
    async with client.get(f"{sc.url}/api/stream", headers={"X-Agent-Id": "a1"}) as r:
        assert r.headers["X-Sidecar-Cache"] == "miss"
        # The first event arrives while the upstream still holds back the second.
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 10)
        assert first == b"data: first\n\n"
        up.release.set()
        assert await r.content.read() == b"data: second\n\n"
    async with client.get(f"{sc.url}/api/stream", headers={"X-Agent-Id": "a1"}) as r:
        assert r.headers["X-Sidecar-Cache"] == "hit"
        assert await r.read() == b"data: first\n\ndata: second\n\n"
    assert up.count("/stream") == 1


async def test_a_reload_with_the_same_cache_keeps_the_entries(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{ttl: 10m}", SECRET)
    await get(client, f"{sc.url}/api/x")
    sc.write("policy.yaml", cache_policy(up.base, "{ttl: 10m}", retry=2))
    assert (await sc.sidecar.reload("test")).ok
    headers, _ = await get(client, f"{sc.url}/api/x")
    assert headers["X-Sidecar-Cache"] == "hit"
    sc.write("policy.yaml", cache_policy(up.base, "{ttl: 5m}"))
    assert (await sc.sidecar.reload("test")).ok
    headers, _ = await get(client, f"{sc.url}/api/x")
    assert headers["X-Sidecar-Cache"] == "miss"


async def test_least_recently_used_entries_go_first_and_ttl_follows_the_clock() -> None:
    now = [0.0]
    store = CacheStore(max_entries=2, max_bytes=1 << 20)
    step = cache_step({"ttl": "1m", "max_entries": 2}, store, lambda: now[0])
    calls: list[str] = []

    async def upstream(call: Call) -> Reply:
        calls.append(call.target)
        return StaticReply(200, CIMultiDict({"Content-Type": "text/plain"}), b"ok")

    async def fetch(target: str) -> str:
        return (await get_through(step, upstream, target)).headers["X-Sidecar-Cache"]

    assert [await fetch(t) for t in ("/a", "/b", "/a", "/c")] == ["miss", "miss", "hit", "miss"]
    assert len(store) == 2
    # /b was the least recently used when /c came: it went, /a stayed.
    assert await fetch("/a") == "hit"
    assert await fetch("/b") == "miss"
    now[0] = 61.0
    assert await fetch("/b") == "miss"
    assert calls == ["/a", "/b", "/c", "/b", "/b"]


def test_the_store_is_bounded_in_bytes_too() -> None:
    def entry(size: int) -> Entry:
        return Entry(
            status=200,
            reason=None,
            headers=CIMultiDict(),
            data=b"x" * size,
            content_length=size,
            response_time=0.0,
            initial_age=0.0,
            lifetime=60.0,
        )

    evicted: list[int] = []
    store = CacheStore(max_entries=100, max_bytes=1000, evicted=evicted.append)
    for i in range(10):
        store.put(b"k%d" % i, entry(300))
    assert len(store) == 3
    assert store.bytes == 900
    assert sum(evicted) == 7
    none: CIMultiDict[str] = CIMultiDict()
    assert store.get(b"k9", none, 0.0) is not None
    assert store.get(b"k6", none, 0.0) is None
    store.put(b"huge", entry(1001))  # larger than the whole store: not kept
    assert store.get(b"huge", none, 0.0) is None
    store.put(b"k9", entry(100))  # replaced, not counted twice
    assert store.bytes == 700


async def test_an_agents_own_credential_is_never_answered_from_the_cache(
    up: Upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          open:
            upstream: {up.base}
            cache: {{shared: true}}
          keyed:
            upstream: {up.base}
            cache: {{shared: true, key_headers: [Authorization]}}
        """
    )
    for agent, token in (("a1", "t1"), ("a2", "t2")):
        headers = {"X-Agent-Id": agent, "Authorization": f"Bearer {token}"}
        async with client.get(f"{sc.url}/open/mine", headers=headers) as r:
            assert "X-Sidecar-Cache" not in r.headers
    assert up.count("/mine") == 2
    results = []
    for token in ("t1", "t2", "t1"):
        headers = {"X-Agent-Id": "a1", "Authorization": f"Bearer {token}"}
        async with client.get(f"{sc.url}/keyed/k", headers=headers) as r:
            results.append(r.headers["X-Sidecar-Cache"])
    assert results == ["miss", "miss", "hit"]
    text = await metrics(client, sc.admin)
    assert 'sidecar_cache_requests_total{result="bypass",service="open"} 2.0' in text


async def test_an_answer_cut_short_is_not_stored(
    up: Upstream, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(up.base, "{}", SECRET)
    try:
        async with client.get(f"{sc.url}/api/cut", headers={"X-Agent-Id": "a1"}) as r:
            await r.read()
    except aiohttp.ClientError:
        pass  # the agent sees the cut; what matters is what the cache kept
    async with client.get(f"{sc.url}/api/cut", headers={"X-Agent-Id": "a1"}) as r:
        assert r.headers["X-Sidecar-Cache"] == "miss"
        assert await r.text() == "whole"
    async with client.get(f"{sc.url}/api/cut", headers={"X-Agent-Id": "a1"}) as r:
        assert r.headers["X-Sidecar-Cache"] == "hit"
        assert await r.text() == "whole"
    assert up.count("/cut") == 2
