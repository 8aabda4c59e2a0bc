"""WebSocket calls: the handshake goes through the service's chain, then messages are relayed.

The handshake is an ordinary call for the steps (rate limit, breaker,
timeout, auth): the credential is injected into the upstream handshake, a
refused handshake passes its status back. Once both sides are open, every
frame (text, binary, ping, pong, close with its code) is passed on as it
comes, in both directions, until one side closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

log = logging.getLogger("sidecar.websocket")

# Made afresh by the sidecar for its own handshake with the upstream.
HANDSHAKE_HEADERS = frozenset(
    {"sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions"}
)


def is_upgrade(request: web.BaseRequest) -> bool:
    upgrade = request.headers.get("Upgrade")
    return upgrade is not None and upgrade.lower() == "websocket"


@dataclass(slots=True)
class Upgraded:
    """The upstream accepted the handshake: a Reply whose body is a WebSocket."""

    ws: aiohttp.ClientWebSocketResponse
    status: int = 101
    reason: str | None = "Switching Protocols"
    content_length: int | None = None
    headers: CIMultiDictProxy[str] = field(
        default_factory=lambda: CIMultiDictProxy(CIMultiDict[str]())
    )

    def release(self) -> None:
        # A retry or a refused call drops the socket; closing is async, so schedule it.
        if not self.ws.closed:
            asyncio.get_running_loop().create_task(self.ws.close())


@dataclass(slots=True)
class Refused:
    """The upstream answered the handshake with something other than 101."""

    status: int
    reason: str | None
    headers: CIMultiDictProxy[str]
    content_length: int | None = 0

    def release(self) -> None:
        pass


async def connect(
    session: aiohttp.ClientSession, url: URL, headers: CIMultiDict[str]
) -> Upgraded | Refused:
    protocols = [
        p.strip() for p in headers.popall("Sec-WebSocket-Protocol", []) for p in p.split(",")
    ]
    for name in HANDSHAKE_HEADERS:
        headers.popall(name, None)
    try:
        ws = await session.ws_connect(
            url,
            headers=headers,
            protocols=[p for p in protocols if p],
            autoclose=False,  # close frames are relayed, with their codes
            autoping=False,  # pings are relayed too: the agent and upstream keep time
            max_msg_size=0,
        )
    except aiohttp.WSServerHandshakeError as exc:
        return Refused(
            status=exc.status,
            reason=exc.message,
            headers=CIMultiDictProxy(CIMultiDict(exc.headers or {})),
        )
    return Upgraded(ws=ws)


async def relay(request: web.BaseRequest, upstream: Upgraded) -> web.WebSocketResponse:
    protocols = (upstream.ws.protocol,) if upstream.ws.protocol else ()
    agent = web.WebSocketResponse(
        protocols=protocols, autoclose=False, autoping=False, max_msg_size=0
    )
    await agent.prepare(request)
    to_upstream = asyncio.ensure_future(_pump(agent, upstream.ws))
    to_agent = asyncio.ensure_future(_pump(upstream.ws, agent))
    try:
        await asyncio.wait((to_upstream, to_agent), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_upstream, to_agent):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await upstream.ws.close()
        await agent.close()
    return agent


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse


async def _pump(source: WebSocket, sink: WebSocket) -> None:
    while True:
        msg = await source.receive()
        kind = msg.type
        if kind is WSMsgType.TEXT:
            await sink.send_str(msg.data)
        elif kind is WSMsgType.BINARY:
            await sink.send_bytes(msg.data)
        elif kind is WSMsgType.PING:
            await sink.ping(msg.data)
        elif kind is WSMsgType.PONG:
            await sink.pong(msg.data)
        elif kind is WSMsgType.CLOSE:
            await sink.close(code=msg.data, message=(msg.extra or "").encode())
            return
        else:  # CLOSING, CLOSED, ERROR: this side is gone
            return
