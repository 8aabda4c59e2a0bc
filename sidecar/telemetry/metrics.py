"""Prometheus metrics, served as text on the admin port's /metrics.

prometheus_client rather than the OpenTelemetry metrics SDK: an observation on
a label child that is already bound is an increment under an uncontended lock,
while the OTel SDK hashes the attribute set and looks up its aggregation on
every record, and its Prometheus reader needs prometheus_client anyway.

Each Metrics object has its own registry, so two sidecars in one process (as
in tests) never share counts. Label children are bound once per service (at
reload) and per (method, code, reason) on first use, then reused: the request
path does dictionary lookups, never `labels()`.
"""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# The *_created series double the output and say nothing a scrape needs.
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = CONTENT_TYPE_LATEST

# From 1 ms to 5 min: sidecar refusals take microseconds, LLM answers minutes.
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Methods outside this set share one label value, so a client cannot mint series.
KNOWN_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD = "_OTHER"


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


class ServiceMetrics:
    """The label children of one service; "" is the service of unrouted requests."""

    __slots__ = ("_attempts", "_metrics", "_requests", "rate_limited", "service")

    def __init__(self, metrics: Metrics, service: str) -> None:
        self.service = service
        self._metrics = metrics
        self._requests: dict[tuple[str, int, str], Histogram] = {}
        self._attempts: dict[str, Histogram] = {}
        self.rate_limited = metrics.rate_limited.labels(service)

    def request(self, method: str, status: int, reason: str) -> Histogram:
        key = (method, status, reason)
        child = self._requests.get(key)
        if child is None:
            child = self._metrics.request_duration.labels(
                self.service, method_label(method), str(status), reason
            )
            self._requests[key] = child
        return child

    def attempt(self, outcome: str) -> Histogram:
        child = self._attempts.get(outcome)
        if child is None:
            child = self._metrics.attempt_duration.labels(self.service, outcome)
            self._attempts[outcome] = child
        return child


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.request_duration = Histogram(
            "sidecar_request_duration_seconds",
            "Agent requests, from arrival until the last byte of the answer was sent. "
            "reason: the X-Sidecar-Error reason when the sidecar answered itself.",
            ["service", "method", "code", "reason"],
            buckets=BUCKETS,
            registry=r,
        )
        self.attempt_duration = Histogram(
            "sidecar_upstream_attempt_duration_seconds",
            "Each try of an upstream call, until its response headers arrived. "
            "outcome: the status code, or connect-error, timeout, reset, cancelled.",
            ["service", "outcome"],
            buckets=BUCKETS,
            registry=r,
        )
        self.rate_limited = Counter(
            "sidecar_rate_limited",
            "Requests the sidecar refused with 429 rate_limited.",
            ["service"],
            registry=r,
        )
        self.breaker_transitions = Counter(
            "sidecar_circuit_breaker_transitions",
            "Circuit breaker state changes (closed, open, half_open).",
            ["service", "from", "to"],
            registry=r,
        )
        self.openapi_violations = Counter(
            "sidecar_openapi_request_violations",
            "Requests that broke their service's OpenAPI document (validate.requests). "
            "action: refused (enforce, answered 422/404) or reported (report, sent anyway); "
            "operation: the operationId, 'METHOD /template', or _unknown.",
            ["service", "operation", "action"],
            registry=r,
        )
        self.openapi_drift = Counter(
            "sidecar_openapi_response_drift",
            "Upstream answers whose status or Content-Type the service's OpenAPI document does "
            "not describe (validate.responses: report). kind: status or content_type.",
            ["service", "operation", "kind"],
            registry=r,
        )
        self.reloads = reloads = Counter(
            "sidecar_reloads",
            "Policy reload attempts; a failed one leaves the last good policy serving.",
            ["result"],
            registry=r,
        )
        self.reload_success = reloads.labels("success")
        self.reload_failure = reloads.labels("failure")
        self.in_flight = Gauge(
            "sidecar_requests_in_flight",
            "Agent requests being handled right now.",
            registry=r,
        )
        self._services: dict[str, ServiceMetrics] = {}

    def service(self, name: str) -> ServiceMetrics:
        found = self._services.get(name)
        if found is None:
            found = self._services[name] = ServiceMetrics(self, name)
        return found

    def bind(self, services: list[str]) -> None:
        """Bind the children of the services a new policy routes to, off the request path."""
        for name in services:
            self.service(name)

    def on_transition(self, service: str, frm: str, to: str) -> None:
        self.breaker_transitions.labels(service, frm, to).inc()

    def on_request_violation(self, service: str, operation: str, action: str) -> None:
        # Off the hot path: only a call that broke the document gets here.
        self.openapi_violations.labels(service, operation, action).inc()

    def on_response_drift(self, service: str, operation: str, kind: str) -> None:
        self.openapi_drift.labels(service, operation, kind).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
