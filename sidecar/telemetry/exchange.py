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

With tracing on, a span is a `SpanRecord` (a few fields) appended to the span
exporter's queue (spans.py), whose thread encodes and sends batches: no SDK span
per call. A request the sampler drops gets ids (its trace still goes upstream)
and nothing else: a new trace dropped is no record at all, only the traceparent
bytes the attempt sends (`Exchange.traceparent`). With tracing off (no OTLP
endpoint) no record is made: every tracing branch hangs on `Telemetry.spans` /
`Exchange.span` being None (and `Exchange.traceparent` empty). OTLP metrics
export (otlp_metrics.py) reads the same Prometheus registry from its own
thread, so the request path records each observation once either way.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol, TypeVar
from urllib.parse import urlsplit

from ..core.call import Call, Handler, Reply
from ..core.problems import ProblemError
from ..steps.resilience.timeout import TIMEOUT_CANCEL
from . import access
from .metrics import KNOWN_METHODS, OTHER_METHOD, Metrics
from .pools import Pools
from .problems import RecentProblems
from .records import (
    KIND_CLIENT,
    KIND_SERVER,
    Ids,
    SpanRecord,
    _attribute,
)

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

    from ..core.state import StateBuild, StateStore
    from ..policy.loaded import Policy, ServicePolicy
    from .spans import SpanExporter
    from .tracing import Sampling

log = logging.getLogger("sidecar.telemetry")

# A C static, not a lookup in the module's namespace on every call (mypyc).
perf_counter: Final = time.perf_counter
time_ns: Final = time.time_ns
# Called as a function, not looked up as int's method on each call.
_from_bytes: Final = int.from_bytes
SIDECAR_ERROR: Final = "X-Sidecar-Error"
# nginx's "client closed request": the agent went away before the answer was complete.
CLIENT_CLOSED: Final = 499
# The reason label of a call the agent hung up on before its answer ended (nginx's 499).
CLIENT_CLOSED_REASON: Final = "client_closed"
# An agent-chosen id ends up in spans and log lines: bound its size.
MAX_AGENT: Final = 128
# Host fields kept parsed (cleared when full): a hostile agent cannot grow it.
MAX_HOSTS: Final = 64
_TRACEPARENT: Final = b"traceparent"


# What telemetry reads of the layers above it (the HTTP connector, the runtime), as
# protocols here rather than imports up: http/listener.py's Request and Response,
# http/router.py's Route, runtime.py's Sidecar and ReloadResult fit them.


class Request(Protocol):
    """An agent request as the listener parsed it."""

    @property
    def method(self) -> str: ...
    @property
    def target(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def headers(self) -> Any: ...
    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]]: ...
    def header(self, name: bytes) -> str | None: ...


class Response(Protocol):
    """The answer the egress gives the listener to write."""

    status: int
    on_done: Callable[[int, BaseException | None], None] | None


Answer = TypeVar("Answer", bound=Response)


class Route(Protocol):
    """The service route a request matched."""

    @property
    def name(self) -> str: ...
    @property
    def prefix(self) -> str: ...


class ReloadResult(Protocol):
    @property
    def ok(self) -> bool: ...
    @property
    def changed(self) -> bool: ...


class Sidecar(Protocol):
    """The runtime telemetry attaches to: its reloads, policy and state."""

    @property
    def policy(self) -> Policy | None: ...
    @property
    def state(self) -> StateStore: ...
    @property
    def on_reload(self) -> list[Callable[[Any], None]]: ...


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
        "traceparent",
    )

    def __init__(
        self, telemetry: Telemetry, span: SpanRecord | None, request: Request, start: float
    ) -> None:
        self.telemetry = telemetry
        self.span = span
        # A root span the sampler dropped is no record: only the traceparent (flags 00)
        # that its trace goes on upstream with, the raw field's value. b"" otherwise.
        self.traceparent = b""
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
    """One sidecar's metrics registry, tracer (or None) and access-log switch.

    `spans` and `sampling` trace the agent requests (tracing.tracing() makes them);
    the provider's `tracer` serves what is traced elsewhere (webhook deliveries).
    """

    def __init__(
        self,
        *,
        provider: TracerProvider | None = None,
        access_log: bool = False,
        spans: SpanExporter | None = None,
        sampling: Sampling | None = None,
    ):
        self.metrics = Metrics()
        self.provider = provider
        self.tracer: Tracer | None = (
            provider.get_tracer("agent-sidecar") if provider is not None else None
        )
        self.access_log = access_log
        # Exports the Prometheus registry over OTLP too, when configured (from_env).
        self.meter_provider: MeterProvider | None = None
        self.spans = spans if sampling is not None else None
        # The sampler's decision, copied into native fields for the request path.
        self._parent_based = sampling.parent_based if sampling is not None else True
        self._sample_root = sampling.root if sampling is not None else 1
        self._sample_bound = sampling.bound if sampling is not None else 0
        # The bound's top byte (256 for a bound of 2**64: every first byte is below).
        self._bound_first = self._sample_bound >> 56
        self._span_queue = spans.queue if spans is not None else None
        self._span_batch = spans.batch_size if spans is not None else 0
        self._span_max = spans.max_queue if spans is not None else 0
        self._breakers: dict[str, Any] = {}
        # Span and trace ids, drawn in bulk.
        self._ids = Ids()
        # The SERVER spans' Host fields, parsed (_host).
        self._hosts: dict[str, tuple[str, int | None]] = {}
        # The console's: the last problems, and the pools connectors register.
        self.problems = RecentProblems()
        self.pools = Pools()

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, *, access_log: bool | None = None
    ) -> Telemetry:
        """Configured by OTEL_* (tracing) and SIDECAR_ACCESS_LOG, read from `env` only."""
        from .tracing import signal_endpoint, tracing

        env = os.environ if env is None else env
        if access_log is None:
            access_log = _flag(env.get("SIDECAR_ACCESS_LOG"))
        pipeline = tracing(env)
        if pipeline is None:
            telemetry = cls(access_log=access_log)
        else:
            provider, spans, sampling = pipeline
            telemetry = cls(
                provider=provider, access_log=access_log, spans=spans, sampling=sampling
            )
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
        if self.spans is not None:
            flushed = self.spans.force_flush(timeout_ms)
        if self.provider is not None:
            flushed = self.provider.force_flush(timeout_ms) and flushed
        if self.meter_provider is not None:
            flushed = self.meter_provider.force_flush(timeout_ms) and flushed
        return flushed

    async def close(self) -> None:
        # Shutting down exports what is left over the network: not on the loop.
        if self.spans is not None:
            await asyncio.to_thread(self.spans.shutdown)
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
        exchange = Exchange(self, None, request, perf_counter())
        if self.spans is not None:
            self._server_span(exchange, request)
        self.metrics.in_flight_value._value += 1
        return exchange

    def failed(self, exchange: Exchange, exc: BaseException) -> None:
        """The egress raised instead of answering (cancelled, or a bug)."""
        self.metrics.in_flight_value._value -= 1
        error = "cancelled" if isinstance(exc, asyncio.CancelledError) else None
        status = CLIENT_CLOSED if error else 500
        self._finish(exchange, status, error or type(exc).__qualname__, 0)

    def answered(self, exchange: Exchange, response: Answer) -> Answer:
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
                _trace_id(exchange),
            )
        if span is not None:
            self._end_server_span(span, exchange, method, status, reason, error)
        if self.access_log:
            fields = (
                time.time() - duration,
                agent[:MAX_AGENT] if agent else None,
                method,
                service or None,
                request.target.partition("?")[0],
                status,
                duration,
                # What reached the agent's connection, also of an answer cut short.
                sent,
                exchange.attempts,
                reason or error,
                _trace_id(exchange),
            )
            writer = access.writer
            if writer is not None:
                writer.put(fields)  # formatted and written by the writer's thread
            elif access.log.isEnabledFor(logging.INFO):
                access.log.info(access.format_line(fields))
        # call.exchange points back at the exchange: break the cycle, leave nothing to the GC.
        exchange.call = None

    def _server_span(self, exchange: Exchange, request: Request) -> None:
        """The request's SERVER span as `exchange.span`, or, for a root span the sampler
        drops, only the traceparent it goes upstream with as `exchange.traceparent`."""
        # Read from the raw fields: no decoding, no method call through the Request
        # protocol, and a lowercase copy only of a name of the right size in another case.
        traceparent = _field(request.raw_headers, b"traceparent", b"traceparent") is not None
        trace_id = 0
        parent_id = 0
        parent_sampled = False
        trace_state: Any = None
        spans = self.spans
        if spans is not None and traceparent:
            # The agent's trace context: rare enough to go through the SDK's propagator.
            parent = spans.extract(request.headers)
            if parent is not None:
                trace_id = parent.trace_id
                parent_id = parent.span_id
                parent_sampled = parent.trace_flags.sampled
                trace_state = parent.trace_state
        span_id = 0
        trace_hex = b""
        span_hex = b""
        if trace_id == 0:
            # A new trace: its ids from the pool; the sampler reads the trace id's low
            # 64 bits.
            ids = self._ids
            i = ids.draw()
            at = 24 * i
            raw = ids.raw
            hexes = ids.hex
            root = self._sample_root
            if root == 0 or (root == 2 and not self._keeps(raw, at + 8)):
                # Dropped: no record, its traceparent only (its trace goes on upstream).
                # Bytes formatting compiles to one allocation and copies (mypyc), where
                # a join goes through the buffer protocol for each part.
                exchange.traceparent = b"00-%s-%s-00" % (
                    hexes[2 * at : 2 * at + 32],
                    hexes[2 * at + 32 : 2 * at + 48],
                )
                return
            sampled = True
            trace_hex = hexes[2 * at : 2 * at + 32]
            span_hex = hexes[2 * at + 32 : 2 * at + 48]
            trace_id = _from_bytes(raw[at : at + 16], "big")
            span_id = _from_bytes(raw[at + 16 : at + 24], "big")
        elif parent_id != 0 and self._parent_based:
            sampled = parent_sampled
        else:
            root = self._sample_root
            sampled = root == 1 or (
                root == 2 and (trace_id & 0xFFFFFFFFFFFFFFFF) < self._sample_bound
            )
        if not sampled:
            # Dropped: ids only (its trace goes on upstream), no name, no attributes.
            exchange.span = SpanRecord("", KIND_SERVER, trace_id, parent_id, parent_id != 0,
                                       False, trace_state, span_id)  # fmt: skip
            return
        method = request.method
        known = method in KNOWN_METHODS
        record = SpanRecord(
            method if known else "HTTP",
            KIND_SERVER,
            trace_id,
            parent_id,
            parent_id != 0,
            True,
            trace_state,
            span_id,
            trace_hex,
            span_hex,
        )
        attributes = record.attributes
        attributes["http.request.method"] = method if known else OTHER_METHOD
        attributes["url.path"] = request.target.partition("?")[0]
        attributes["url.scheme"] = "http"
        attributes["network.protocol.version"] = request.version
        if not known:
            attributes["http.request.method_original"] = method[:32]
        host_field = _field(request.raw_headers, b"host", b"Host")
        host, port = self._host(host_field.decode("latin-1") if host_field is not None else "")
        if host:
            attributes["server.address"] = host
        if port is not None:
            attributes["server.port"] = port
        exchange.span = record

    def _keeps(self, raw: bytes, at: int) -> bool:
        """Whether the ratio sampler keeps a new trace whose id's low 64 bits are
        raw[at : at + 8] (big-endian): below the bound, as TraceIdRatioBased decides."""
        # By the first byte against the bound's: no slice and no int, but in one trace
        # in 256 (the same first byte).
        first = raw[at]
        if first != self._bound_first:
            return first < self._bound_first
        return _from_bytes(raw[at : at + 8], "big") < self._sample_bound

    def _host(self, field: str) -> tuple[str, int | None]:
        """The Host field's name and port, parsed once per value: agents send a few."""
        hosts = self._hosts
        found = hosts.get(field)
        if found is None:
            if len(hosts) >= MAX_HOSTS:
                hosts.clear()
            found = hosts[field] = _host_port(field)
        return found

    def _record(self, record: SpanRecord) -> None:
        """A sampled span is over: queue it for the exporter's thread."""
        record.end = time_ns()
        queue = self._span_queue
        if queue is None:
            return
        size = len(queue)
        if size >= self._span_max:
            if self.spans is not None:
                self.spans.drop()  # as the BatchSpanProcessor does with a full queue
            return
        queue.append(record)
        if size + 1 == self._span_batch and self.spans is not None:
            self.spans.wake()

    def _end_server_span(
        self,
        span: SpanRecord,
        exchange: Exchange,
        method: str,
        status: int,
        reason: str,
        error: str | None,
    ) -> None:
        if not span.sampled:
            return  # sampled out: nothing to record
        attributes = span.attributes
        attributes["http.response.status_code"] = status
        route = exchange.route
        if route is not None:
            # Read once: each read goes through the Route protocol, not a native field.
            prefix = route.prefix
            service = route.name
            span.name = f"{method if method in KNOWN_METHODS else 'HTTP'} {prefix}"
            attributes["http.route"] = prefix
            attributes["sidecar.service"] = service
            attributes["sidecar.route"] = prefix
            attributes["sidecar.upstream.attempts"] = exchange.attempts
            attributes["sidecar.rate_limited"] = reason == "rate_limited"
            attributes["sidecar.circuit_open"] = reason == "circuit_open"
            breaker = self._breakers.get(service)
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
        # A step may name an error the status hides (a GraphQL 200 with errors).
        if status >= 500 or error is not None or "error.type" in attributes:
            span.error = True
        self._record(span)

    async def attempt(self, step: Attempt, exchange: Exchange, call: Call, next: Handler) -> Reply:
        """One upstream attempt of `exchange`, timed and (when tracing) spanned."""
        call.exchange = exchange
        return await step(call, next)

    def _client_span(self, step: Attempt, parent: SpanRecord, call: Call) -> SpanRecord | None:
        """An attempt's CLIENT span, or None when its request is not sampled; either way
        the upstream gets the trace context to continue."""
        if not parent.sampled:
            # An unsampled request: its attempts are not recorded either (parent-based
            # sampling), but the upstream still continues the same trace.
            parent.inject(call)
            return None
        # Its id from the pool (the last 8 of 24 bytes), in hex too for the traceparent.
        ids = self._ids
        at = 24 * ids.draw()
        span_hex = ids.hex[2 * at + 32 : 2 * at + 48]
        span_id = _from_bytes(ids.raw[at + 16 : at + 24], "big")  # 0: SpanRecord draws
        span = SpanRecord(
            call.method if call.method in KNOWN_METHODS else "HTTP",
            KIND_CLIENT,
            parent.trace_id,
            parent.span_id,
            False,
            True,
            parent.trace_state,
            span_id,
            parent.trace_hex,
            span_hex if span_id else b"",
        )
        span.encoded = step.encoded
        span.attributes = step.variable_attributes(call)
        # Replaces the agent's traceparent: the upstream's parent is this attempt.
        span.inject(call)
        return span

    def _attempt_failed(self, span: SpanRecord, outcome: str) -> None:
        span.attributes["error.type"] = outcome
        span.error = True
        self._record(span)

    def _attempt_answered(self, span: SpanRecord, status: int) -> None:
        span.attributes["http.response.status_code"] = status
        if status >= 400:
            span.attributes["error.type"] = str(status)
            span.error = True
        self._record(span)


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
        # The fixed ones in OTLP bytes, for the CLIENT span records.
        self.encoded = b"".join([_attribute(k, v) for k, v in self._fixed.items()])

    def attributes(self, call: Call) -> dict[str, Any]:
        """The CLIENT span's attributes at its start."""
        attributes = dict(self._fixed)
        attributes.update(self.variable_attributes(call))
        return attributes

    def variable_attributes(self, call: Call) -> dict[str, Any]:
        """Those of `attributes` that depend on the call, in the same order."""
        attributes: dict[str, Any] = {}
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
        exchange.attempts += 1
        metrics = telemetry.metrics.service(call.service)
        # Tracing on: a CLIENT span (or, unsampled, the trace context only); inline,
        # so that tracing adds no coroutine to the call.
        parent = exchange.span
        span: SpanRecord | None = None
        if parent is not None:
            span = telemetry._client_span(self, parent, call)
        else:
            traceparent = exchange.traceparent
            if traceparent:
                # A root span the sampler dropped: its trace goes on upstream all the same.
                call.set_raw_field(_TRACEPARENT, (_TRACEPARENT, traceparent))
        start = perf_counter()
        try:
            reply = await next(call)
        except BaseException as exc:
            outcome = _outcome(exc)
            metrics.attempt(outcome).observe(perf_counter() - start)
            if span is not None:
                telemetry._attempt_failed(span, outcome)
            raise
        status = reply.status
        metrics.answered(status).observe(perf_counter() - start)
        if span is not None:
            telemetry._attempt_answered(span, status)
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


def _trace_id(exchange: Exchange) -> str | None:
    span = exchange.span
    if span is not None:
        return span.trace_text()
    if exchange.traceparent:
        return exchange.traceparent[3:35].decode()  # a dropped root span's trace id
    request = exchange.request
    # Tracing off: the agent's own trace id still ties the line to its trace.
    parent = request.header(b"traceparent")  # one field, not the whole head decoded
    if parent and len(parent) >= 55 and parent[2] == "-" and parent[35] == "-":
        trace_id = parent[3:35].lower()
        if trace_id.strip("0123456789abcdef") == "" and trace_id != "0" * 32:
            return trace_id
    return None


def _field(fields: list[tuple[bytes, bytes]], key: bytes, usual: bytes) -> bytes | None:
    """The first raw field called `key` (lowercase), any case; `usual`, the case clients
    mostly send, is matched without a lowercase copy."""
    size = len(key)
    for name, value in fields:
        if len(name) == size and (name == usual or name.lower() == key):
            return value
    return None


def _host_port(host: str) -> tuple[str, int | None]:
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit() and (not name.startswith("[") or name.endswith("]")):
        return name.strip("[]"), int(port)
    return host.strip("[]"), None
