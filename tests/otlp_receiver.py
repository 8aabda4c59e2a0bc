"""A real OTLP/HTTP receiver for tests: POST /v1/traces and /v1/metrics, protobuf in.

It decodes exactly what a collector would get (ExportTraceServiceRequest,
ExportMetricsServiceRequest) and flattens it into `ReceivedSpan`s and
`ReceivedPoint`s with plain Python attribute values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

KINDS = {
    Span.SPAN_KIND_SERVER: "server",
    Span.SPAN_KIND_CLIENT: "client",
    Span.SPAN_KIND_PRODUCER: "producer",
}


def _value(v: AnyValue) -> Any:
    which = v.WhichOneof("value")
    if which == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, which) if which else None


@dataclass
class ReceivedSpan:
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int
    resource: dict[str, Any]


@dataclass
class ReceivedPoint:
    """One data point; `value` is a sum's or gauge's value, a histogram's count."""

    metric: str
    kind: str  # "sum", "gauge" or "histogram"
    unit: str
    description: str
    attributes: dict[str, Any]
    value: float
    bucket_counts: list[int]
    explicit_bounds: list[float]
    resource: dict[str, Any]


@dataclass
class Receiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/traces", self._traces)
        app.router.add_post("/v1/metrics", self._metrics)
        return app

    async def _metrics(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        message = ExportMetricsServiceRequest()
        message.ParseFromString(await request.read())
        for resource_metrics in message.resource_metrics:
            resource = {a.key: _value(a.value) for a in resource_metrics.resource.attributes}
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    kind = metric.WhichOneof("data")
                    for point in getattr(metric, kind).data_points:
                        histogram = kind == "histogram"
                        self.points.append(
                            ReceivedPoint(
                                metric=metric.name,
                                kind=kind,
                                unit=metric.unit,
                                description=metric.description,
                                attributes={a.key: _value(a.value) for a in point.attributes},
                                value=point.count
                                if histogram
                                else getattr(point, point.WhichOneof("value")),
                                bucket_counts=list(point.bucket_counts) if histogram else [],
                                explicit_bounds=list(point.explicit_bounds) if histogram else [],
                                resource=resource,
                            )
                        )
        return web.Response(
            body=ExportMetricsServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def _traces(self, request: web.Request) -> web.Response:
        self.content_types.append(request.content_type)
        message = ExportTraceServiceRequest()
        message.ParseFromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=span.name,
                            kind=KINDS.get(span.kind, str(span.kind)),
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            status_code=span.status.code,
                            resource=resource,
                        )
                    )
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )
