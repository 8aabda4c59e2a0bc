"""Traces, metrics and the access log around every agent request.

- The egress app brackets each request with `Telemetry.begin` and `answered`: a SERVER span
  (when tracing is on), the request duration histogram, the in-flight gauge and
  the access log line, all covering the answer's streaming too (they are
  recorded from the answer's `on_done`, which the listener calls at its end).
- The innermost step of every chain (`build`, the last step of http/chain.py,
  just before forward) times each upstream attempt and, when tracing is on,
  opens a CLIENT span and sends its W3C traceparent upstream.

What is never recorded anywhere: request or response headers, query strings
(both carry credentials and signed URLs), bodies.

With tracing off (no OTLP endpoint) no span object is made: every tracing
branch hangs on `Telemetry.tracer` / `Exchange.span` being None. OTLP metrics
export (otlp_metrics.py) reads the same Prometheus registry from its own
thread, so the request path records each observation once either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from ..core.call import Call, Handler, Reply
from ..core.problems import ProblemError
from ..steps.resilience.timeout import TIMEOUT_CANCEL
from . import access
from .metrics import KNOWN_METHODS, OTHER_METHOD, Metrics
from .pools import Pools
from .problems import RecentProblems

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from ..core.state import StateBuild
    from ..http.listener import Request, Response
    from ..http.router import Route
    from ..policy.loader import ServicePolicy
    from ..runtime import ReloadResult, Sidecar

log = logging.getLogger("sidecar.telemetry")

# A C static, not a lookup in the module's namespace on every call (mypyc).
perf_counter: Final = time.perf_counter
SIDECAR_ERROR: Final = "X-Sidecar-Error"
# nginx's "client closed request": the agent went away before the answer was complete.
CLIENT_CLOSED: Final = 499
# The reason label of a call the agent hung up on before its answer ended (nginx's 499).
CLIENT_CLOSED_REASON: Final = "client_closed"
# An agent-chosen id ends up in spans and log lines: bound its size.
MAX_AGENT: Final = 128


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


class Exchange:
    """What one agent request left for telemetry to record when it is over."""

    __slots__ = (
        "attempts",
        "attributes",
        "call",
        "cut",
        "inner",
        "reason",
        "request",
        "route",
        "span",
        "start",
        "status",
        "telemetry",
    )

    def __init__(
        self, telemetry: Telemetry, span: Span | None, request: Request, start: float
    ) -> None:
        self.telemetry = telemetry
        self.span = span
        self.request = request
        self.start = start  # perf_counter() at the request's arrival
        # Set by Telemetry.answered: the answer's status, and the egress's own
        # on_done, which `done` runs first.
        self.status = 0
        self.inner: Callable[[int, BaseException | None], None] | None = None
        self.route: Route | None = None
        self.call: Call | None = None
        self.attempts = 0
        # The X-Sidecar-Error reason when the sidecar answered itself.
        self.reason = ""
        # What steps learnt of the call (a GraphQL operation, an MCP tool) for its span.
        self.attributes: dict[str, str | int | bool] | None = None
        # Why the relayed answer stopped before its end (proxy.egress.cut_reason).
        self.cut: str | None = None

    def bind(self, call: Call) -> None:
        """Let the attempt step find this exchange, and its span, from the call."""
        self.call = call
        call.exchange = self

    def done(self, sent: int, exc: BaseException | None) -> None:
        """The answer's end (the listener's on_done): `sent` bytes, cut short by `exc`."""
        inner, self.inner = self.inner, None  # it points back here: no cycle left for the GC
        if inner is not None:
            inner(sent, exc)
        telemetry = self.telemetry
        telemetry.metrics.in_flight_value._value -= 1
        if exc is None or self.cut is not None:
            telemetry._finish(self, self.status, self.cut, sent)
        else:
            # The agent's side failed or it hung up mid-answer.
            telemetry._finish(self, CLIENT_CLOSED, "cancelled", sent)


class Telemetry:
    """One sidecar's metrics registry, tracer (or None) and access-log switch."""

    def __init__(self, *, provider: TracerProvider | None = None, access_log: bool = False):
        self.metrics = Metrics()
        self.provider = provider
        self.tracer = provider.get_tracer("agent-sidecar") if provider is not None else None
        self.access_log = access_log
        # Exports the Prometheus registry over OTLP too, when configured (from_env).
        self.meter_provider: MeterProvider | None = None
        # The OpenTelemetry API is imported only when tracing is on: with tracing off no
        # span code runs, and its modules cost start-up memory.
        self._propagator: TraceContextTextMapPropagator | None = None
        if provider is not None:
            from opentelemetry.trace.propagation.tracecontext import (
                TraceContextTextMapPropagator,
            )

            self._propagator = TraceContextTextMapPropagator()
        self._breakers: dict[str, Any] = {}
        # The console's: the last problems, and the pools connectors register.
        self.problems = RecentProblems()
        self.pools = Pools()

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, access_log: bool | None = None
    ) -> Telemetry:
        """Configured by OTEL_* (tracing) and SIDECAR_ACCESS_LOG, read from `env` only."""
        from .tracing import signal_endpoint, tracer_provider

        env = os.environ if env is None else env
        if access_log is None:
            access_log = _flag(env.get("SIDECAR_ACCESS_LOG"))
        telemetry = cls(provider=tracer_provider(env), access_log=access_log)
        if signal_endpoint(env, "metrics") is not None:
            # The OTel metrics SDK is imported only when it exports: it costs start-up memory.
            from .otlp_metrics import meter_provider

            telemetry.meter_provider = meter_provider(env, telemetry.metrics)
        return telemetry

    # -- lifecycle, off the request path -------------------------------------------------

    def attach(self, sidecar: Sidecar) -> None:
        """Count the sidecar's reloads and bind each new policy's metric children."""

        def on_reload(result: ReloadResult) -> None:
            if result.ok:
                self.metrics.reload_success.inc()
            else:
                self.metrics.reload_failure.inc()
            policy = sidecar.policy
            if result.changed and policy is not None:
                names = list(policy.services)
                self.metrics.bind(names)
                breakers: dict[str, Any] = {}
                for name in names:
                    for breaker in sidecar.state.find(name, "breaker"):
                        breakers[name] = breaker
                self._breakers = breakers

        sidecar.on_reload.append(on_reload)
        sidecar.state.hooks.breaker_transition.append(self.metrics.on_transition)

    def force_flush(self, timeout_ms: int = 5000) -> bool:
        """Export the queued spans and the metrics now (blocking: from a thread or a test)."""
        flushed = True
        if self.provider is not None:
            flushed = self.provider.force_flush(timeout_ms)
        if self.meter_provider is not None:
            flushed = self.meter_provider.force_flush(timeout_ms) and flushed
        return flushed

    async def close(self) -> None:
        # Shutting down exports what is left over the network: not on the loop.
        if self.provider is not None:
            await asyncio.to_thread(self.provider.shutdown)
        if self.meter_provider is not None:
            await asyncio.to_thread(self.meter_provider.shutdown)

    # -- the agent request ----------------------------------------------------------------

    def begin(self, request: Request) -> Exchange:
        """An agent request arrived: its SERVER span (when tracing), the in-flight gauge.

        The egress calls `begin`, then `answered` with its Response or `failed` with
        what it raised: plain calls around its own await, not a coroutine of their own.
        """
        start = perf_counter()
        tracer = self.tracer
        span = self._server_span(tracer, request) if tracer is not None else None
        exchange = Exchange(self, span, request, start)
        self.metrics.in_flight_value._value += 1
        return exchange

    def failed(self, exchange: Exchange, exc: BaseException) -> None:
        """The egress raised instead of answering (cancelled, or a bug)."""
        self.metrics.in_flight_value._value -= 1
        error = "cancelled" if isinstance(exc, asyncio.CancelledError) else None
        status = CLIENT_CLOSED if error else 500
        self._finish(exchange, status, error or type(exc).__qualname__, 0)

    def answered(self, exchange: Exchange, response: Response) -> Response:
        """The egress's answer: recorded once its last byte is written (`on_done`)."""
        exchange.inner = response.on_done
        exchange.status = response.status
        response.on_done = exchange.done
        return response

    def _finish(self, exchange: Exchange, status: int, error: str | None, sent: int) -> None:
        request = exchange.request
        duration = perf_counter() - exchange.start
        route = exchange.route
        service = route.name if route is not None else ""
        reason = exchange.reason
        if status == CLIENT_CLOSED and not reason:
            reason = CLIENT_CLOSED_REASON
        cut = exchange.cut
        if cut is not None:
            # The status went out before the answer broke: the reason says so.
            reason = cut
            error = error or cut
        method = request.method
        metrics = self.metrics.service(service)
        metrics.request(method, status, reason).observe(duration)
        if reason == "rate_limited":
            metrics.rate_limited.inc()
        call = exchange.call
        agent = call.agent if call is not None else None
        if agent:
            self.metrics.agents.count(agent, status >= 400 and reason != "")
        span = exchange.span
        if status >= 500 or (status >= 400 and reason != ""):
            # Off the successful path: the console's recent problems.
            self.problems.record(
                service,
                agent[:MAX_AGENT] if agent else "",
                method if method in KNOWN_METHODS else OTHER_METHOD,
                status,
                reason,
                _trace_id(span, request),
            )
        if span is not None:
            self._end_server_span(span, exchange, method, status, reason, error)
        if self.access_log and access.log.isEnabledFor(logging.INFO):
            access.log.info(
                access.line(
                    at=time.time() - duration,
                    agent=agent[:MAX_AGENT] if agent else None,
                    method=method,
                    service=service or None,
                    path=request.target.partition("?")[0],
                    status=status,
                    duration=duration,
                    # What reached the agent's connection, also of an answer cut short.
                    bytes_sent=sent,
                    attempts=exchange.attempts,
                    reason=reason or error,
                    trace_id=_trace_id(span, request),
                )
            )
        # call.exchange points back at the exchange: break the cycle, leave nothing to the GC.
        exchange.call = None

    def _server_span(self, tracer: Tracer, request: Request) -> Span:
        from opentelemetry.trace import SpanKind

        method = request.method
        known = method in KNOWN_METHODS
        attributes: dict[str, Any] = {
            "http.request.method": method if known else OTHER_METHOD,
            "url.path": request.target.partition("?")[0],
            "url.scheme": "http",
            "network.protocol.version": request.version,
        }
        if not known:
            attributes["http.request.method_original"] = method[:32]
        host, port = _host_port(request.headers.get("Host", ""))
        if host:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        return tracer.start_span(
            method if known else "HTTP",
            # The propagator is made with the tracer, so it is there whenever a span is.
            context=self._propagator.extract(request.headers) if self._propagator else None,
            kind=SpanKind.SERVER,
            attributes=attributes,
        )

    def _end_server_span(
        self,
        span: Span,
        exchange: Exchange,
        method: str,
        status: int,
        reason: str,
        error: str | None,
    ) -> None:
        if not span.is_recording():
            return  # sampled out: nothing to record, nothing to end
        attributes: dict[str, Any] = {"http.response.status_code": status}
        route = exchange.route
        if route is not None:
            name = f"{method if method in KNOWN_METHODS else 'HTTP'} {route.prefix}"
            span.update_name(name)
            attributes["http.route"] = route.prefix
            attributes["sidecar.service"] = route.name
            attributes["sidecar.route"] = route.prefix
            attributes["sidecar.upstream.attempts"] = exchange.attempts
            attributes["sidecar.rate_limited"] = reason == "rate_limited"
            attributes["sidecar.circuit_open"] = reason == "circuit_open"
            breaker = self._breakers.get(route.name)
            if breaker is not None:
                attributes["sidecar.breaker.state"] = str(breaker.state)
            call = exchange.call
            if call is not None and call.agent:
                attributes["sidecar.agent"] = call.agent[:MAX_AGENT]
        if exchange.attributes:
            attributes.update(exchange.attributes)
        if reason:
            attributes["sidecar.error.reason"] = reason
        if error is not None:
            attributes["error.type"] = error
        elif status >= 500:
            attributes["error.type"] = reason or str(status)
        span.set_attributes(attributes)
        # A step may name an error the status hides (a GraphQL 200 with errors).
        if status >= 500 or error is not None or "error.type" in attributes:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR))
        span.end()

    async def attempt(self, step: Attempt, exchange: Exchange, call: Call, next: Handler) -> Reply:
        exchange.attempts += 1
        metrics = self.metrics.service(call.service)
        span: Span | None = None
        parent = exchange.span
        tracer = self.tracer
        propagator = self._propagator
        if parent is not None and tracer is not None and propagator is not None:
            from opentelemetry.trace import SpanKind, set_span_in_context

            if not parent.is_recording():
                # An unsampled request: its attempts are not recorded either (parent-based
                # sampling), but the upstream still continues the same trace.
                propagator.inject(call.headers, context=set_span_in_context(parent))
            else:
                span = tracer.start_span(
                    call.method if call.method in KNOWN_METHODS else "HTTP",
                    context=set_span_in_context(parent),
                    kind=SpanKind.CLIENT,
                    attributes=step.attributes(call),
                )
                # Replaces the agent's traceparent: the upstream's parent is this attempt.
                propagator.inject(call.headers, context=set_span_in_context(span))
        start = perf_counter()
        try:
            reply = await next(call)
        except BaseException as exc:
            outcome = _outcome(exc)
            metrics.attempt(outcome).observe(perf_counter() - start)
            if span is not None:
                from opentelemetry.trace import Status, StatusCode

                span.set_attribute("error.type", outcome)
                span.set_status(Status(StatusCode.ERROR))
                span.end()
            raise
        status = reply.status
        metrics.answered(status).observe(perf_counter() - start)
        if span is not None:
            if status >= 400:
                from opentelemetry.trace import Status, StatusCode

                span.set_attributes(
                    {"http.response.status_code": status, "error.type": str(status)}
                )
                span.set_status(Status(StatusCode.ERROR))
            else:
                span.set_attribute("http.response.status_code", status)
            span.end()
        return reply


class Attempt:
    """The innermost step: one upstream attempt, timed and (when tracing) spanned.

    The CLIENT span ends when the response headers arrive, as HTTP client
    instrumentations do; the SERVER span covers the streaming of the body.
    """

    def __init__(self, *, service: str, upstream: str) -> None:
        parts = urlsplit(upstream)
        self.service = service
        self.base_path = parts.path.rstrip("/")
        self._fixed: dict[str, Any] = {
            "url.scheme": parts.scheme,
            "server.address": parts.hostname or "",
            "server.port": parts.port or (443 if parts.scheme == "https" else 80),
            "network.protocol.version": "1.1",
            "sidecar.service": service,
        }

    def attributes(self, call: Call) -> dict[str, Any]:
        attributes = dict(self._fixed)
        method = call.method
        attributes["http.request.method"] = method if method in KNOWN_METHODS else OTHER_METHOD
        # The query is never recorded: query auth puts the credential there.
        attributes["url.path"] = self.base_path + call.target.partition("?")[0]
        attributes["sidecar.retry.attempt"] = call.attempt
        if call.attempt > 1:
            attributes["http.request.resend_count"] = call.attempt - 1
        return attributes

    async def __call__(self, call: Call, next: Handler) -> Reply:
        # Typed here, as Call.exchange is Any (telemetry sits above core/call.py): the
        # compiled code reads and writes its fields directly, not by name.
        exchange: Exchange | None = call.exchange
        if exchange is None:
            return await next(call)
        telemetry = exchange.telemetry
        if telemetry.tracer is not None:
            return await telemetry.attempt(self, exchange, call, next)
        # Tracing off (the common case): Telemetry.attempt's metrics only, inline, one
        # coroutine fewer on every call.
        exchange.attempts += 1
        metrics = telemetry.metrics.service(call.service)
        start = perf_counter()
        try:
            reply = await next(call)
        except BaseException as exc:
            metrics.attempt(_outcome(exc)).observe(perf_counter() - start)
            raise
        metrics.answered(reply.status).observe(perf_counter() - start)
        return reply


def build(service: ServicePolicy, *, state: StateBuild) -> Attempt:
    return Attempt(service=service.name, upstream=service.spec.upstream)


def _outcome(exc: BaseException) -> str:
    if isinstance(exc, ProblemError):
        return exc.cause or exc.reason
    if isinstance(exc, asyncio.CancelledError):
        # The timeout step names its own cancel; any other is the agent leaving or shutdown.
        return "timeout" if exc.args == (TIMEOUT_CANCEL,) else "cancelled"
    return type(exc).__qualname__


def _trace_id(span: Span | None, request: Request) -> str | None:
    if span is not None:
        context = span.get_span_context()
        if context.is_valid:
            return format(context.trace_id, "032x")
    # Tracing off: the agent's own trace id still ties the line to its trace.
    parent = request.header(b"traceparent")  # one field, not the whole head decoded
    if parent and len(parent) >= 55 and parent[2] == "-" and parent[35] == "-":
        trace_id = parent[3:35].lower()
        if trace_id.strip("0123456789abcdef") == "" and trace_id != "0" * 32:
            return trace_id
    return None


def _host_port(host: str) -> tuple[str, int | None]:
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name.strip("[]"), int(port)
    return host.strip("[]"), None
