"""The agent requests' spans: recorded as small records, exported in batches by a thread.

The request path (exchange.py) makes a `SpanRecord` (records.py) per sampled span and
appends it to `SpanExporter.queue`, a deque: no SDK `Span`, no lock, no OTLP message
per call.
The exporter's thread wakes when a batch is full or the schedule delay has passed
(the standard OTEL_BSP_* variables), writes the OTLP protobuf bytes of the batch
itself, and posts them over one kept-alive connection (endpoint, headers, TLS files,
compression, timeout and retries as OTEL_EXPORTER_OTLP_* say, as the SDK's exporter).

What goes out is what the SDK exporter would send for the same spans: the envelope
(resource and instrumentation scope) is encoded once by the SDK's `encode_spans`, and
each span follows the field layout of `opentelemetry.proto.trace.v1.Span` (checked
field by field against the SDK's encoder in tests/test_telemetry_spans.py).
"""

from __future__ import annotations

import collections
import gzip
import http.client
import logging
import random
import ssl
import threading
import time
import zlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

# The encoder is compiled (records.py): it runs once per span.
from .records import SCOPE, Encoder, SpanRecord

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import SpanContext

__all__ = ["SCOPE", "Encoder", "SpanExporter", "SpanRecord"]

log = logging.getLogger("sidecar.telemetry")


# As the SDK's OTLP/HTTP exporter: these answers are tried again, with backoff.
RETRYABLE = frozenset({408, 429, 502, 503, 504})
MAX_RETRIES = 6


class Poster:
    """POSTs export requests over one kept-alive connection, as the SDK's OTLP/HTTP
    exporter would: same headers, compression, timeout, TLS files and retries.

    http.client rather than the exporter's requests session: requests reads the
    environment's proxy settings and builds a prepared request on every post, which
    cost as much CPU per batch as encoding its 512 spans.
    """

    def __init__(self, endpoint: str, env: Mapping[str, str], options: dict[str, Any]) -> None:
        parts = urlsplit(endpoint)
        self.https = parts.scheme == "https"
        self.host = parts.hostname or "localhost"
        self.port = parts.port or (443 if self.https else 80)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.timeout: float = options["timeout"]
        self.gzip = options["compression"].value == "gzip"
        self.deflate = options["compression"].value == "deflate"
        self.headers = {"Content-Type": "application/x-protobuf", **options["headers"]}
        if self.gzip or self.deflate:
            self.headers["Content-Encoding"] = "gzip" if self.gzip else "deflate"
        self._context: ssl.SSLContext | None = None
        if self.https:

            def setting(name: str) -> str | None:
                value = env.get(
                    f"OTEL_EXPORTER_OTLP_TRACES_{name}", env.get(f"OTEL_EXPORTER_OTLP_{name}", "")
                ).strip()
                return value or None

            self._context = ssl.create_default_context(cafile=setting("CERTIFICATE"))
            certificate = setting("CLIENT_CERTIFICATE")
            if certificate is not None:
                self._context.load_cert_chain(certificate, setting("CLIENT_KEY"))
        self._connection: http.client.HTTPConnection | None = None
        self.stopping = threading.Event()

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self._connection is None:
            if self.https:
                self._connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=timeout, context=self._context
                )
            else:
                self._connection = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        self._connection.timeout = timeout
        return self._connection

    def _post(self, data: bytes, timeout: float) -> int | None:
        """The answer's status, or None when the connection failed."""
        for reuse in (True, False):
            connection = self._connect(timeout)
            try:
                connection.request("POST", self.path, body=data, headers=self.headers)
                answer = connection.getresponse()
                answer.read()
                if answer.will_close:
                    self.close()
                return answer.status
            except (OSError, http.client.HTTPException):
                self.close()
                # A kept-alive connection the collector closed: once more on a new one.
                if not reuse:
                    return None
        return None

    def send(self, data: bytes) -> bool:
        if self.gzip:
            data = gzip.compress(data)
        elif self.deflate:
            data = zlib.compress(data)
        deadline = time.monotonic() + self.timeout
        status: int | None = None
        for retry in range(MAX_RETRIES):
            status = self._post(data, max(deadline - time.monotonic(), 0.001))
            if status is not None and 200 <= status < 400:
                return True
            if status is not None and status not in RETRYABLE:
                break
            backoff = 2**retry * random.uniform(0.8, 1.2)
            if time.monotonic() + backoff > deadline or self.stopping.wait(backoff):
                break
        log.warning("spans not exported: %s", status or "no connection to the collector")
        return False

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


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

    def __init__(
        self, *, endpoint: str, options: dict[str, Any], resource: Resource, env: Mapping[str, str]
    ) -> None:
        self.encoder = Encoder(resource)
        self._poster = Poster(endpoint, env, options)
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

    def drop(self) -> None:
        """A span found the queue full: counted, and said once per 10,000."""
        if self.dropped % 10_000 == 0:
            log.warning("Queue is full: spans dropped (%d so far)", self.dropped + 1)
        self.dropped += 1

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
                self._poster.send(data)
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
        # Before the join: what is left is tried once, not retried with backoff.
        self._poster.stopping.set()
        self._wake.set()
        self._thread.join()
        self._poster.close()
