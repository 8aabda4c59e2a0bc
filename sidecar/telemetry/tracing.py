"""The tracer, and the OTLP settings both exporters share, from the standard OTEL_* variables.

Tracing is on when an OTLP endpoint is configured (OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
or OTEL_EXPORTER_OTLP_ENDPOINT) and neither OTEL_SDK_DISABLED nor
OTEL_TRACES_EXPORTER=none turns it off. Spans go out over OTLP/HTTP (protobuf)
through a BatchSpanProcessor: its worker thread does the export, so a slow or
absent collector never holds up a call.

The variables are read from an explicit mapping (os.environ by default), so a
test can point one sidecar at its own receiver without touching the process.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

if TYPE_CHECKING:
    # The SDK is imported only when tracing or OTLP metrics are on: several
    # megabytes of memory that a sidecar without an exporter never uses.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import Sampler

    from .spans import SpanExporter

log = logging.getLogger("sidecar.telemetry")

DEFAULT_SERVICE_NAME = "agent-sidecar"


def _true(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def signal_endpoint(env: Mapping[str, str], signal: str) -> str | None:
    """Where one signal ("traces", "metrics") goes, per the OTLP exporter spec; None: off."""
    if _true(env.get("OTEL_SDK_DISABLED")):
        return None
    upper = signal.upper()
    chosen = env.get(f"OTEL_{upper}_EXPORTER", "otlp").lower().split(",")
    exporters = {e.strip() for e in chosen}
    if "none" in exporters or "otlp" not in exporters:
        return None
    specific = env.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
    if specific:
        return specific  # used as is: the signal-specific URL is complete
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if base:
        return base.rstrip("/") + f"/v1/{signal}"
    return None


def traces_endpoint(env: Mapping[str, str]) -> str | None:
    return signal_endpoint(env, "traces")


SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _sampler_setting(env: Mapping[str, str]) -> tuple[str, float]:
    """OTEL_TRACES_SAMPLER (one of SAMPLERS) and its ratio."""
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    arg = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    try:
        ratio = float(arg) if arg else 1.0
    except ValueError:
        log.warning("OTEL_TRACES_SAMPLER_ARG=%r is not a number; using 1.0", arg)
        ratio = 1.0
    if name not in SAMPLERS:
        log.warning("OTEL_TRACES_SAMPLER=%r is not supported; using parentbased_always_on", name)
        name = "parentbased_always_on"
    return name, min(1.0, max(0.0, ratio))


class Sampling:
    """The sampler's decision as the request path takes it: a few fields, no call.

    The same decisions as the SDK's samplers of the same name: a parent-based one
    follows a valid parent's sampled flag; otherwise always on, always off, or the
    trace id's low 64 bits below the ratio's bound (TraceIdRatioBased).
    """

    def __init__(self, env: Mapping[str, str]) -> None:
        from opentelemetry.sdk.trace.sampling import TraceIdRatioBased

        name, ratio = _sampler_setting(env)
        self.parent_based = name.startswith("parentbased_")
        root = name.removeprefix("parentbased_")
        # 0: never, 1: always, 2: by trace id.
        self.root = {"always_off": 0, "always_on": 1}.get(root, 2)
        self.bound = TraceIdRatioBased.get_bound_for_rate(ratio)


def sampler(env: Mapping[str, str]) -> Sampler:
    from opentelemetry.sdk.trace.sampling import (
        ALWAYS_OFF,
        ALWAYS_ON,
        ParentBased,
        TraceIdRatioBased,
    )

    name, ratio = _sampler_setting(env)
    choices: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    return choices[name]


def _pairs(text: str) -> dict[str, str]:
    # The W3C-baggage-like "k1=v1,k2=v2" form of OTEL_RESOURCE_ATTRIBUTES and *_HEADERS.
    out: dict[str, str] = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            out[unquote(key.strip())] = unquote(value.strip())
    return out


def resource(env: Mapping[str, str]) -> Resource:
    from opentelemetry.sdk.resources import Resource

    attributes: dict[str, str] = _pairs(env.get("OTEL_RESOURCE_ATTRIBUTES", ""))
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name or "service.name" not in attributes:
        attributes["service.name"] = name or DEFAULT_SERVICE_NAME
    return Resource.create(attributes)


def exporter_options(env: Mapping[str, str], signal: str) -> dict[str, Any]:
    """The OTLP/HTTP exporter's headers, timeout and compression for one signal."""
    from opentelemetry.exporter.otlp.proto.http import Compression

    upper = signal.upper()

    def setting(name: str) -> str:
        return env.get(
            f"OTEL_EXPORTER_OTLP_{upper}_{name}", env.get(f"OTEL_EXPORTER_OTLP_{name}", "")
        ).strip()

    protocol = setting("PROTOCOL")
    if protocol and protocol != "http/protobuf":
        log.warning("OTLP protocol %r is not supported; sending http/protobuf", protocol)
    headers = _pairs(env.get("OTEL_EXPORTER_OTLP_HEADERS", ""))
    headers.update(_pairs(env.get(f"OTEL_EXPORTER_OTLP_{upper}_HEADERS", "")))
    timeout_text = setting("TIMEOUT")
    try:
        # The spec says milliseconds; the Python exporter takes seconds.
        timeout = float(timeout_text) / 1000 if timeout_text else 10.0
    except ValueError:
        timeout = 10.0
    gzip = setting("COMPRESSION") == "gzip"
    return {
        "headers": headers,
        "timeout": timeout,
        "compression": Compression.Gzip if gzip else Compression.NoCompression,
    }


def tracing(env: Mapping[str, str]) -> tuple[TracerProvider, SpanExporter, Sampling] | None:
    """What tracing on needs, or None when it is off.

    The agent requests' spans go through the SpanExporter (records, batched); the
    provider's tracer serves the rest (webhook deliveries), both to the same endpoint.
    """
    endpoint = traces_endpoint(env)
    if endpoint is None:
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    from .spans import SpanExporter

    options = exporter_options(env, "traces")
    described = resource(env)
    provider = TracerProvider(resource=described, sampler=sampler(env))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, **options)))
    spans = SpanExporter(endpoint=endpoint, options=options, resource=described, env=env)
    # The endpoint only: OTLP headers often carry an API key.
    log.info("tracing on: OTLP/HTTP to %s", endpoint.partition("?")[0])
    return provider, spans, Sampling(env)
