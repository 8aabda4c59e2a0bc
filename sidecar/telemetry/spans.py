"""The agent requests' spans: recorded as small records, exported in batches by a thread.

The request path (exchange.py) makes a `SpanRecord` per sampled span and appends it
to `SpanExporter.queue`, a deque: no SDK `Span`, no lock, no OTLP message per call.
The exporter's thread wakes when a batch is full or the schedule delay has passed
(the standard OTEL_BSP_* variables), writes the OTLP protobuf bytes of the batch
itself, and posts them with the SDK's own OTLP/HTTP exporter transport (endpoint,
headers, TLS, compression, timeout and retries as OTEL_EXPORTER_OTLP_* say).

What goes out is what the SDK exporter would send for the same spans: the envelope
(resource and instrumentation scope) is encoded once by the SDK's `encode_spans`, and
each span follows the field layout of `opentelemetry.proto.trace.v1.Span` (checked
field by field against the SDK's encoder in tests/telemetry/test_spans.py).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

# The encoder is compiled with the request path (exchange.py): it runs once per span.
from .exchange import SCOPE, Encoder, SpanRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import SpanContext

__all__ = ["SCOPE", "Encoder", "SpanExporter", "SpanRecord"]

log = logging.getLogger("sidecar.telemetry")


def _sender(exporter: Any) -> Callable[[bytes], bool]:
    """Post serialized bytes with the SDK exporter's own transport and retries."""
    client = getattr(exporter, "_client", None)
    if client is not None and hasattr(client, "export"):  # opentelemetry-exporter >= 1.40
        return lambda data: bool(client.export(data).success)
    export = getattr(exporter, "_export", None)  # earlier: one attempt per call
    if export is not None:
        return lambda data: bool(export(data).ok)
    raise RuntimeError("this opentelemetry-exporter-otlp-proto-http has no known transport")


def _setting(env: Mapping[str, str], name: str, default: int) -> int:
    text = env.get(name, "").strip()
    try:
        value = int(text) if text else default
    except ValueError:
        log.warning("%s=%r is not a number; using %d", name, text, default)
        return default
    return value if value > 0 else default


class SpanExporter:
    """The batch queue the request path appends to, and the thread that empties it."""

    def __init__(self, *, exporter: Any, resource: Resource, env: Mapping[str, str]) -> None:
        self.encoder = Encoder(resource)
        self._exporter = exporter
        self._send = _sender(exporter)
        # The BatchSpanProcessor's variables and defaults.
        self.max_queue = _setting(env, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
        self.batch_size = min(_setting(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512), self.max_queue)
        self._delay = _setting(env, "OTEL_BSP_SCHEDULE_DELAY", 5000) / 1000
        # deque.append and popleft are atomic: the loop and this thread share it lock-free.
        self.queue: collections.deque[SpanRecord] = collections.deque()
        self.dropped = 0
        self._wake = threading.Event()
        self._flushed = threading.Condition()
        self._flush_requests = 0
        self._flush_done = 0
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="sidecar-spans", daemon=True)
        self._thread.start()

    @staticmethod
    def extract(headers: Any) -> SpanContext | None:
        """The agent's W3C trace context, read as the SDK's propagator reads it."""
        from opentelemetry.trace import get_current_span
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        context = get_current_span(TraceContextTextMapPropagator().extract(headers))
        span_context = context.get_span_context()
        return span_context if span_context.is_valid else None

    def wake(self) -> None:
        """A batch is full (called from the loop, once per batch)."""
        self._wake.set()

    def _run(self) -> None:
        while True:
            # Woken: a batch is full (or a flush, or shutdown); else the delay is over.
            woken = self._wake.wait(self._delay)
            self._wake.clear()
            with self._flushed:
                flushing = self._flush_requests
                everything = not woken or flushing > self._flush_done or self._stopping
            self._export(everything)
            with self._flushed:
                self._flush_done = flushing
                self._flushed.notify_all()
            if self._stopping:
                return

    def _export(self, everything: bool) -> None:
        """Full batches; and what is left when the delay is over or on a flush."""
        queue = self.queue
        size = self.batch_size
        while len(queue) >= size or (everything and queue):
            batch = [queue.popleft() for _ in range(min(len(queue), size))]
            try:
                data = self.encoder.request(batch)
                if not self._send(data):
                    log.warning("%d spans not exported", len(batch))
            except Exception:
                log.exception("exporting %d spans failed", len(batch))

    def force_flush(self, timeout_ms: int = 30000) -> bool:
        """Export what is queued now; blocks (from a thread or a test)."""
        with self._flushed:
            self._flush_requests += 1
            wanted = self._flush_requests
            self._wake.set()
            return self._flushed.wait_for(
                lambda: self._flush_done >= wanted or not self._thread.is_alive(),
                timeout_ms / 1000,
            )

    def shutdown(self) -> None:
        """Export what is left, stop the thread and the transport."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._exporter.shutdown()
