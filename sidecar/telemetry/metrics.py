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

from collections.abc import Callable, Iterable, Sequence
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import values as _values
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector

# The *_created series double the output and say nothing a scrape needs.
disable_created_metrics()  # type: ignore[no-untyped-call]


class LoopValue:
    """prometheus_client's value without its mutex.

    Every observation happens on the event loop's thread, and a scrape (the
    admin port, same thread) or the OTLP exporter's thread only reads a float,
    which the GIL makes whole; the lock of the default MutexValue cost a
    measurable share of each call (six increments per request). Installed as
    prometheus_client's value class before any metric of this module is made.
    """

    __slots__ = ("_exemplar", "_value")
    _multiprocess = False

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._value = 0.0
        self._exemplar: object = None

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def set_exemplar(self, exemplar: object) -> None:
        self._exemplar = exemplar

    def get(self) -> float:
        return self._value

    def get_exemplar(self) -> object:
        return self._exemplar


_values.ValueClass = LoopValue

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# From 1 ms to 5 min: sidecar refusals take microseconds, LLM answers minutes.
BUCKETS: Final = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

# Methods outside this set share one label value, so a client cannot mint series.
KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
OTHER_METHOD: Final = "_OTHER"

# Agent ids and model names come from the agents' requests: each service keeps at
# most this many distinct values per label, later ones share OTHER_LABEL.
MAX_LLM_AGENTS: Final = 100
MAX_LLM_MODELS: Final = 50
MAX_LABEL: Final = 128
OTHER_LABEL: Final = "_other"
# Agents the console tells apart (AgentTally); later ones share OTHER_LABEL.
MAX_TALLY_AGENTS: Final = 200


class Timings:
    """One bound Histogram child, observed on the request path.

    What `Histogram.observe` does (the sum, the first bucket whose bound is not
    below the amount) without its per-call checks and linear bucket walk: the
    child is bound here, its values are LoopValues, and the request path observes
    two of these on every call.
    """

    __slots__ = ("_bounds", "_buckets", "_sum", "child")

    def __init__(self, child: Histogram) -> None:
        self.child = child
        self._bounds = tuple(child._upper_bounds)
        buckets = tuple(child._buckets)
        if not all(isinstance(b, LoopValue) for b in (child._sum, *buckets)):
            raise TypeError("Timings needs LoopValue values (installed by this module)")
        self._buckets: tuple[LoopValue, ...] = buckets
        self._sum: LoopValue = child._sum

    def observe(self, amount: float) -> None:
        self._sum._value += amount
        # From the smallest bound up, compiled: most calls take milliseconds and stop
        # at the first or second bucket, where bisect_left cost a call into C and back.
        # The last bound is +Inf: every amount but NaN has a bucket (prometheus_client's
        # own observe counts NaN in none either).
        for index, bound in enumerate(self._bounds):
            if amount <= bound:
                self._buckets[index]._value += 1
                return


def method_label(method: str) -> str:
    return method if method in KNOWN_METHODS else OTHER_METHOD


class ServiceMetrics:
    """The label children of one service; "" is the service of unrouted requests."""

    __slots__ = ("_answered", "_attempts", "_metrics", "_requests", "rate_limited", "service")

    def __init__(self, metrics: Metrics, service: str) -> None:
        self.service = service
        self._metrics = metrics
        self._requests: dict[tuple[str, int, str], Timings] = {}
        self._attempts: dict[str, Timings] = {}
        self._answered: dict[int, Timings] = {}
        self.rate_limited = metrics.rate_limited.labels(service)

    def request(self, method: str, status: int, reason: str) -> Timings:
        key = (method, status, reason)
        child = self._requests.get(key)
        if child is None:
            child = Timings(
                self._metrics.request_duration.labels(
                    self.service, method_label(method), str(status), reason
                )
            )
            self._requests[key] = child
        return child

    def attempt(self, outcome: str) -> Timings:
        child = self._attempts.get(outcome)
        if child is None:
            child = Timings(self._metrics.attempt_duration.labels(self.service, outcome))
            self._attempts[outcome] = child
        return child

    def answered(self, status: int) -> Timings:
        """`attempt(str(status))`, without making the string on every call."""
        child = self._answered.get(status)
        if child is None:
            child = self._answered[status] = self.attempt(str(status))
        return child


class AgentTally:
    """Calls and refusals per agent, for the console: two plain ints, no Prometheus series.

    Agent ids come from requests, so at most MAX_TALLY_AGENTS are kept apart and
    the rest share OTHER_LABEL, as the LLM token labels do.
    """

    __slots__ = ("counts",)

    def __init__(self) -> None:
        # agent -> [calls, refusals]
        self.counts: dict[str, list[int]] = {}

    def count(self, agent: str, refused: bool) -> None:
        found = self.counts.get(agent)
        if found is None:
            found = self._new(agent)
        found[0] += 1
        if refused:
            found[1] += 1

    def _new(self, agent: str) -> list[int]:
        counts = self.counts
        key = agent[:MAX_LABEL]
        found = counts.get(key)
        if found is None:
            if len(counts) >= MAX_TALLY_AGENTS:
                key = OTHER_LABEL
                found = counts.get(key)
            if found is None:
                found = counts[key] = [0, 0]
        return found


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
        self.faults_injected = Counter(
            "sidecar_faults_injected",
            "Faults the sidecar injected on purpose (services.<name>.faults). "
            "kind: delay, abort, reset, bandwidth or sse.",
            ["service", "kind"],
            registry=r,
        )
        self.cache_requests = Counter(
            "sidecar_cache_requests",
            "Calls of a method a service's cache keeps (services.<name>.cache). result: hit "
            "(answered from the cache), miss (sent upstream), revalidated (a stale entry "
            "confirmed by the upstream's 304), stale (a stale entry served because the "
            "upstream failed) or bypass (not looked up: the agent sent Cache-Control "
            "no-store/no-cache or its own Authorization/Cookie, or a POST body too large to "
            "key).",
            ["service", "result"],
            registry=r,
        )
        # (service, result) -> its child's value: a hit counts itself with no `labels()`.
        self._cache_counts: dict[tuple[str, str], LoopValue] = {}
        self.cache_evictions = Counter(
            "sidecar_cache_evictions",
            "Entries a service's in-memory cache dropped to stay within max_entries and "
            "max_bytes (least recently used first).",
            ["service"],
            registry=r,
        )
        self.cache_backend_errors = Counter(
            "sidecar_cache_backend_errors",
            "Cache reads and writes that failed (or were skipped while the backend was "
            "down) because a service's Redis cache backend did not answer; the call went "
            "on uncached.",
            ["service"],
            registry=r,
        )
        self.cache = CacheGauges()
        r.register(self.cache)
        self.graphql_errors = Counter(
            "sidecar_graphql_errors",
            "GraphQL answers with a good status and a non-empty errors array, of services "
            "with graphql.count_errors (each counted as a failure by the circuit breaker).",
            ["service"],
            registry=r,
        )
        self.faults = FaultGauges()
        r.register(self.faults)
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
        # Moved on every request: its value itself, not Gauge.inc()'s checks.
        self.in_flight_value: LoopValue = self.in_flight._value
        self.llm_tokens = Counter(
            "sidecar_llm_tokens",
            "Tokens LLM answers reported in their usage. kind: input (the prompt, cached "
            "input included) or output; agent and model: up to 100 agents and 50 models per "
            "service, the rest as _other; model 'unknown' when neither the request nor the "
            "answer named it.",
            ["service", "agent", "model", "kind"],
            registry=r,
        )
        self.llm_budget_spent = Counter(
            "sidecar_llm_budget_spent",
            "What LLM answers charged to a service's budgets (services.<name>.budget): tokens, "
            "or money in the currency of the policy's prices. budget: as written, like "
            "'tokens 2M/day per agent' (one per budget of the policy, all agents together).",
            ["service", "budget"],
            registry=r,
        )
        self.llm_budget_exhausted = Counter(
            "sidecar_llm_budget_exhausted",
            "Calls the sidecar refused with 429 budget_exhausted, per budget.",
            ["service", "budget"],
            registry=r,
        )
        self._llm: dict[tuple[str, str, str], tuple[Counter, Counter]] = {}
        self._llm_labels: dict[str, tuple[set[str], set[str]]] = {}
        self._services: dict[str, ServiceMetrics] = {}
        self.webhooks = WebhookMetrics(r)
        self.agents = AgentTally()
        self.alerts = AlertGauges()
        r.register(self.alerts)
        self.breakers = BreakerGauges()
        r.register(self.breakers)

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

    def on_llm_usage(
        self, service: str, agent: str, model: str, input: int | None, output: int | None
    ) -> None:
        """Count one answer's tokens; once per LLM answer, at its end."""
        agents, models = self._llm_labels.setdefault(service, (set(), set()))
        agent = _bounded(agent, agents, MAX_LLM_AGENTS)
        model = _bounded(model, models, MAX_LLM_MODELS)
        key = (service, agent, model)
        children = self._llm.get(key)
        if children is None:
            counter = self.llm_tokens
            children = self._llm[key] = (
                counter.labels(service, agent, model, "input"),
                counter.labels(service, agent, model, "output"),
            )
        if input:
            children[0].inc(input)
        if output:
            children[1].inc(output)

    def on_budget_spent(self, service: str, budget: str, amount: float) -> None:
        self.llm_budget_spent.labels(service, budget).inc(amount)

    def on_budget_exhausted(self, service: str, budget: str) -> None:
        self.llm_budget_exhausted.labels(service, budget).inc()

    def on_fault(self, service: str, kind: str) -> None:
        self.faults_injected.labels(service, kind).inc()

    def on_cache(self, service: str, result: str) -> None:
        key = (service, result)
        value = self._cache_counts.get(key)
        if value is None:
            child = self.cache_requests.labels(service, result)
            child.inc()
            found = child._value
            if isinstance(found, LoopValue):
                self._cache_counts[key] = found
            return
        value._value += 1

    def on_cache_evicted(self, service: str, count: int) -> None:
        self.cache_evictions.labels(service).inc(count)

    def on_cache_backend_error(self, service: str) -> None:
        self.cache_backend_errors.labels(service).inc()

    def on_graphql_errors(self, service: str) -> None:
        self.graphql_errors.labels(service).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _bounded(value: str, seen: set[str], most: int) -> str:
    value = value[:MAX_LABEL]
    if value in seen:
        return value
    if len(seen) >= most:
        return OTHER_LABEL
    seen.add(value)
    return value


# (direction, webhook, endpoint): an outbound endpoint's name, an inbound target's URL.
QueueKey = tuple[str, str, str]


BREAKER_STATES: Final = ("closed", "open", "half_open")


class BreakerGauges(Collector):
    """Each service's breaker state as a state set: 1 for the state it is in, 0 for the others.

    Read at scrape time from `source` (set by the runtime), so a dashboard or a
    Prometheus rule sees an open breaker without reconstructing it from transitions.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str]]] = tuple

    def collect(self) -> Iterable[Family]:
        family = GaugeMetricFamily(
            "sidecar_circuit_breaker_state",
            "A service's circuit breaker: 1 for the state it is in (closed, open, half_open).",
            labels=["service", "state"],
        )
        for service, state in self.source():
            for name in BREAKER_STATES:
                family.add_metric([service, name], 1.0 if name == state else 0.0)
        return [family]


class AlertGauges(Collector):
    """ALERTS-style: 1 for each alert firing (or pending) now, as Prometheus' own ALERTS.

    `source` is set by the alert engine: (alertname, state, service, severity) rows.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, str, str, str]]] = tuple

    def collect(self) -> Iterable[Family]:
        family = GaugeMetricFamily(
            "sidecar_alerts",
            "Alerts of the policy's alerts: section that are pending or firing now (1). "
            "alertname: the rule's name; alertstate: pending or firing; service: what it is "
            "about (a service, budget, webhook endpoint or pool), '' for the sidecar itself.",
            labels=["alertname", "alertstate", "service", "severity"],
        )
        for name, state, subject, severity in self.source():
            family.add_metric([name, state, subject, severity], 1.0)
        return [family]


class FaultGauges(Collector):
    """1 for each service whose fault injection is on right now, 0 when switched off.

    Read at scrape time from `source` (set by the runtime): a switch by the
    admin port or a reload shows at once, and a service that lost its `faults:`
    does not linger.
    """

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, bool]]] = tuple

    def collect(self) -> Iterable[Family]:
        family = GaugeMetricFamily(
            "sidecar_faults_enabled",
            "Whether a service's fault injection is on (1) or switched off (0).",
            labels=["service"],
        )
        for service, enabled in self.source():
            family.add_metric([service], 1.0 if enabled else 0.0)
        return [family]


class CacheGauges(Collector):
    """Entries and bytes each service's in-memory cache holds, read at scrape time."""

    def __init__(self) -> None:
        # (service, entries, bytes) per service with an in-memory cache; set by the runtime.
        self.source: Callable[[], Iterable[tuple[str, int, int]]] = tuple

    def collect(self) -> Iterable[Family]:
        entries = GaugeMetricFamily(
            "sidecar_cache_entries",
            "Answers a service's in-memory cache holds (each Vary variant counts).",
            labels=["service"],
        )
        size = GaugeMetricFamily(
            "sidecar_cache_bytes",
            "Bytes of answer bodies a service's in-memory cache holds.",
            labels=["service"],
        )
        for service, count, held in self.source():
            entries.add_metric([service], count)
            size.add_metric([service], held)
        return [entries, size]


class QueueGauges(Collector):
    """Webhook queue depth and oldest pending age, as of the last `update`.

    A collector, not a Gauge: each update replaces the whole set, so an endpoint
    that left the policy (or whose queue drained) does not linger with its old value.
    """

    def __init__(self) -> None:
        self._rows: Sequence[tuple[QueueKey, int, float | None]] = ()

    def update(self, rows: Sequence[tuple[QueueKey, int, float | None]]) -> None:
        self._rows = rows  # one reference swap: the OTLP thread reads whole snapshots

    def collect(self) -> Iterable[Family]:
        labels = ["direction", "webhook", "endpoint"]
        depth = GaugeMetricFamily(
            "sidecar_webhook_queue_depth",
            "Webhook deliveries waiting (pending, not yet delivered or dead).",
            labels=labels,
        )
        oldest = GaugeMetricFamily(
            "sidecar_webhook_oldest_pending_seconds",
            "Age of the oldest pending webhook delivery's message.",
            labels=labels,
        )
        for key, count, age in self._rows:
            depth.add_metric(list(key), count)
            if age is not None:
                oldest.add_metric(list(key), age)
        return [depth, oldest]


class WebhookMetrics:
    """Receipts and delivery attempts of inbound and outbound webhooks.

    Labels are bounded by the policy: webhook and endpoint names, inbound
    target URLs without their query; outcomes are a fixed vocabulary.
    Children are cached on first use, off the sender's path after the first event.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.received = Counter(
            "sidecar_webhook_received",
            "Webhook events received: inbound from senders on the ingress listener, "
            "outbound from agents on /_webhooks/<name>. outcome: accepted, duplicate, "
            "unrouted, or why it was refused.",
            ["direction", "webhook", "outcome"],
            registry=registry,
        )
        self.deliveries = Counter(
            "sidecar_webhook_deliveries",
            "Webhook delivery attempts. outcome: delivered, retry (failed, tried again "
            "later), dead (failed on the schedule's last attempt), gone (410: endpoint disabled).",
            ["direction", "webhook", "endpoint", "outcome"],
            registry=registry,
        )
        self.delivery_seconds = Histogram(
            "sidecar_webhook_delivery_seconds",
            "Each webhook delivery attempt, from sending the request to its answer.",
            ["direction", "webhook", "endpoint"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.latency_seconds = Histogram(
            "sidecar_webhook_end_to_end_seconds",
            "From the event's durable acceptance to its successful delivery.",
            ["direction", "webhook"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.subscription_events = Counter(
            "sidecar_webhook_subscription_events",
            "Inbound events sent to agents subscribed at /_events/<name> (again after a "
            "reconnect until acknowledged). form: sse or poll.",
            ["webhook", "form"],
            registry=registry,
        )
        self.subscribers = Gauge(
            "sidecar_webhook_subscribers",
            "SSE streams open at /_events/<name>.",
            ["webhook"],
            registry=registry,
        )
        self.queue = QueueGauges()
        registry.register(self.queue)
        self._received: dict[tuple[str, str, str], Counter] = {}
        self._attempts: dict[QueueKey, tuple[Histogram, dict[str, Counter]]] = {}
        self._latency: dict[tuple[str, str], Histogram] = {}

    def receipt(self, direction: str, webhook: str, outcome: str) -> None:
        key = (direction, webhook, outcome)
        child = self._received.get(key)
        if child is None:
            child = self._received[key] = self.received.labels(*key)
        child.inc()

    def attempt(self, key: QueueKey, outcome: str, seconds: float) -> None:
        found = self._attempts.get(key)
        if found is None:
            found = self._attempts[key] = (self.delivery_seconds.labels(*key), {})
        histogram, outcomes = found
        histogram.observe(seconds)
        counter = outcomes.get(outcome)
        if counter is None:
            counter = outcomes[outcome] = self.deliveries.labels(*key, outcome)
        counter.inc()

    def subscription_sent(self, webhook: str, form: str, count: int) -> None:
        self.subscription_events.labels(webhook, form).inc(count)

    def subscription_acked(self, webhook: str, endpoint: str, count: int) -> None:
        self.deliveries.labels("inbound", webhook, endpoint, "delivered").inc(count)

    def subscriber_streams(self, webhook: str, open_streams: int) -> None:
        self.subscribers.labels(webhook).set(open_streams)

    def delivered(self, direction: str, webhook: str, seconds: float) -> None:
        key = (direction, webhook)
        child = self._latency.get(key)
        if child is None:
            child = self._latency[key] = self.latency_seconds.labels(*key)
        child.observe(seconds)
