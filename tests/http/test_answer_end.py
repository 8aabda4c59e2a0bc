"""What must hold however an exchange ends: an upstream connection that still
waits for a body never carries another call, and every answer is accounted for
(the in-flight gauge, the pool's count of calls using it) when the agent hangs
up mid-body or after a WebSocket session."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import WSMsgType, web

from tests.helpers import eventually

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _raw_server(handle: Handler) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_an_upstream_answering_before_the_upload_ends_never_gets_another_call(
    start_sidecar,
):
    seen: list[bytearray] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        log = bytearray()
        seen.append(log)
        while True:
            try:
                head = await _head(reader)
            except asyncio.IncompleteReadError:
                return
            log += head
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # before any body
            if head.startswith(b"POST"):
                # What still arrives on this connection: the rest of the upload, or,
                # were the connection pooled, the next call glued to it.
                while data := await reader.read(1000):
                    log += data
                return

    server, port = await _raw_server(upstream)
    try:
        sc = await start_sidecar(
            f"version: 1\nservices:\n  rt: {{upstream: 'http://127.0.0.1:{port}'}}\n"
        )
        host, eport = sc.url.removeprefix("http://").split(":")
        r, w = await asyncio.open_connection(host, int(eport))
        w.write(b"POST /rt/upload HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\nAAAAA")
        assert (await _head(r)).startswith(b"HTTP/1.1 200")
        assert await r.readexactly(2) == b"ok"
        # The rest of the upload, then the next call on the same agent connection: it is
        # answered once the sidecar has taken (and dropped) those bytes.
        w.write(b"B" * 15 + b"GET /rt/next HTTP/1.1\r\nHost: a\r\n\r\n")
        async with asyncio.timeout(10):
            assert (await _head(r)).startswith(b"HTTP/1.1 200")
        for path in (b"/rt/second", b"/rt/third"):
            r2, w2 = await asyncio.open_connection(host, int(eport))
            w2.write(b"GET " + path + b" HTTP/1.1\r\nHost: a\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await _head(r2)).startswith(b"HTTP/1.1 200")
            w2.close()
        w.close()
        # The upload's connection carried nothing but the upload.
        assert seen[0].startswith(b"POST /upload ")
        assert b"GET" not in seen[0]
    finally:
        server.close()


async def test_a_hang_up_during_a_refused_upload_leaves_nothing_counted(start_sidecar):
    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _head(reader)
        writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\nno")
        while await reader.read(1000):
            pass

    server, port = await _raw_server(upstream)
    try:
        sc = await start_sidecar(
            f"version: 1\nservices:\n  rt: {{upstream: 'http://127.0.0.1:{port}'}}\n"
        )
        host, eport = sc.url.removeprefix("http://").split(":")
        route = sc.sidecar.router.match("/rt/x")
        gauge = sc.sidecar.telemetry.metrics.in_flight
        for target in (b"/nothing/here", b"/rt/upload"):
            r, w = await asyncio.open_connection(host, int(eport))
            w.write(b"POST " + target + b" HTTP/1.1\r\nHost: a\r\nContent-Length: 20\r\n\r\nAAAAA")
            await _head(r)
            w.close()  # the agent read its answer and left without the rest of its body
            await eventually(lambda: gauge._value.get() == 0, "the in-flight gauge back at 0")
            await eventually(lambda: route.upstream.inflight == 0, "the pool's count at 0")
    finally:
        server.close()


async def test_websocket_sessions_give_back_their_pool_count(upstream, start_sidecar, client):
    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                await ws.send_str(msg.data)
        return ws

    app = web.Application()
    app.router.add_get("/ws", echo)
    base = await upstream(app)
    sc = await start_sidecar(f"version: 1\nservices:\n  rt: {{upstream: '{base}'}}\n")
    route = sc.sidecar.router.match("/rt/x")
    for _ in range(3):
        ws = await client.ws_connect(f"{sc.url}/rt/ws")
        await ws.send_str("ping")
        assert (await ws.receive()).data == "ping"
        await ws.close()
    await eventually(lambda: route.upstream.inflight == 0, "the pool's count at 0")


def test_a_header_that_would_split_the_message_is_refused_without_its_value() -> None:
    import pytest

    from sidecar.http.http1 import head_bytes

    with pytest.raises(ValueError) as refused:
        head_bytes(b"GET / HTTP/1.1\r\n", [("Authorization", "Bearer sk-SECRET\r\nX-Evil: 1")])
    assert "Authorization" in str(refused.value)
    assert "SECRET" not in str(refused.value)
