"""The egress listener: match a route, run its chain, stream the answer back.

Bodies stream both ways without buffering: the agent's upload is fed to the
upstream as it arrives, and the upstream's answer reaches the agent chunk by
chunk (an SSE event as soon as the upstream sends it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import ClientResponse, web

from ..call import Body, Reply
from ..headers import HOP_BY_HOP, drop_with_connection
from ..problems import ProblemError, problem_response
from ..telemetry import Exchange, Telemetry
from ..webhooks.hub import WebhookHub
from ..webhooks.listener import OUTBOUND_PREFIX, outbound_answer
from .router import Route, Router
from .websocket import Upgraded, is_upgrade
from .websocket import relay as relay_websocket

log = logging.getLogger("sidecar.proxy")

# Statuses whose responses never carry a body (RFC 9110 6.4.1).
_NO_BODY = frozenset({204, 304})
# X-Sidecar-Error marks the sidecar's own answers: an upstream may not forge one.
_RESPONSE_DROP = HOP_BY_HOP | {"content-length", "x-sidecar-error"}
# Methods the sidecar will not carry: TRACE would echo the injected credential
# back to the agent; CONNECT would make it a tunnel to anywhere.
_REFUSED_METHODS = frozenset({"TRACE", "CONNECT"})
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Why a relayed answer ended before its last byte (access log, metrics, spans).
IDLE_CUT = "upstream_idle_timeout"
RESET_CUT = "upstream_reset"


class _Relayed(web.StreamResponse):
    """An upstream's answer: aiohttp must not invent a Content-Type the upstream did
    not send (it would change how the agent reads the body), nor a Server."""

    async def _prepare_headers(self) -> None:
        headers = self.headers
        typed = "Content-Type" in headers
        named = "Server" in headers
        await super()._prepare_headers()
        if not typed:
            headers.popall("Content-Type", None)
        if not named:
            headers.popall("Server", None)


def unsafe_path(raw: str) -> bool:
    """True when the target could leave the upstream's base path once an upstream
    normalizes it: a '.' or '..' segment, however spelled (%2e, %2f, backslash,
    ';' parameters), or a fragment, which an origin-form target never has."""
    if "#" in raw:
        return True
    path = raw.partition("?")[0]
    if "." not in path and "%" not in path and "\\" not in path:
        return False  # the common case: nothing that could spell a dot segment
    path = path.lower().replace("%2e", ".").replace("%2f", "/").replace("%5c", "/")
    for segment in path.replace("\\", "/").split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            return True
    return False


def cut_reason(exc: BaseException) -> str | None:
    """Why a relayed answer stopped early: the upstream fell silent past
    `timeout.idle`, or its connection failed; None when the agent's side failed."""
    if isinstance(exc, TimeoutError):
        return IDLE_CUT
    if isinstance(exc, aiohttp.ClientConnectionResetError):
        return None  # a write to the agent's closing connection
    return RESET_CUT


class EgressHandler:
    """The aiohttp low-level handler; `router` is read once per request, never locked."""

    def __init__(
        self,
        current: Callable[[], Router | None],
        telemetry: Telemetry | None = None,
        webhooks: WebhookHub | None = None,
    ) -> None:
        self._current = current
        # Agents post outbound events to /_webhooks/<name>; never routed to a service.
        self.webhooks = webhooks
        # None: no metrics, spans or access log, and the request path pays nothing for them.
        self.telemetry = telemetry

    async def __call__(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.telemetry is not None:
            return await self.telemetry.observe(request, self._handle)
        return await self._handle(request, None)

    async def _handle(
        self, request: web.BaseRequest, exchange: Exchange | None
    ) -> web.StreamResponse:
        router = self._current()
        raw = request.raw_path
        if unsafe_path(raw):
            return problem_response(
                ProblemError(
                    "bad_request",
                    "The path has '.' or '..' segments or a '#' fragment; send a normalized "
                    "path without a fragment.",
                )
            )
        if raw.startswith(OUTBOUND_PREFIX) and self.webhooks is not None:
            return await outbound_answer(self.webhooks, request)
        if request.method in _REFUSED_METHODS:
            return problem_response(
                ProblemError(
                    "method_not_allowed",
                    f"The sidecar does not forward {request.method} requests; use GET, POST, "
                    "PUT, PATCH, DELETE, HEAD or OPTIONS.",
                    headers={"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"},
                )
            )
        route = router.match(raw) if router is not None else None
        if route is None:
            return problem_response(
                ProblemError(
                    "no_route",
                    f"No service is configured for the path {raw.partition('?')[0]!r}; call "
                    "http://<sidecar>/<service>/... with a service the policy defines.",
                )
            )
        if exchange is not None:
            exchange.route = route
        upstream = route.upstream
        # Counted from here to the last byte relayed, so a reload never closes a pool
        # that a call of the old policy (queued, backing off, streaming) still needs.
        upstream.inflight += 1
        try:
            try:
                body = self._body(route, request)
                if body is not None and request.headers.get("Expect", "").lower() == (
                    "100-continue"
                ):
                    # The agent waits for this before sending its body; the upstream's
                    # own 100 (if any) is for a request the sidecar makes, not the agent.
                    await request.writer.write(_CONTINUE)
                call = route.prepare(request, body)
                if is_upgrade(request):
                    call.upgrade = True
                if exchange is not None:
                    exchange.bind(call)
                reply = await route.handler(call)
            except ProblemError as err:
                return problem_response(err, route.name)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("unexpected error in service %s", route.name)
                return problem_response(
                    ProblemError(
                        "internal_error",
                        "The sidecar failed while handling this call; the error is in its log.",
                    ),
                    route.name,
                )
            return await self._relay(request, reply, route, exchange)
        finally:
            upstream.inflight -= 1

    def _body(self, route: Route, request: web.BaseRequest) -> Body:
        if not request.body_exists:
            return None
        limit = route.max_body
        if limit is None:
            return request.content
        length = request.content_length
        if length is not None and length > limit:
            raise ProblemError(
                "request_too_large",
                f"The request body is {length} bytes; service '{route.name}' accepts at most "
                f"{limit} bytes.",
                service=route.name,
            )
        if length is not None:
            return request.content
        return _limited(request.content, limit, route.name)

    async def _relay(
        self, request: web.BaseRequest, reply: Reply, route: Route, exchange: Exchange | None
    ) -> web.StreamResponse:
        if isinstance(reply, Upgraded):
            return await relay_websocket(request, reply)
        try:
            response = _Relayed(status=reply.status, reason=reply.reason)
            headers = response.headers
            drop = drop_with_connection(_RESPONSE_DROP, reply.headers.get("Connection"))
            for name, value in reply.headers.items():
                if name.lower() not in drop:
                    headers.add(name, value)
            if route.redirects is not None:
                route.redirects.rewrite_headers(
                    headers, host=request.headers.get("Host"), path=request.raw_path
                )
            length = reply.content_length
            status = reply.status
            if status in _NO_BODY:
                await response.prepare(request)
                await response.write_eof()
                return response
            if length is not None:
                # Same framing as the upstream: the bytes are passed through untouched.
                response.content_length = length
            if request.method == "HEAD" or length == 0 or not isinstance(reply, ClientResponse):
                await response.prepare(request)
                await response.write_eof()
                return response
            await response.prepare(request)
            content = reply.content
            idle = route.idle
            while True:
                if idle is None:
                    chunk = await content.readany()
                else:
                    # Only the silence between chunks is bounded, never the whole stream.
                    async with asyncio.timeout(idle):
                        chunk = await content.readany()
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            return response
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            # Headers already went out: the only honest signal left is a cut connection.
            cut = cut_reason(exc)
            log.warning("answer of %s cut short: %s", route.name, cut or "the agent left")
            if exchange is not None:
                exchange.cut = cut
            if request.transport is not None:
                request.transport.close()
            return response
        finally:
            reply.release()


async def _limited(source: aiohttp.StreamReader, limit: int, service: str) -> AsyncIterator[bytes]:
    seen = 0
    async for chunk in source.iter_any():
        seen += len(chunk)
        if seen > limit:
            raise ProblemError(
                "request_too_large",
                f"The request body exceeded {limit} bytes, the most service '{service}' accepts.",
                service=service,
            )
        yield chunk
