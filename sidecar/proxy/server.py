"""The egress listener: match a route, run its chain, stream the answer back.

Bodies stream both ways without buffering: the agent's upload is fed to the
upstream as it arrives, and the upstream's answer reaches the agent chunk by
chunk (an SSE event as soon as the upstream sends it).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator, Callable

import aiohttp
from aiohttp import ClientResponse, web

from ..call import Body, Reply
from ..headers import HOP_BY_HOP
from ..problems import ProblemError, problem_response
from ..telemetry import Exchange, Telemetry
from .router import Route, Router
from .websocket import Upgraded, is_upgrade
from .websocket import relay as relay_websocket

log = logging.getLogger("sidecar.proxy")

# Statuses whose responses never carry a body (RFC 9110 6.4.1).
_NO_BODY = frozenset({204, 304})
_DOT_SEGMENT = re.compile(r"(^|/)(\.|%2e){1,2}(/|$)", re.IGNORECASE)
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}


class EgressHandler:
    """The aiohttp low-level handler; `router` is read once per request, never locked."""

    def __init__(
        self, current: Callable[[], Router | None], telemetry: Telemetry | None = None
    ) -> None:
        self._current = current
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
        path = raw.partition("?")[0]
        if ("/." in path or "%2" in path.lower()) and _DOT_SEGMENT.search(
            path.replace("%2F", "/").replace("%2f", "/")
        ):
            return problem_response(
                ProblemError(
                    "bad_request", "The path has '.' or '..' segments; send a normalized path."
                )
            )
        route = router.match(raw) if router is not None else None
        if route is None:
            return problem_response(
                ProblemError(
                    "no_route",
                    f"No service is configured for the path {path!r}; call "
                    "http://<sidecar>/<service>/... with a service the policy defines.",
                )
            )
        if exchange is not None:
            exchange.route = route
        try:
            body = self._body(route, request)
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
        return await self._relay(request, reply, route)

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
        self, request: web.BaseRequest, reply: Reply, route: Route
    ) -> web.StreamResponse:
        if isinstance(reply, Upgraded):
            return await relay_websocket(request, reply)
        try:
            response = web.StreamResponse(status=reply.status, reason=reply.reason)
            headers = response.headers
            drop = _RESPONSE_DROP
            connection = reply.headers.get("Connection")
            if connection:
                drop = drop | {t.strip().lower() for t in connection.split(",")}
            for name, value in reply.headers.items():
                if name.lower() not in drop:
                    headers.add(name, value)
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
            while True:
                chunk = await content.readany()
                if not chunk:
                    break
                await response.write(chunk)
            await response.write_eof()
            return response
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError, TimeoutError) as exc:
            # Headers already went out: the only honest signal left is a cut connection.
            log.warning("upstream of %s broke off its answer: %s", route.name, type(exc).__name__)
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
