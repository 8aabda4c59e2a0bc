"""Edge cases of the proxy found in review: each is what an agent or operator would hit."""

from __future__ import annotations

import asyncio
from pathlib import Path

from aiohttp import web
from yarl import URL

from tests.conftest import echo_app
from tests.helpers import eventually


async def raw_exchange(url: str, data: bytes) -> bytes:
    """Send bytes on a fresh connection and read until the peer closes or 2 s pass."""
    host, port = URL(url).host, URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(data)
    await writer.drain()
    chunks = []
    try:
        while chunk := await asyncio.wait_for(reader.read(65536), 2):
            chunks.append(chunk)
    except TimeoutError:
        pass
    writer.close()
    return b"".join(chunks)


async def raw_server(response: bytes) -> tuple[str, asyncio.Server]:
    """An upstream that answers every request with exactly these bytes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(response)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", server


async def test_reload_does_not_close_the_pool_of_a_queued_call(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    policy = f"""
    version: 1
    services:
      s:
        upstream: {base}
        timeout: {{connect: 2s}}
        rate_limit: {{rate: 1/s, burst: 1, max_wait: 5s}}
    """
    sc = await start_sidecar(policy)
    async with client.get(f"{sc.url}/s/first") as r:
        assert r.status == 200
    queued = asyncio.ensure_future(client.get(f"{sc.url}/s/second"))
    await asyncio.sleep(0.1)  # the second call is now waiting for a token
    sc.write("policy.yaml", policy.replace("connect: 2s", "connect: 3s"))
    assert (await sc.sidecar.reload("test")).changed  # a new pool; the old one is retired
    async with await queued as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["path"] == "/second"


async def test_expect_100_continue_is_answered_by_the_sidecar(upstream, start_sidecar):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  s:\n    upstream: {base}\n")
    host, port = URL(sc.url).host, URL(sc.url).port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(
        b"POST /s/up HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n\r\n"
    )
    await writer.drain()
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 Continue")
    writer.write(b"hello")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200")
    assert b'"body": "hello"' in answer
    assert b"Expect" not in answer  # the upstream never saw the agent's Expect


async def test_unsafe_paths_are_refused(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  s:\n    upstream: {base}/base\n")
    for path in ("/s/..;/x", "/s/..%5cx", "/s/a/%2E%2E/b", "/s/..\\x"):
        async with client.get(URL(sc.url + path, encoded=True)) as r:
            assert r.status == 400, path
            assert r.headers["X-Sidecar-Error"] == "bad_request"
    answer = await raw_exchange(
        sc.url, b"GET /s/..#frag HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 400"), answer[:80]
    # Dots inside a segment are ordinary names.
    async with client.get(f"{sc.url}/s/v1.2/file..json") as r:
        assert (await r.json())["path"] == "/base/v1.2/file..json"


async def test_trace_is_refused_and_never_reaches_the_upstream(upstream, start_sidecar, client):
    hits = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal hits
        hits += 1
        return web.Response(text=str(dict(request.headers)))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    sc = await start_sidecar(
        f"version: 1\nservices:\n  s:\n    upstream: {await upstream(app)}\n"
        "    auth: {type: bearer, token: sk-never-echoed}\n"
    )
    async with client.request("TRACE", f"{sc.url}/s/x") as r:
        assert r.status == 405
        assert r.headers["X-Sidecar-Error"] == "method_not_allowed"
        assert "GET" in r.headers["Allow"]
        assert "sk-never-echoed" not in await r.text()
    assert hits == 0


async def test_idle_bounds_silence_in_a_body_not_the_wait_for_headers(
    upstream, start_sidecar, client
):
    async def slow_headers(request: web.Request) -> web.Response:
        await asyncio.sleep(0.5)
        return web.Response(text="worth the wait")

    app = web.Application()
    app.router.add_get("/slow", slow_headers)
    sc = await start_sidecar(
        f"version: 1\nservices:\n  s:\n    upstream: {await upstream(app)}\n"
        "    timeout: {idle: 200ms, total: 5s}\n"
    )
    async with client.get(f"{sc.url}/s/slow") as r:
        assert r.status == 200
        assert await r.text() == "worth the wait"


async def test_no_content_type_is_invented(start_sidecar, client):
    base, server = await raw_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    async with server:
        sc = await start_sidecar(f"version: 1\nservices:\n  s:\n    upstream: {base}\n")
        async with client.get(f"{sc.url}/s/x") as r:
            assert await r.read() == b"hi"
            assert "Content-Type" not in r.headers


async def test_query_auth_keeps_the_agents_other_parameters_byte_for_byte(
    upstream, start_sidecar, client
):
    sc = await start_sidecar(
        f"version: 1\nservices:\n  s:\n    upstream: {await upstream(echo_app())}\n"
        "    auth: {type: query, name: api_key, value: k1}\n"
    )
    url = URL(f"{sc.url}/s/x?flag&a=1+2&api_key=agent&b=%2F", encoded=True)
    async with client.get(url) as r:
        raw_query = (await r.json())["raw_path"].partition("?")[2]
    assert raw_query == "flag&a=1+2&b=%2F&api_key=k1"


async def test_watcher_survives_a_file_the_loader_chokes_on(
    upstream, start_sidecar, client, tmp_path: Path
):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  a:\n    upstream: {base}\n", watch=True)
    sc.write("bad.yaml", "version: 1\nx: &a [*a]\n")

    def refused() -> bool:
        last = sc.sidecar.last_reload
        return last is not None and not last.ok

    await eventually(refused, "the self-referencing file is refused")
    assert sc.sidecar.last_reload is not None
    assert "recursive alias" in sc.sidecar.last_reload.errors[0]
    (sc.policies / "bad.yaml").unlink()
    sc.write("b.yaml", f"version: 1\nservices:\n  b:\n    upstream: {base}\n")

    async def served() -> bool:
        async with client.get(f"{sc.url}/b/x") as r:
            return r.status == 200

    await eventually(served, "hot reload still works after the bad file")
