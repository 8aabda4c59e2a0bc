"""The egress proxy as an agent sees it: routing, headers, streaming, errors."""

from __future__ import annotations

import asyncio
import gzip
import json

import aiohttp
from aiohttp import web

from tests.conftest import echo_app
from tests.helpers import stop_task


def _policy(**services: str) -> str:
    lines = ["version: 1", "services:"]
    for name, body in services.items():
        lines.append(f"  {name}:")
        lines.extend("    " + line for line in body.strip().splitlines())
    return "\n".join(lines) + "\n"


async def test_longest_prefix_wins_and_segments_are_whole(upstream, start_sidecar, client):
    a = await upstream(echo_app())
    b = await upstream(echo_app())
    sc = await start_sidecar(
        _policy(
            git=f"upstream: {a}/git-base",
            github=f"upstream: {a}/gh",
            ghdeep=f"upstream: {b}/deep\nprefix: /github/deep",
        )
    )
    async with client.get(f"{sc.url}/github/repos") as r:
        assert (await r.json())["raw_path"] == "/gh/repos"
    async with client.get(f"{sc.url}/github/deep/x") as r:
        assert (await r.json())["raw_path"] == "/deep/x"
    async with client.get(f"{sc.url}/git/x") as r:
        assert (await r.json())["raw_path"] == "/git-base/x"
    async with client.get(f"{sc.url}/githubx/y") as r:
        assert r.status == 404
        assert r.headers["X-Sidecar-Error"] == "no_route"


async def test_query_and_encoded_path_pass_unchanged(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(_policy(svc=f"upstream: {base}"))
    url = f"{sc.url}/svc/files/a%2Fb%20c?q=x%20y&q=2&empty="
    async with client.get(yarl_encoded(url)) as r:
        data = await r.json()
    assert data["raw_path"] == "/files/a%2Fb%20c?q=x%20y&q=2&empty="


async def test_bare_prefix_maps_to_upstream_root(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(_policy(svc=f"upstream: {base}/v1"))
    async with client.get(f"{sc.url}/svc?x=1") as r:
        assert (await r.json())["raw_path"] == "/v1/?x=1"


async def test_headers_hop_by_hop_host_and_rules(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(
        _policy(
            svc=f"""
upstream: {base}
headers:
  set: {{User-Agent: agent-sidecar, X-Team: blue}}
  remove: [Cookie, X-Debug]
"""
        )
    )
    headers = {
        "Host": "evil.example",
        "Connection": "keep-alive, X-Per-Hop",
        "X-Per-Hop": "1",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic abc",
        "Cookie": "session=1",
        "X-Debug": "1",
        "X-Agent-Id": "agent-7",
        "X-Custom": "kept",
        "User-Agent": "agent-ua",
        # Dropped however spelled; kept when only the length matches a dropped name.
        "x-DeBuG": "2",
        "X-Debuh": "same length as X-Debug",
        "X-Long-" + "n" * 300: "a name past the length table",
    }
    async with client.get(f"{sc.url}/svc/h", headers=headers) as r:
        seen = (await r.json())["headers"]
    lower = {k.lower(): v for k, v in seen.items()}
    assert lower["x-debuh"] == "same length as X-Debug"
    assert lower["x-long-" + "n" * 300] == "a name past the length table"
    assert lower["host"] == base.removeprefix("http://")
    assert lower["user-agent"] == "agent-sidecar"
    assert lower["x-team"] == "blue"
    assert lower["x-custom"] == "kept"
    for gone in ("x-per-hop", "keep-alive", "proxy-authorization", "cookie", "x-debug"):
        assert gone not in lower, gone
    # The agent's identity is the sidecar's business, not the upstream's.
    assert "x-agent-id" not in lower


async def test_response_hop_by_hop_removed_other_headers_kept(upstream, start_sidecar, client):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            text="ok",
            headers={
                "Connection": "X-Hop",
                "X-Hop": "1",
                "X-Request-Id": "r-1",
                "Set-Cookie": "a=b; Path=/",
            },
        )

    app = web.Application()
    app.router.add_get("/x", handler)
    sc = await start_sidecar(_policy(svc=f"upstream: {await upstream(app)}"))
    async with client.get(f"{sc.url}/svc/x") as r:
        assert r.status == 200
        assert r.headers["X-Request-Id"] == "r-1"
        assert "X-Hop" not in r.headers
        assert r.headers["Set-Cookie"] == "a=b; Path=/"


async def test_compressed_bytes_pass_through_untouched(upstream, start_sidecar, client):
    payload = gzip.compress(b'{"hello": "world"}' * 100)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(
            body=payload, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    app = web.Application()
    app.router.add_get("/z", handler)
    sc = await start_sidecar(_policy(svc=f"upstream: {await upstream(app)}"))
    async with client.get(f"{sc.url}/svc/z", headers={"Accept-Encoding": "gzip"}) as r:
        assert r.headers["Content-Encoding"] == "gzip"
        assert int(r.headers["Content-Length"]) == len(payload)
        assert await r.read() == payload


async def test_sse_events_arrive_one_by_one(upstream, start_sidecar, client):
    release = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        # The second event is held back until the test saw the first one:
        # a buffering proxy would deadlock here and the test would time out.
        await release.wait()
        await resp.write(b"data: second\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", sse)
    sc = await start_sidecar(_policy(svc=f"upstream: {await upstream(app)}"))
    async with client.get(f"{sc.url}/svc/events") as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert first == b"data: first\n\n"
        release.set()
        second = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
        assert second == b"data: second\n\n"


async def test_request_body_streams_to_upstream(upstream, start_sidecar, client):
    got_first = asyncio.Event()
    chunks: list[bytes] = []

    async def upload(request: web.Request) -> web.Response:
        async for chunk in request.content.iter_any():
            chunks.append(chunk)
            got_first.set()
        return web.json_response({"size": sum(map(len, chunks))})

    app = web.Application()
    app.router.add_post("/up", upload)
    sc = await start_sidecar(_policy(svc=f"upstream: {await upstream(app)}"))

    async def body():
        yield b"a" * 1000
        # The upstream must see the first chunk before the agent sends the rest.
        await asyncio.wait_for(got_first.wait(), 5)
        yield b"b" * 1000

    async with client.post(f"{sc.url}/svc/up", data=body()) as r:
        assert (await r.json()) == {"size": 2000}


async def test_head_204_304(upstream, start_sidecar, client):
    async def resource(request: web.Request) -> web.Response:
        return web.Response(body=b"x" * 50, headers={"ETag": '"v1"'})

    async def empty(request: web.Request) -> web.Response:
        return web.Response(status=204)

    async def cached(request: web.Request) -> web.Response:
        return web.Response(status=304, headers={"ETag": '"v1"'})

    app = web.Application()
    app.router.add_get("/r", resource)  # aiohttp answers HEAD from the GET handler
    app.router.add_delete("/e", empty)
    app.router.add_get("/c", cached)
    sc = await start_sidecar(_policy(svc=f"upstream: {await upstream(app)}"))
    async with client.head(f"{sc.url}/svc/r") as r:
        assert r.status == 200
        assert r.headers["Content-Length"] == "50"
        assert await r.read() == b""
    async with client.delete(f"{sc.url}/svc/e") as r:
        assert r.status == 204
        assert await r.read() == b""
    async with client.get(f"{sc.url}/svc/c", headers={"If-None-Match": '"v1"'}) as r:
        assert r.status == 304
        assert r.headers["ETag"] == '"v1"'
    # The connection is still usable after all three (no stray body bytes on it).
    async with client.get(f"{sc.url}/svc/r") as r:
        assert await r.read() == b"x" * 50


async def test_no_cookie_leaks_between_agents(upstream, start_sidecar, client):
    async def set_cookie(request: web.Request) -> web.Response:
        resp = web.json_response({"cookie": request.headers.get("Cookie")})
        resp.set_cookie("session", "agent-a-secret")
        return resp

    app = web.Application()
    app.router.add_get("/c", set_cookie)
    sc = await start_sidecar(_policy(svc=f"upstream: {await upstream(app)}"))
    async with (
        aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as a,
        a.get(f"{sc.url}/svc/c", headers={"X-Agent-Id": "a"}) as r,
    ):
        assert "session=agent-a-secret" in r.headers["Set-Cookie"]
    async with client.get(f"{sc.url}/svc/c", headers={"X-Agent-Id": "b"}) as r:
        assert (await r.json())["cookie"] is None


async def test_client_disconnect_cancels_upstream_call(upstream, start_sidecar):
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    base = await upstream(app)
    sc = await start_sidecar(_policy(svc=f"upstream: {base}"))
    async with aiohttp.ClientSession() as session:
        task = asyncio.ensure_future(session.get(f"{sc.url}/svc/slow"))
        await asyncio.wait_for(started.wait(), 5)
        await stop_task(task)
    await asyncio.wait_for(cancelled.wait(), 5)


def _problem(body: bytes) -> dict[str, object]:
    data = json.loads(body)
    assert set(data) >= {"type", "title", "status", "detail", "service", "reason"}
    return data  # type: ignore[no-any-return]


async def test_upstream_unreachable_is_502_problem(start_sidecar, client, closed_port):
    sc = await start_sidecar(_policy(svc=f"upstream: http://127.0.0.1:{closed_port}"))
    async with client.get(f"{sc.url}/svc/x") as r:
        assert r.status == 502
        assert r.headers["X-Sidecar-Error"] == "upstream_unreachable"
        assert r.headers["Content-Type"] == "application/problem+json"
        data = _problem(await r.read())
    assert data["service"] == "svc"
    assert data["reason"] == "upstream_unreachable"
    assert data["status"] == 502


async def test_upstream_timeout_is_504_problem(upstream, start_sidecar, client):
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/slow", slow)
    sc = await start_sidecar(
        _policy(svc=f"upstream: {await upstream(app)}\ntimeout: {{total: 200ms}}")
    )
    async with client.get(f"{sc.url}/svc/slow") as r:
        assert r.status == 504
        assert r.headers["X-Sidecar-Error"] == "upstream_timeout"
        data = _problem(await r.read())
    assert "0.2s" in str(data["detail"])


async def test_request_too_large_is_413(upstream, start_sidecar, client):
    hits = 0

    async def sink(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        await request.read()
        return web.Response(text="ok")

    app = web.Application(client_max_size=10_000_000)
    app.router.add_post("/s", sink)
    sc = await start_sidecar(_policy(svc=f"upstream: {await upstream(app)}\nmax_body: 1KiB"))
    async with client.post(f"{sc.url}/svc/s", data=b"x" * 2048) as r:
        assert r.status == 413
        assert r.headers["X-Sidecar-Error"] == "request_too_large"
        _problem(await r.read())

    async def chunked():
        for _ in range(4):
            yield b"y" * 512

    async with client.post(f"{sc.url}/svc/s", data=chunked()) as r:
        assert r.status == 413
        assert r.headers["X-Sidecar-Error"] == "request_too_large"
    async with client.post(f"{sc.url}/svc/s", data=b"x" * 1024) as r:
        assert r.status == 200
    assert hits == 1


async def test_upstream_429_and_503_pass_through_unchanged(upstream, start_sidecar, client):
    async def busy(request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        return web.json_response({"upstream": True}, status=code, headers={"Retry-After": "7"})

    app = web.Application()
    app.router.add_get("/busy/{code}", busy)
    base = await upstream(app)
    # One service per code: each answer also pauses its service (tests/steps/test_pause*).
    sc = await start_sidecar(_policy(a429=f"upstream: {base}", a503=f"upstream: {base}"))
    for code in (429, 503):
        async with client.get(f"{sc.url}/a{code}/busy/{code}") as r:
            assert r.status == code
            assert "X-Sidecar-Error" not in r.headers
            assert r.headers["Retry-After"] == "7"
            assert await r.json() == {"upstream": True}


async def test_dot_segments_refused(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(_policy(svc=f"upstream: {base}/v1"))
    for path in ("/svc/../admin", "/svc/%2e%2e/admin", "/svc/a/./b"):
        async with client.get(yarl_encoded(sc.url + path)) as r:
            assert r.status == 400, path
            assert r.headers["X-Sidecar-Error"] == "bad_request"


def yarl_encoded(url: str) -> object:
    from yarl import URL

    return URL(url, encoded=True)
