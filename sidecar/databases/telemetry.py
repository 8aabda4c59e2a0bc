"""Metrics and spans of the databases: per database and agent, never a value or a password.

A span per statement carries the statement with its literals replaced by `?`
(values can hold personal data), as the OpenTelemetry database conventions
describe: db.system.name, db.operation.name, db.collection.name, db.namespace.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric as Family
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
# Agent names become label values: past this many, the rest share "_other".
MAX_AGENTS = 200

Operation = tuple[str, str | None, str] | None


class PoolGauges(Collector):
    def __init__(self, source: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> None:
        self.source = source

    def collect(self) -> Iterable[Family]:
        family = GaugeMetricFamily(
            "sidecar_db_pool_connections",
            "Server connections of each database pool by state (in_use, idle, waiting: "
            "agents waiting for one).",
            labels=["database", "state"],
        )
        for name, stats in self.source():
            for state in ("in_use", "idle", "waiting"):
                family.add_metric([name, state], float(stats[state]))
        yield family


# The same logger as the HTTP access log (telemetry/access.py): one JSON line per statement.
access = logging.getLogger("sidecar.access")


class DatabaseTelemetry:
    def __init__(
        self, registry: CollectorRegistry, tracer: Tracer | None, *, access_log: bool = False
    ) -> None:
        self.tracer = tracer
        self.access_log = access_log
        self.queries = Counter(
            "sidecar_db_queries",
            "Statements by outcome (ok, refused, error) and SQLSTATE class.",
            ["database", "agent", "outcome", "sqlstate_class"],
            registry=registry,
        )
        self.duration = Histogram(
            "sidecar_db_query_duration_seconds",
            "Statements from the first message to the end of their result.",
            ["database", "agent"],
            buckets=BUCKETS,
            registry=registry,
        )
        self.rows = Counter(
            "sidecar_db_rows", "Rows returned to agents.", ["database", "agent"], registry=registry
        )
        self.pools = PoolGauges(lambda: ())
        registry.register(self.pools)
        self._agents: set[str] = set()
        # Label children bound once per (database, agent, outcome, class): labels() per
        # statement would hash and lock each time.
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any, Any]] = {}

    def observe(
        self,
        database: str,
        namespace: str,
        agent: str,
        operation: Operation,
        sqlstate: str,
        rows: int,
        seconds: float,
    ) -> None:
        if agent not in self._agents:
            if len(self._agents) >= MAX_AGENTS:
                agent = "_other"
            else:
                self._agents.add(agent)
        klass = sqlstate[:2]
        outcome = "ok" if klass in ("00", "01", "02") else "error"
        if sqlstate in ("42501", "25006", "42601", "53400"):
            outcome = "refused"
        key = (database, agent, outcome, klass)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (
                self.queries.labels(database, agent, outcome, klass),
                self.duration.labels(database, agent),
                self.rows.labels(database, agent),
            )
        children[0].inc()
        if outcome != "refused":
            children[1].observe(seconds)
        if rows:
            children[2].inc(rows)
        if self.tracer is not None:
            self._span(database, namespace, agent, operation, sqlstate, seconds)
        if self.access_log and access.isEnabledFor(logging.INFO):
            name, collection, text = operation or ("", None, "")
            now = time.time() - seconds
            record = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
                + f".{int(now % 1 * 1000):03d}Z",
                "agent": agent,
                "database": database,
                "operation": name or None,
                "collection": collection,
                "statement": text or None,  # literals replaced by ?
                "sqlstate": sqlstate,
                "outcome": outcome,
                "rows": rows,
                "duration_ms": round(seconds * 1000, 3),
            }
            access.info(json.dumps(record, separators=(",", ":")))

    def _span(
        self,
        database: str,
        namespace: str,
        agent: str,
        operation: Operation,
        sqlstate: str,
        seconds: float,
    ) -> None:
        from opentelemetry.trace import SpanKind, Status, StatusCode

        assert self.tracer is not None
        name, collection, text = operation or ("", None, "")
        end = time.time_ns()
        attributes: dict[str, Any] = {
            "db.system.name": "postgresql",
            "db.namespace": namespace,
            "db.response.status_code": sqlstate,
            "sidecar.database": database,
            "sidecar.agent": agent,
        }
        if name:
            attributes["db.operation.name"] = name
        if collection:
            attributes["db.collection.name"] = collection
        if text:
            attributes["db.query.text"] = text
        span = self.tracer.start_span(
            f"{name} {collection}" if name and collection else name or database,
            kind=SpanKind.CLIENT,
            start_time=end - int(seconds * 1e9),
            attributes=attributes,
        )
        if sqlstate[:2] not in ("00", "01", "02"):
            span.set_status(Status(StatusCode.ERROR, sqlstate))
        span.end(end_time=end)
