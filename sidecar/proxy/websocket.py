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

from ..headers import SERVER

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
    agent.headers["Server"] = SERVER  # the handshake with the agent is the sidecar's own
    await agent.prepare(request)
    closing: set[WebSocket] = set()
    to_upstream = asyncio.ensure_future(_pump(agent, upstream.ws, closing))
    to_agent = asyncio.ensure_future(_pump(upstream.ws, agent, closing))
    try:
        done, pending = await asyncio.wait(
            (to_upstream, to_agent), return_when=asyncio.FIRST_COMPLETED
        )
        if pending and any(_ended_on_close(task) for task in done):
            # One side sent a close: its peer's answering close comes back the other way.
            await asyncio.wait(pending, timeout=CLOSE_REPLY_WAIT)
    finally:
        for task in (to_upstream, to_agent):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await upstream.ws.close()
        await agent.close()
    return agent


WebSocket = web.WebSocketResponse | aiohttp.ClientWebSocketResponse

# How long the relay waits for the answering close once one side sent a close.
CLOSE_REPLY_WAIT = 10.0
# Codes that name a condition and never travel in a close frame (RFC 6455 7.4.1).
_UNSENDABLE_CODES = frozenset({0, 1005, 1006, 1015})


def _ended_on_close(pump: asyncio.Future[bool]) -> bool:
    return not pump.cancelled() and pump.exception() is None and pump.result()


def close_frame(code: int, reason: str) -> bytes:
    """The payload of a close frame carrying `code` and `reason`, as the peer sent them."""
    if code in _UNSENDABLE_CODES:
        return b""
    return code.to_bytes(2, "big") + reason.encode()


async def _pump(source: WebSocket, sink: WebSocket, closing: set[WebSocket]) -> bool:
    """Relay `source`'s frames to `sink`; True when it ended on a close from `source`."""
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
            closing.add(source)
            if sink in closing:
                # The answer to the close `sink` sent: the closing handshake ends.
                await sink.close(code=msg.data, message=(msg.extra or "").encode())
            else:
                # Passed on as a frame, not with close(): close() would swallow the
                # answering close's reason; the other pump relays that answer.
                await sink.send_frame(close_frame(msg.data, msg.extra or ""), WSMsgType.CLOSE)
            return True
        else:  # CLOSING, CLOSED, ERROR: this side is gone
            return False
