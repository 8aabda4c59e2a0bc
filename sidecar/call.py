"""What flows through a service's chain of steps.

A `Call` is the agent's request as it will be sent upstream (method, target,
headers, body); a step may change it, answer for itself by raising
`ProblemError`, or pass it on. The answer is the upstream's response, not yet
streamed back to the agent, so any step can still look at its status and
headers, and discard it to try again.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, Protocol

from aiohttp import StreamReader, web
from multidict import CIMultiDict, CIMultiDictProxy


class Reply(Protocol):
    """An upstream's answer as the steps see it: an aiohttp ClientResponse, or a
    WebSocket handshake's outcome (see proxy/websocket.py)."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    def release(self) -> Any: ...


Body = bytes | AsyncIterable[bytes] | None
Handler = Callable[["Call"], Awaitable[Reply]]


class Call:
    __slots__ = (
        "agent",
        "attempt",
        "body",
        "exchange",
        "headers",
        "method",
        "request",
        "service",
        "target",
        "upgrade",
    )

    def __init__(
        self,
        *,
        service: str,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: Body,
        agent: str | None,
        request: web.BaseRequest | None = None,
    ) -> None:
        self.service = service
        self.method = method
        self.target = target  # path and query, already encoded, upstream base path included
        self.headers = headers
        self.body = body
        self.agent = agent
        self.request = request
        self.attempt = 1
        # A WebSocket handshake: the last step connects a WebSocket instead of a request.
        self.upgrade = False
        # Telemetry's record of this agent request (telemetry.Exchange), when observed.
        self.exchange: Any = None


class Step(Protocol):
    """One policy step: `async (call, next) -> reply`, built once per (re)load."""

    async def __call__(self, call: Call, next: Handler) -> Reply: ...


# Largest request body held in memory so a call can be sent again (a retry, a
# refreshed credential); a larger one is tried once.
REPLAY_LIMIT = 1 << 20


async def make_replayable(call: Call, limit: int = REPLAY_LIMIT) -> bool:
    """Read the body into memory (if at most `limit` bytes) so the call can be sent again.

    Retries and credential refreshes re-send a call; a streamed body can be
    read only once. Bodies of unknown length, or larger than `limit`, stay
    streamed, and the call is then tried once only.
    """
    body = call.body
    if body is None or isinstance(body, bytes):
        return True
    request = call.request
    if not isinstance(body, StreamReader) or request is None:
        return False
    length = request.content_length
    if length is None or length > limit:
        return False
    call.body = await body.readexactly(length) if length else b""
    return True
