"""OTLP export of the /metrics instruments; imported only when it is on.

The request path records every observation once, into the prometheus_client
metrics (metrics.py), whether or not OTLP export is on. At each export
interval the reader's thread reads them and sends the same instruments, with
the same names and labels, over OTLP/HTTP: counters and the in-flight gauge as
observable instruments of a MeterProvider, the two histograms (OTel has no
observable histogram) as explicit-bucket histogram points added to the same
export. So turning export on adds nothing per request, and /metrics and the
OTLP backend never disagree. Interval: `OTEL_METRIC_EXPORT_INTERVAL`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from time import time_ns
from typing import Any

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    AggregationTemporality,
    Histogram,
    HistogramDataPoint,
    Metric,
    MetricsData,
    PeriodicExportingMetricReader,
    ResourceMetrics,
    ScopeMetrics,
)
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector

from .metrics import Metrics
from .tracing import exporter_options, resource, signal_endpoint

log = logging.getLogger("sidecar.telemetry")

CUMULATIVE = AggregationTemporality.CUMULATIVE
# The OTel SDK's defaults for OTEL_METRIC_EXPORT_INTERVAL / _TIMEOUT, in milliseconds.
DEFAULT_INTERVAL_MS = 60_000.0
DEFAULT_TIMEOUT_MS = 30_000.0

ObservationCallback = Callable[[CallbackOptions], Iterable[Observation]]


def _milliseconds(env: Mapping[str, str], name: str, default: float) -> float:
    text = env.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value > 0:
        return value
    log.warning("%s=%r is not a positive number of milliseconds; using %g", name, text, default)
    return default


class HistogramReader(PeriodicExportingMetricReader):
    """Adds the Prometheus histograms' current buckets to every collection it exports."""

    def __init__(
        self,
        exporter: OTLPMetricExporter,
        *,
        histograms: tuple[PromHistogram, ...],
        interval_ms: float,
        timeout_ms: float,
    ) -> None:
        self._histograms = histograms
        # Every series counts from the metrics' creation: one start time for all.
        self._start = time_ns()
        super().__init__(
            exporter, export_interval_millis=interval_ms, export_timeout_millis=timeout_ms
        )

    def _receive_metrics(
        self, metrics_data: MetricsData, timeout_millis: float = 10_000, **kwargs: Any
    ) -> None:
        now = time_ns()
        # Called on every collection: the counters always have points (reloads is bound
        # from the start), so the SDK never skips an export for lack of data.
        added = [
            _metric(family, self._start, now)
            for histogram in self._histograms
            for family in histogram.collect()
        ]
        resources = [
            ResourceMetrics(
                resource=r.resource,
                scope_metrics=[
                    ScopeMetrics(
                        scope=s.scope, metrics=[*s.metrics, *added], schema_url=s.schema_url
                    )
                    for s in r.scope_metrics
                ],
                schema_url=r.schema_url,
            )
            for r in metrics_data.resource_metrics
        ]
        super()._receive_metrics(
            MetricsData(resource_metrics=resources), timeout_millis=timeout_millis, **kwargs
        )


def _observable(metric: PromCounter | PromGauge) -> tuple[str, str, ObservationCallback]:
    """Name, description and a callback reporting a Prometheus metric's current values."""
    [family] = metric.collect()
    sample = family.name + "_total" if family.type == "counter" else family.name

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for current in metric.collect():
            for s in current.samples:
                if s.name == sample:
                    yield Observation(s.value, dict(s.labels))

    return family.name, family.documentation, callback


def _observable_family(collector: Collector, name: str) -> tuple[str, str, ObservationCallback]:
    """Like _observable, for one gauge family of a custom collector."""
    documentation = next(f.documentation for f in collector.collect() if f.name == name)

    def callback(options: CallbackOptions) -> Iterable[Observation]:
        for family in collector.collect():
            if family.name == name:
                for s in family.samples:
                    yield Observation(s.value, dict(s.labels))

    return name, documentation, callback


def _metric(family: Family, start: int, now: int) -> Metric:
    data = Histogram(
        data_points=_histograms(family, start, now), aggregation_temporality=CUMULATIVE
    )
    return Metric(name=family.name, description=family.documentation, unit="s", data=data)


def _histograms(family: Family, start: int, now: int) -> list[HistogramDataPoint]:
    # One label set's samples: its _bucket series (cumulative, in `le` order), _count, _sum.
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for s in family.samples:
        labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        entry = series.setdefault(labels, {"le": [], "count": 0.0, "sum": 0.0})
        if s.name.endswith("_bucket"):
            entry["le"].append((float(s.labels["le"]), s.value))
        elif s.name.endswith("_count"):
            entry["count"] = s.value
        elif s.name.endswith("_sum"):
            entry["sum"] = s.value
    return [
        HistogramDataPoint(
            attributes=dict(labels),
            start_time_unix_nano=start,
            time_unix_nano=now,
            count=int(entry["count"]),
            sum=entry["sum"],
            bucket_counts=_per_bucket(v for _, v in entry["le"]),
            explicit_bounds=[le for le, _ in entry["le"] if le != float("inf")],
            # Prometheus keeps no min or max: left unset in OTLP.
            min=None,  # type: ignore[arg-type]
            max=None,  # type: ignore[arg-type]
        )
        for labels, entry in series.items()
    ]


def _per_bucket(cumulative: Iterable[float]) -> list[int]:
    counts, below = [], 0.0
    for total in cumulative:
        counts.append(int(total - below))
        below = total
    return counts


def meter_provider(env: Mapping[str, str], metrics: Metrics) -> MeterProvider | None:
    """A provider exporting `metrics` to the configured endpoint; None when export is off."""
    endpoint = signal_endpoint(env, "metrics")
    if endpoint is None:
        return None
    exporter = OTLPMetricExporter(endpoint=endpoint, **exporter_options(env, "metrics"))
    reader = HistogramReader(
        exporter,
        histograms=(
            metrics.request_duration,
            metrics.attempt_duration,
            metrics.webhooks.delivery_seconds,
            metrics.webhooks.latency_seconds,
        ),
        interval_ms=_milliseconds(env, "OTEL_METRIC_EXPORT_INTERVAL", DEFAULT_INTERVAL_MS),
        timeout_ms=_milliseconds(env, "OTEL_METRIC_EXPORT_TIMEOUT", DEFAULT_TIMEOUT_MS),
    )
    # Telemetry.close shuts it down (a last export): no second shutdown at exit.
    provider = MeterProvider(
        metric_readers=[reader], resource=resource(env), shutdown_on_exit=False
    )
    meter = provider.get_meter("agent-sidecar")
    counters = (
        metrics.rate_limited,
        metrics.breaker_transitions,
        metrics.reloads,
        metrics.openapi_violations,
        metrics.openapi_drift,
        metrics.faults_injected,
        metrics.cache_requests,
        metrics.llm_tokens,
        metrics.llm_budget_spent,
        metrics.llm_budget_exhausted,
        metrics.webhooks.received,
        metrics.webhooks.deliveries,
    )
    for counter in counters:
        name, description, callback = _observable(counter)
        meter.create_observable_counter(name, callbacks=[callback], description=description)
    name, description, callback = _observable(metrics.in_flight)
    meter.create_observable_gauge(name, callbacks=[callback], description=description)
    for collector in (metrics.webhooks.queue, metrics.faults):
        for family in collector.collect():
            name, description, callback = _observable_family(collector, family.name)
            meter.create_observable_gauge(name, callbacks=[callback], description=description)
    # The endpoint only: OTLP headers often carry an API key.
    log.info("metrics export on: OTLP/HTTP to %s", endpoint.partition("?")[0])
    return provider
