"""cache: RFC 9111 through a real sidecar and upstream: Vary variants, revalidation
with a real 304, the agent's own conditional requests, stale-if-error, Age, scope,
and the memory bounds under many distinct keys."""

from __future__ import annotations

import email.utils
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.core.call import Call, Reply, StaticReply
from sidecar.core.problems import ProblemError
from sidecar.policy.loader import PolicyError, load_policy
from sidecar.steps.answers.cache import CacheStore
from tests.conftest import StartSidecar
from tests.steps.conftest import CacheSidecar, api_cache, cache_step, get_through, metrics, served

SECRET = "sk-cache-rfc-canary-77a3"
LAST_MODIFIED = "Wed, 21 Oct 2015 07:28:00 GMT"


class Origin:
    """An upstream that counts calls per path and notes the validators it was sent."""

    def __init__(self) -> None:
        self.base = ""  # where it serves, once started
        self.hits: dict[str, int] = {}
        self.if_none_match: list[str | None] = []
        self.if_modified_since: list[str | None] = []
        self.failing = False

    def count(self, path: str) -> int:
        return self.hits.get(path, 0)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            path = request.path
            n = self.hits[path] = self.count(path) + 1
            if self.failing:
                return web.json_response({"error": "down"}, status=503)
            if path == "/vary":
                language = request.headers.get("Accept-Language", "")
                return web.json_response(
                    {"n": n, "language": language},
                    headers={"Vary": "Accept-Language", "Cache-Control": "max-age=60"},
                )
            if path == "/vary-star":
                return web.json_response({"n": n}, headers={"Vary": "*"})
            if path == "/etag":
                self.if_none_match.append(request.headers.get("If-None-Match"))
                if request.headers.get("If-None-Match") == '"v1"':
                    # Fresh for a minute now, and a header that changed since.
                    return web.Response(
                        status=304,
                        headers={
                            "ETag": '"v1"',
                            "Cache-Control": "max-age=60",
                            "X-Version": str(n),
                        },
                    )
                return web.json_response(
                    {"n": n},
                    headers={"ETag": '"v1"', "Cache-Control": "max-age=0", "X-Version": str(n)},
                )
            if path == "/modified":
                since = request.headers.get("If-Modified-Since")
                self.if_modified_since.append(since)
                if since == LAST_MODIFIED:
                    return web.Response(status=304, headers={"Cache-Control": "no-cache"})
                return web.json_response(
                    {"n": n},
                    headers={"Last-Modified": LAST_MODIFIED, "Cache-Control": "no-cache"},
                )
            if path == "/stale-ok":
                # Stale at once, but the answer allows serving it when the upstream fails.
                return web.json_response(
                    {"n": n}, headers={"Cache-Control": "max-age=0, stale-if-error=600"}
                )
            if path == "/aged":
                # It spent 100 s in another cache before it came.
                return web.json_response(
                    {"n": n}, headers={"Cache-Control": "max-age=1000", "Age": "100"}
                )
            if path == "/too-old":
                return web.json_response(
                    {"n": n}, headers={"Cache-Control": "max-age=50", "Age": "100"}
                )
            return web.json_response({"n": n, "path": path})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


origin = served(Origin)


async def fetch(
    client: aiohttp.ClientSession, url: str, **headers: str
) -> tuple[int, CIMultiDict[str], Any]:
    sent = {"X-Agent-Id": "a1", **{k.replace("_", "-"): v for k, v in headers.items()}}
    async with client.get(url, headers=sent) as r:
        body = await r.json() if r.status == 200 else await r.read()
        return r.status, CIMultiDict(r.headers), body


async def test_vary_keeps_one_variant_per_value_of_the_headers_it_names(
    origin: Origin, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(origin.base, "{}", SECRET)
    url = f"{sc.url}/api/vary"
    results = []
    for language in ("en", "fr", "en", "fr"):
        _, headers, body = await fetch(client, url, Accept_Language=language)
        results.append((headers["X-Sidecar-Cache"], body["language"]))
    assert results == [("miss", "en"), ("miss", "fr"), ("hit", "en"), ("hit", "fr")]
    assert origin.count("/vary") == 2
    # Vary: * never matches a later request: never stored.
    for _ in range(2):
        _, headers, _ = await fetch(client, f"{sc.url}/api/vary-star")
        assert headers["X-Sidecar-Cache"] == "miss"
    assert origin.count("/vary-star") == 2
    cache = await api_cache(client, sc.admin)
    assert cache["backend"] == "memory"
    assert cache["entries"] == 2
    assert cache["bytes"] > 0


async def test_a_stale_entry_is_revalidated_with_its_etag_and_a_304_refreshes_it(
    origin: Origin, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(origin.base, "{}", SECRET)
    url = f"{sc.url}/api/etag"
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Sidecar-Cache"], body) == (200, "miss", {"n": 1})
    # max-age=0: the next call asks the upstream whether "v1" still holds; it does.
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Sidecar-Cache"], body) == (200, "revalidated", {"n": 1})
    assert origin.if_none_match == [None, '"v1"']
    # The 304's headers replaced the stored ones; its max-age made the entry fresh.
    assert headers["X-Version"] == "2"
    assert headers["Cache-Control"] == "max-age=60"
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Sidecar-Cache"], body) == (200, "hit", {"n": 1})
    assert headers["X-Version"] == "2"
    assert origin.count("/etag") == 2
    # The agent's own conditional request, answered from the fresh entry.
    status, headers, body = await fetch(client, url, If_None_Match='"v1"')
    assert (status, headers["X-Sidecar-Cache"], body) == (304, "hit", b"")
    assert headers["ETag"] == '"v1"'
    status, headers, body = await fetch(client, url, If_None_Match='"v0"')
    assert (status, headers["X-Sidecar-Cache"], body) == (200, "hit", {"n": 1})
    assert origin.count("/etag") == 2
    text = await metrics(client, sc.admin)
    assert 'sidecar_cache_requests_total{result="revalidated",service="api"} 1.0' in text
    assert SECRET not in text


async def test_last_modified_is_revalidated_with_if_modified_since(
    origin: Origin, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(origin.base, "{}", SECRET)
    url = f"{sc.url}/api/modified"
    results = []
    for _ in range(3):
        status, headers, body = await fetch(client, url)
        results.append((status, headers["X-Sidecar-Cache"], body))
    # no-cache: kept, but confirmed by the upstream before each use.
    assert results == [
        (200, "miss", {"n": 1}),
        (200, "revalidated", {"n": 1}),
        (200, "revalidated", {"n": 1}),
    ]
    assert origin.if_modified_since == [None, LAST_MODIFIED, LAST_MODIFIED]
    # An agent that has the answer already gets a 304 after the revalidation.
    status, headers, _ = await fetch(client, url, If_Modified_Since=LAST_MODIFIED)
    assert (status, headers["X-Sidecar-Cache"]) == (304, "revalidated")
    later = email.utils.formatdate(usegmt=True)
    status, _, _ = await fetch(client, url, If_Modified_Since=later)
    assert status == 304
    earlier = "Tue, 20 Oct 2015 07:28:00 GMT"
    status, _, body = await fetch(client, url, If_Modified_Since=earlier)
    assert (status, body) == (200, {"n": 1})


async def test_a_stale_entry_is_served_when_the_upstream_is_gone_if_the_answer_allows(
    cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    origin = Origin()
    runner = web.AppRunner(origin.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    sc = await cache_sidecar(f"http://127.0.0.1:{port}", "{}", SECRET)
    url = f"{sc.url}/api/stale-ok"
    _, headers, _ = await fetch(client, url)
    assert headers["X-Sidecar-Cache"] == "miss"
    # Stale already, and the upstream is up: it is asked again (no validator to send).
    _, headers, body = await fetch(client, url)
    assert (headers["X-Sidecar-Cache"], body) == ("miss", {"n": 2})
    await runner.cleanup()
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Sidecar-Cache"], body) == (200, "stale", {"n": 2})
    assert "X-Sidecar-Error" not in headers
    # Without stale-if-error (answer or policy), the agent sees the failure.
    status, headers, _ = await fetch(client, f"{sc.url}/api/other")
    assert (status, headers["X-Sidecar-Error"]) == (502, "upstream_unreachable")
    text = await metrics(client, sc.admin)
    assert 'sidecar_cache_requests_total{result="stale",service="api"} 1.0' in text


async def test_the_policys_stale_if_error_serves_an_entry_when_the_upstream_answers_503(
    origin: Origin, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(origin.base, "{stale_if_error: 10m}", SECRET)
    url = f"{sc.url}/api/etag"
    await fetch(client, url)
    origin.failing = True
    status, headers, body = await fetch(client, url)
    assert (status, headers["X-Sidecar-Cache"], body) == (200, "stale", {"n": 1})
    # The revalidation was tried first: the upstream saw the call and said 503.
    assert origin.count("/etag") == 2
    # A fresh entry is a hit whatever the upstream is doing; a path never cached fails.
    status, headers, _ = await fetch(client, f"{sc.url}/api/nothing")
    assert status == 503
    assert "X-Sidecar-Error" not in headers


async def test_age_counts_the_time_the_answer_spent_in_caches_before(
    origin: Origin, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(origin.base, "{ttl: 1h}", SECRET)
    await fetch(client, f"{sc.url}/api/aged")
    _, headers, _ = await fetch(client, f"{sc.url}/api/aged")
    assert headers["X-Sidecar-Cache"] == "hit"
    assert 100 <= int(headers["Age"]) < 1000
    # Older than its max-age when it came: stale at once, and without a validator not kept.
    await fetch(client, f"{sc.url}/api/too-old")
    _, headers, body = await fetch(client, f"{sc.url}/api/too-old")
    assert (headers["X-Sidecar-Cache"], body["n"]) == ("miss", 2)


async def test_scope_service_shares_entries_and_scope_agent_does_not(
    origin: Origin, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          shared:
            upstream: {origin.base}
            cache: {{scope: service}}
          own:
            upstream: {origin.base}
            cache: {{scope: agent, shared: false}}
        """
    )
    seen = []
    for service in ("shared", "own"):
        for agent in ("a1", "a2"):
            async with client.get(f"{sc.url}/{service}/x", headers={"X-Agent-Id": agent}) as r:
                seen.append(r.headers["X-Sidecar-Cache"])
    assert seen == ["miss", "hit", "miss", "miss"]


def test_scope_and_shared_that_disagree_are_refused(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "services:\n"
        "  api:\n"
        "    upstream: http://x\n"
        "    cache: {scope: agent, shared: true}\n"
    )
    with pytest.raises(PolicyError) as info:
        load_policy(str(tmp_path))
    (problem,) = [str(p) for p in info.value.problems]
    assert "shared: true contradicts scope: agent; write only one of them" in problem
    assert problem.startswith(f"{tmp_path}/p.yaml:5:")


async def test_memory_stays_within_both_bounds_under_10k_distinct_keys() -> None:
    evicted: list[int] = []
    store = CacheStore(max_entries=500, max_bytes=50_000, evicted=evicted.append)
    step = cache_step({"ttl": "1h", "max_entries": 500, "max_bytes": 50_000}, store, lambda: 1000.0)
    calls = 0

    async def origin(call: Call) -> Reply:
        nonlocal calls
        calls += 1
        # Bodies of varying size, so the byte bound and the entry bound both bite.
        size = 20 + (calls % 7) * 40
        return StaticReply(200, CIMultiDict({"Content-Type": "text/plain"}), b"x" * size)

    async def get(target: str) -> str:
        reply = await get_through(step, origin, target)
        assert reply.body is not None
        return reply.headers["X-Sidecar-Cache"]

    most_entries = most_bytes = 0
    for i in range(10_000):
        assert await get(f"/k/{i}") == "miss"
        most_entries = max(most_entries, len(store))
        most_bytes = max(most_bytes, store.bytes)
    assert most_entries <= 500
    assert most_bytes <= 50_000
    # Every entry dropped was counted, and what is left is the most recent.
    assert sum(evicted) == 10_000 - len(store)
    assert await get("/k/9999") == "hit"
    assert await get("/k/0") == "miss"
    assert calls == 10_001


async def test_evictions_and_sizes_are_in_the_metrics(
    origin: Origin, cache_sidecar: CacheSidecar, client: aiohttp.ClientSession
) -> None:
    sc = await cache_sidecar(origin.base, "{max_entries: 3}", SECRET)
    for i in range(5):
        await fetch(client, f"{sc.url}/api/p{i}")
    text = await metrics(client, sc.admin)
    assert 'sidecar_cache_evictions_total{service="api"} 2.0' in text
    assert 'sidecar_cache_entries{service="api"} 3.0' in text
    assert 'sidecar_cache_bytes{service="api"}' in text
    cache = await api_cache(client, sc.admin)
    assert (cache["entries"], cache["max_entries"]) == (3, 3)


async def test_freshness_and_the_stale_if_error_window_follow_the_clock() -> None:
    now = [1000.0]
    step = cache_step({"ttl": "1h"}, CacheStore(max_entries=10, max_bytes=1 << 20), lambda: now[0])
    down = [False]
    sent: list[str | None] = []

    async def origin(call: Call) -> Reply:
        sent.append(call.headers.get("If-None-Match"))
        if down[0]:
            raise ProblemError("upstream_unreachable", "down", service="api")
        headers = {"ETag": '"e"', "Cache-Control": "max-age=10, stale-if-error=20"}
        return StaticReply(200, CIMultiDict(headers), b"body")

    async def get() -> tuple[str, str]:
        reply = await get_through(step, origin, "/t")
        return reply.headers["X-Sidecar-Cache"], reply.headers.get("Age", "")

    assert await get() == ("miss", "")
    now[0] = 1005.0
    assert await get() == ("hit", "5")
    down[0] = True
    now[0] = 1015.0  # stale for 5 s: revalidation tried, the upstream is gone
    assert await get() == ("stale", "15")
    assert sent == [None, '"e"']
    now[0] = 1031.0  # past max-age + stale-if-error
    with pytest.raises(ProblemError):
        await get()
    down[0] = False
    assert await get() == ("miss", "")
    assert sent == [None, '"e"', '"e"', '"e"']
