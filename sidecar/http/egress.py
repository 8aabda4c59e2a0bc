"""The egress app: match a route, run its chain, stream the answer back.

Runs on the listener (http/listener.py). Bodies stream both ways without
buffering: the agent's upload is fed to the upstream as it arrives, and the
answer (any `Reply`: the upstream's, or a step's own) reaches the agent chunk
by chunk, an SSE event as soon as the upstream sends it. A WebSocket
handshake is an ordinary call through the chain; the upstream's 101 turns
both connections into one raw tunnel, so every frame (close codes included)
passes untouched.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, Callable
from typing import TYPE_CHECKING, Any, Final

from ..core.call import Body, Reply, StoredReply
from ..core.headers import (
    HOP_BY_HOP,
    SERVER,
    FieldNames,
    drop_with_connection,
    drop_with_connection_raw,
)
from ..core.problems import PLAIN, ProblemError, problem_parts
from ..core.reasons import Reason
from ..core.streams import idle_bounded, limited
from ..steps.resilience.faults import InjectedReset
from .http1 import Tunnel, raw_header_lines
from .listener import App, Request, Response
from .pool import UpstreamError, UpstreamReply
from .redirects import REWRITTEN_HEADERS
from .router import Route, Router

# The HTTP face of the databases (databases/http.py), answered by Egress.databases.
DB_PREFIX: Final = "/_db/"

if TYPE_CHECKING:
    from ..telemetry import Exchange, Telemetry

log = logging.getLogger("sidecar.http")

# X-Sidecar-Error marks the sidecar's own answers: an upstream may not forge one.
_RESPONSE_DROP: Final = HOP_BY_HOP | {"content-length", "x-sidecar-error"}
_RESPONSE_DROP_RAW: Final = FieldNames(name.encode("latin-1") for name in _RESPONSE_DROP)
# It holds every framing field the listener writes itself (Content-Length,
# Transfer-Encoding, Connection, Keep-Alive): a relayed answer is `no_framing`.
_REWRITTEN: Final = frozenset(h.lower() for h in REWRITTEN_HEADERS)
# Methods the sidecar will not carry: TRACE would echo the injected credential
# back to the agent; CONNECT would make it a tunnel to anywhere.
_REFUSED_METHODS: Final = frozenset({"TRACE", "CONNECT"})
# Why a relayed answer ended before its last byte (access log, metrics, spans).
IDLE_CUT: Final = "upstream_idle_timeout"
RESET_CUT: Final = "upstream_reset"
FAULT_CUT: Final = "fault_injected"


def unsafe_path(raw: str) -> bool:
    """True when the target could leave the upstream's base path once an upstream
    normalizes it: a '.' or '..' segment, however spelled (%2e, %2f, backslash,
    ';' parameters), or a fragment, which an origin-form target never has."""
    if "." not in raw and "%" not in raw and "\\" not in raw and "#" not in raw:
        return False  # the common case, told without splitting off the query
    if "#" in raw:
        return True
    path = raw.partition("?")[0]
    if "." not in path and "%" not in path and "\\" not in path:
        return False  # nothing in the path that could spell a dot segment
    path = path.lower().replace("%2e", ".").replace("%2f", "/").replace("%5c", "/")
    for segment in path.replace("\\", "/").split("/"):
        if segment.split(";", 1)[0] in (".", ".."):
            return True
    return False


def cut_reason(exc: BaseException | None) -> str | None:
    """Why a relayed answer stopped early: the upstream fell silent past
    `timeout.idle`, or its connection failed; None when the agent's side failed."""
    if isinstance(exc, TimeoutError):
        return IDLE_CUT
    if isinstance(exc, InjectedReset):
        return FAULT_CUT
    if isinstance(exc, UpstreamError):
        return RESET_CUT
    return None


def problem(
    err: ProblemError, service: str | None, exchange: Exchange | None, dialect: int = PLAIN
) -> Response:
    """The sidecar's own answer, as the listener writes it."""
    status, headers, body = problem_parts(err, service, dialect)
    if exchange is not None:
        exchange.reason = err.reason
    return Response(status=status, headers=headers, body=body)


class Egress:
    """The listener's app; `router` is read once per request, never locked."""

    def __init__(self, telemetry: Telemetry | None = None) -> None:
        # The current policy's routes; a reload swaps this one reference (runtime.py),
        # and a call keeps the Router it matched on.
        self.router: Router | None = None
        # Agents post outbound events to /_webhooks/<name> and subscribe to inbound ones
        # at /_events/<name>: the paths the webhook connector's app answers (set with it
        # by runtime.py, from webhooks/listener.py); never routed to a service.
        self.webhooks: App | None = None
        self.webhook_prefixes: tuple[str, ...] = ()
        # None: no metrics, spans or access log, and the request path pays nothing for them.
        self.telemetry = telemetry
        # Agents post SQL to /_db/<name>/query (databases/http.py); never routed to a service.
        self.databases: App | None = None

    async def __call__(self, request: Request) -> Response:
        # One coroutine per answer: the checks before the chain are a plain call, and
        # the chain is awaited here, between telemetry's begin and its end.
        telemetry = self.telemetry
        exchange = telemetry.begin(request) if telemetry is not None else None
        try:
            found = self._route(request, exchange)
            if found is None:
                databases = self.databases
                if databases is not None and request.target.startswith(DB_PREFIX):
                    response = await databases(request)
                else:
                    webhooks = self.webhooks
                    assert webhooks is not None
                    response = await webhooks(request)
            elif isinstance(found, Response):
                response = found
            else:
                route = found
                upstream = route.upstream
                # Counted from here to the last byte relayed, so a reload never closes a
                # pool that a call of the old policy (queued, backing off, streaming) needs.
                upstream.inflight += 1
                try:
                    call = route.prepare(request, self._body(route, request))
                    if (
                        request.is_upgrade
                        and request.headers.get("Upgrade", "").lower() == "websocket"
                    ):
                        call.upgrade = True
                    if exchange is not None:
                        exchange.bind(call)
                    reply = await route.handler(call)
                except ProblemError as err:
                    upstream.inflight -= 1
                    response = problem(err, route.name, exchange, route.dialect)
                except asyncio.CancelledError:
                    upstream.inflight -= 1
                    raise
                except Exception:
                    upstream.inflight -= 1
                    log.exception("unexpected error in service %s", route.name)
                    response = problem(
                        ProblemError(
                            Reason.internal_error,
                            "The sidecar failed while handling this call; the error is in its log.",
                        ),
                        route.name,
                        exchange,
                        route.dialect,
                    )
                else:
                    response = _relay(request, reply, route, exchange, call.tunnel_filter)
        except BaseException as exc:
            if telemetry is not None and exchange is not None:
                telemetry.failed(exchange, exc)
            raise
        if telemetry is not None and exchange is not None:
            return telemetry.answered(exchange, response)
        return response

    def _route(self, request: Request, exchange: Exchange | None) -> Route | Response | None:
        """The route of a request to forward, the sidecar's own answer to one it does
        not forward, or None for the webhook paths (webhooks/)."""
        raw = request.target
        if unsafe_path(raw):
            return problem(
                ProblemError(
                    Reason.bad_request,
                    "The path has '.' or '..' segments or a '#' fragment; send a normalized "
                    "path without a fragment.",
                ),
                None,
                exchange,
            )
        if raw[0] != "/":
            return problem(
                ProblemError(
                    Reason.bad_request,
                    "Send the path only (origin-form, like /service/...), not a full URL: "
                    "this is not a forward proxy.",
                ),
                None,
                exchange,
            )
        if raw.startswith(self.webhook_prefixes) and self.webhooks is not None:
            return None
        if raw.startswith(DB_PREFIX) and self.databases is not None:
            return None
        if request.method in _REFUSED_METHODS:
            return problem(
                ProblemError(
                    Reason.method_not_allowed,
                    f"The sidecar does not forward {request.method} requests; use GET, POST, "
                    "PUT, PATCH, DELETE, HEAD or OPTIONS.",
                    headers={"Allow": "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"},
                ),
                None,
                exchange,
            )
        router = self.router
        route = router.match(raw) if router is not None else None
        if route is None:
            return problem(
                ProblemError(
                    Reason.no_route,
                    f"No service is configured for the path {raw.partition('?')[0]!r}; call "
                    "http://<sidecar>/<service>/... with a service the policy defines.",
                ),
                None,
                exchange,
            )
        if exchange is not None:
            exchange.route = route
        return route

    def _body(self, route: Route, request: Request) -> Body:
        body = request.body
        if body is None:
            return None
        limit = route.max_body
        if limit is None:
            return body
        length = request.content_length
        if length is None and body.complete:
            # A chunked body that came whole with its head: its size is known now, and an
            # oversized one is refused before the upstream sees any of it.
            length = body.buffered
        if length is not None and length > limit:
            raise ProblemError(
                Reason.request_too_large,
                f"The request body is {length} bytes; service '{route.name}' accepts at most "
                f"{limit} bytes.",
                service=route.name,
            )
        if length is not None:
            return body
        # Refused when it grows past the limit: the upstream's connection is then cut
        # mid-body, so it never gets a whole request.
        return limited(body, limit, route.name)


class _Relayed:
    """Ends one relayed answer: the reply released, the pool's count returned,
    and why it was cut short (if it was) left for telemetry."""

    __slots__ = ("exchange", "reply", "route")

    def __init__(self, reply: Reply, route: Route, exchange: Exchange | None) -> None:
        self.reply = reply
        self.route = route
        self.exchange = exchange

    def __call__(self, sent: int, error: BaseException | None) -> None:
        self.reply.release()
        self.route.upstream.inflight -= 1
        if error is not None:
            cut = cut_reason(error)
            if cut is not None:
                # Headers already went out: the only honest signal left is a cut connection.
                log.warning("answer of %s cut short: %s", self.route.name, cut)
            if self.exchange is not None:
                self.exchange.cut = cut


def _relay(
    request: Request,
    reply: Reply,
    route: Route,
    exchange: Exchange | None,
    tunnel_filter: Callable[[Any], Any] | None = None,
) -> Response:
    status = reply.status
    done = _Relayed(reply, route, exchange)
    if status == 101 and isinstance(reply, UpstreamReply) and request.is_upgrade:
        headers = _relayed_headers(request, reply, route)
        return _upgraded(headers, reply, done, tunnel_filter)
    if (type(reply) is UpstreamReply or type(reply) is StoredReply) and not (
        reply.refers and route.redirects is not None
    ):
        # The upstream's own answer, untouched by any step (most calls), or one a step
        # kept as it came (a cache hit): its head is relayed as the bytes it came in,
        # never decoded (unless it has a URL to rewrite), and a body that came whole
        # with it as those bytes too.
        drop = drop_with_connection_raw(_RESPONSE_DROP_RAW, reply.connection)
        data = reply.data
        whole = data is not None and reply.content_length is not None
        return Response(
            status=status,
            head_lines=raw_header_lines(reply.raw_headers, drop),
            # A HEAD answer's Content-Length is the resource's, not its empty body's.
            body=data if whole and request.method != "HEAD" else _body(reply, route),
            content_length=reply.content_length,
            reason=reply.reason,
            on_done=done,
            no_framing=True,
        )
    return Response(
        status=status,
        headers=_relayed_headers(request, reply, route),
        body=_body(reply, route),
        content_length=reply.content_length,
        reason=reply.reason,
        on_done=done,
        no_framing=True,
    )


def _body(reply: Reply, route: Route) -> AsyncIterable[bytes] | None:
    body = reply.body
    if body is not None and route.idle is not None and not getattr(body, "complete", False):
        return idle_bounded(body, route.idle)
    return body


def _relayed_headers(request: Request, reply: Reply, route: Route) -> list[tuple[str, str]]:
    source = reply.headers
    drop = drop_with_connection(_RESPONSE_DROP, ", ".join(source.getall("Connection", ())))
    headers = [(name, value) for name, value in source.items() if name.lower() not in drop]
    redirects = route.redirects
    if redirects is not None:
        host = request.headers.get("Host")
        for i, (name, value) in enumerate(headers):
            if name.lower() in _REWRITTEN:
                headers[i] = (name, redirects.rewrite(value, host=host, path=request.target))
    return headers


def _upgraded(
    headers: list[tuple[str, str]],
    reply: UpstreamReply,
    done: _Relayed,
    tunnel_filter: Callable[[Any], Any] | None,
) -> Response:
    upgrade = reply.headers.get("Upgrade")
    if upgrade is not None:
        headers.append(("Upgrade", upgrade))
    # The handshake with the agent is the sidecar's own.
    headers = [h for h in headers if h[0].lower() != "server"]
    headers.append(("Server", SERVER))
    tunnel: Tunnel = reply.detach()
    if tunnel_filter is not None:
        tunnel = tunnel_filter(tunnel)
    return Response(status=101, headers=headers, reason=reply.reason, tunnel=tunnel, on_done=done)
