"""Metrics and spans for every webhook receipt and delivery attempt.

Observes from outside: the hub opens a receipt around each inbound or
outbound event it is handed, the delivery worker calls `begin` before each
attempt (the watcher interface in delivery.py). With tracing off (no tracer)
no span object is made and nothing is propagated.

Trace shape: the receipt span (SERVER for a sender's POST on ingress,
PRODUCER for an agent's publish on egress) continues the sender's or agent's
traceparent and its own context is what the store keeps with the event, so
each delivery attempt's CLIENT span, made maybe hours later or by another
process after a restart, is its child; the attempt's context is sent to the
target as `traceparent`.

Never recorded: bodies, header values other than the trace context, secrets,
a target's query string, an outbound endpoint's URL path (Slack's URLs are
their credential): endpoints appear by name, inbound targets as origin + path.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from .answers import Result
from .delivery import AttemptEnd
from .queue import SUBSCRIPTION, Attempt, Direction, Due, Outcome, QueueDepth
from .subscriptions import Subscriptions

if TYPE_CHECKING:
    from opentelemetry.trace import Span

    from ..telemetry.metrics import WebhookMetrics

_propagator = TraceContextTextMapPropagator()
TRACE_HEADERS = ("traceparent", "tracestate")
# An event type or id is chosen by the sender: bound what a span keeps of it.
MAX_TEXT = 128

Headers = list[tuple[str, str]]


def endpoint_label(direction: Direction, endpoint: str) -> str:
    """Outbound: the endpoint's name as it is. Inbound: the target URL without its query."""
    if direction is Direction.outbound or endpoint == SUBSCRIPTION:
        return endpoint
    parts = urlsplit(endpoint)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _carrier(headers: Headers | Mapping[str, str]) -> dict[str, str]:
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    return {k.lower(): v for k, v in pairs if k.lower() in TRACE_HEADERS}


class Receipt:
    """One event being received; `done` with what it was answered."""

    __slots__ = ("_direction", "_metrics", "_span", "_webhook", "headers")

    def __init__(
        self,
        metrics: WebhookMetrics,
        direction: Direction,
        webhook: str,
        span: Span | None,
        headers: Headers,
    ) -> None:
        self._metrics = metrics
        self._direction = direction
        self._webhook = webhook
        self._span = span
        # What the receiver stores: with tracing on, its trace context is the receipt's.
        self.headers = headers

    def done(self, result: Result) -> None:
        outcome = result.outcome or str(result.status)
        self._metrics.receipt(self._direction.value, self._webhook, outcome)
        span = self._span
        if span is None or not span.is_recording():
            return
        attributes: dict[str, Any] = {
            "http.response.status_code": result.status,
            "sidecar.webhook.outcome": outcome,
        }
        if result.message_id is not None:
            attributes["sidecar.webhook.message_id"] = result.message_id
        if result.reason is not None:
            attributes["sidecar.error.reason"] = result.reason
            attributes["error.type"] = outcome
        span.set_attributes(attributes)
        if result.status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()


class WebhookTelemetry:
    """The webhooks' metrics and (when tracing is on) their tracer."""

    def __init__(self, metrics: WebhookMetrics, tracer: Tracer | None) -> None:
        self.metrics = metrics
        self.tracer = tracer

    def receipt(self, direction: Direction, webhook: str, headers: Headers) -> Receipt:
        tracer = self.tracer
        if tracer is None:
            return Receipt(self.metrics, direction, webhook, None, headers)
        inbound = direction is Direction.inbound
        span = tracer.start_span(
            f"webhook {'receive' if inbound else 'publish'} {webhook}",
            context=_propagator.extract(_carrier(headers)),
            kind=SpanKind.SERVER if inbound else SpanKind.PRODUCER,
            attributes={
                "http.request.method": "POST",
                "sidecar.webhook.direction": direction.value,
                "sidecar.webhook.name": webhook,
            },
        )
        if span.is_recording():
            carrier: dict[str, str] = {}
            _propagator.inject(carrier, context=set_span_in_context(span))
            headers = [(k, v) for k, v in headers if k.lower() not in TRACE_HEADERS]
            headers.extend(carrier.items())
        return Receipt(self.metrics, direction, webhook, span, headers)

    def begin(self, due: Due, headers: dict[str, str]) -> AttemptEnd:
        """Before a delivery attempt: its CLIENT span, whose context goes to the target."""
        key = (due.direction.value, due.source, endpoint_label(due.direction, due.endpoint))
        tracer = self.tracer
        span = _attempt_span(tracer, due, headers, key[2]) if tracer is not None else None
        metrics = self.metrics

        def end(attempt: Attempt, outcome: Outcome) -> None:
            metrics.attempt(key, outcome.value, attempt.duration)
            if outcome is Outcome.delivered and due.created:
                metrics.delivered(key[0], key[1], max(0.0, time.time() - due.created))
            if span is not None and span.is_recording():
                _end_attempt(span, attempt, outcome)

        return end

    def watch_subscriptions(self, subs: Subscriptions) -> None:
        metrics = self.metrics
        subs.on_sent = metrics.subscription_sent
        subs.on_acked = lambda webhook, n: metrics.subscription_acked(webhook, SUBSCRIPTION, n)
        subs.on_streams = metrics.subscriber_streams

    def queue_depths(self, rows: list[QueueDepth]) -> None:
        """The store's current queue depths, into the gauges."""
        self.metrics.queue.update(
            [
                (
                    (r.direction.value, r.source, endpoint_label(r.direction, r.endpoint)),
                    r.depth,
                    r.oldest_pending_age,
                )
                for r in rows
            ]
        )


def _attempt_span(tracer: Tracer, due: Due, headers: dict[str, str], endpoint: str) -> Span:
    parts = urlsplit(due.url)
    attributes: dict[str, Any] = {
        "http.request.method": "POST",
        "server.address": parts.hostname or "",
        "server.port": parts.port or (443 if parts.scheme == "https" else 80),
        "sidecar.webhook.direction": due.direction.value,
        "sidecar.webhook.name": due.source,
        "sidecar.webhook.endpoint": endpoint,
        "sidecar.webhook.message_id": due.message_id,
        "sidecar.webhook.attempt": due.attempts + 1,
    }
    if due.event_type:
        attributes["sidecar.webhook.event_type"] = due.event_type[:MAX_TEXT]
    if due.attempts:
        attributes["http.request.resend_count"] = due.attempts
    span = tracer.start_span(
        f"webhook deliver {due.source}",
        context=_propagator.extract(_carrier(due.headers)),
        kind=SpanKind.CLIENT,
        attributes=attributes,
    )
    for name in list(headers):
        if name.lower() in TRACE_HEADERS:
            del headers[name]  # the sender's context: the target's parent is this attempt
    _propagator.inject(headers, context=set_span_in_context(span))
    return span


def _end_attempt(span: Span, attempt: Attempt, outcome: Outcome) -> None:
    attributes: dict[str, Any] = {"sidecar.webhook.outcome": outcome.value}
    if attempt.status_code is not None:
        attributes["http.response.status_code"] = attempt.status_code
    if not attempt.ok:
        # The worker's own words: never the URL, never the body.
        attributes["error.type"] = _error_type(attempt)
        span.set_status(Status(StatusCode.ERROR))
    span.set_attributes(attributes)
    span.end()


def _error_type(attempt: Attempt) -> str:
    if attempt.status_code is not None:
        return str(attempt.status_code)
    error = attempt.error or ""
    if error.startswith("no answer"):
        return "timeout"
    if error.startswith("could not connect"):
        return "connect-error"
    return "not-configured"
