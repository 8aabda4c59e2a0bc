"""WebSocket calls through the sidecar: handshake through the chain, frames both ways."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import WSMsgType, web


def ws_upstream(seen: dict[str, object]) -> web.Application:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        seen["authorization"] = request.headers.get("Authorization")
        seen["path"] = request.path_qs
        ws = web.WebSocketResponse(protocols=("v2.chat",), autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                if msg.data == "bye":
                    await ws.close(code=4000, message=b"done")
                    break
                await ws.send_str(f"echo:{msg.data}")
            elif msg.type is WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
            elif msg.type is WSMsgType.PING:
                await ws.pong(msg.data)
        return ws

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403, text="no")

    app = web.Application()
    app.router.add_get("/v1/realtime", handler)
    app.router.add_get("/v1/forbidden", refuse)
    return app


async def test_websocket_round_trip_with_injected_credential(upstream, start_sidecar, client):
    seen: dict[str, object] = {}
    base = await upstream(ws_upstream(seen))
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          rt:
            upstream: {base}/v1
            auth: {{type: bearer, token: sk-upstream}}
        """
    )
    async with client.ws_connect(
        f"{sc.url}/rt/realtime?model=x",
        headers={"Authorization": "Bearer agent-guess"},
        protocols=("v1.chat", "v2.chat"),
        autoping=False,
    ) as ws:
        assert ws.protocol == "v2.chat"
        await ws.send_str("hello")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:hello"
        await ws.send_bytes(b"\x00\x01\x02")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == b"\x02\x01\x00"
        await ws.ping(b"are you there")
        pong = await asyncio.wait_for(ws.receive(), 5)
        assert pong.type is WSMsgType.PONG and pong.data == b"are you there"
        await ws.send_str("bye")
        closing = await asyncio.wait_for(ws.receive(), 5)
        assert closing.type is WSMsgType.CLOSE
        assert closing.data == 4000  # the upstream's close code reaches the agent
    assert seen == {"authorization": "Bearer sk-upstream", "path": "/v1/realtime?model=x"}


async def test_refused_handshake_passes_status_back(upstream, start_sidecar, client):
    base = await upstream(ws_upstream({}))
    sc = await start_sidecar(f"version: 1\nservices:\n  rt:\n    upstream: {base}/v1\n")
    try:
        async with client.ws_connect(f"{sc.url}/rt/forbidden"):
            raise AssertionError("the handshake should have been refused")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 403
        assert "X-Sidecar-Error" not in (exc.headers or {})


async def test_agent_closing_closes_upstream(upstream, start_sidecar, client):
    closed = asyncio.Event()

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for _ in ws:
            pass
        closed.set()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    sc = await start_sidecar(f"version: 1\nservices:\n  w:\n    upstream: {await upstream(app)}\n")
    async with client.ws_connect(f"{sc.url}/w/ws") as ws:
        await ws.send_str("x")
    await asyncio.wait_for(closed.wait(), 5)
