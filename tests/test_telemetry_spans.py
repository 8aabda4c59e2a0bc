"""The agent requests' spans, field by field: what the batched span records export must
be what the SDK's spans exported (names, kinds, parents, attributes, status, flags,
trace state), and the sampler must decide as the SDK's samplers do."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from sidecar.telemetry.exchange import Telemetry
from sidecar.telemetry.records import (
    KIND_CLIENT,
    KIND_SERVER,
    SCOPE,
    Encoder,
    Ids,
    SpanRecord,
    _attribute,
)
from sidecar.telemetry.tracing import Sampling, resource
from tests.conftest import RunningSidecar, StartSidecar, echo_app

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


def _record(**fields: Any) -> SpanRecord:
    record = SpanRecord(
        fields["name"], fields["kind"], fields["trace_id"], fields["parent_id"],
        fields["remote"], True, fields.get("trace_state"),
    )  # fmt: skip
    record.attributes = dict(fields["attributes"])
    record.error = fields.get("error", False)
    record.end = record.start + 1234
    return record


def _sdk(
    record: SpanRecord, resource: Resource, fixed: dict[str, Any] | None = None
) -> ReadableSpan:
    """The SDK span the same request made before span records; `fixed`: the attributes
    the record holds already encoded."""
    state = record.trace_state
    parent = None
    if record.parent_id:
        parent = SpanContext(record.trace_id, record.parent_id, is_remote=record.remote)
    return ReadableSpan(
        name=record.name,
        context=SpanContext(
            record.trace_id,
            record.span_id,
            is_remote=False,
            trace_flags=TraceFlags(1),
            trace_state=state,
        ),
        parent=parent,
        resource=resource,
        attributes={**(fixed or {}), **record.attributes},
        kind=SpanKind.SERVER if record.kind == KIND_SERVER else SpanKind.CLIENT,
        status=Status(StatusCode.ERROR if record.error else StatusCode.UNSET),
        start_time=record.start,
        end_time=record.end,
        instrumentation_scope=InstrumentationScope(SCOPE),
    )


def test_a_batch_encodes_as_the_sdk_exporter_encodes_the_same_spans() -> None:
    described = resource({"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=test"})
    server = _record(
        name="GET /api",
        kind=KIND_SERVER,
        trace_id=int(TRACE_ID, 16),
        parent_id=int(PARENT_ID, 16),
        remote=True,
        trace_state=TraceState([("vendor", "x1"), ("other", "y")]),
        attributes={
            "http.request.method": "GET",
            "url.path": "/api/v1",
            "server.port": 8080,
            "sidecar.rate_limited": False,
            "sidecar.circuit_open": True,
            "gen_ai.usage.cost": 0.25,
            "negative": -3,
            "tools": ["a", "b"],
        },
    )
    client = _record(
        name="POST",
        kind=KIND_CLIENT,
        trace_id=server.trace_id,
        parent_id=server.span_id,
        remote=False,
        attributes={"http.response.status_code": 503, "error.type": "503"},
        error=True,
    )
    # An attempt's fixed attributes travel encoded (Attempt.encoded), before the others.
    fixed = {"url.scheme": "https", "server.port": 443, "sidecar.service": "api"}
    client.encoded = b"".join(_attribute(k, v) for k, v in fixed.items())
    root = _record(
        name="HTTP", kind=KIND_SERVER, trace_id=7, parent_id=0, remote=False, attributes={}
    )
    encoder = Encoder(described)
    for _ in range(2):  # the second time from the attribute cache
        ours = ExportTraceServiceRequest.FromString(encoder.request([server, client, root]))
        sdk = encode_spans(
            [_sdk(server, described), _sdk(client, described, fixed), _sdk(root, described)]
        )
        assert ours == sdk


@pytest.mark.parametrize("name", ["traceidratio", "parentbased_traceidratio"])
@pytest.mark.parametrize("ratio", ["0", "0.1", "0.5", "1"])
def test_the_ratio_sampler_keeps_the_trace_ids_the_sdks_keeps(name: str, ratio: str) -> None:
    sampling = Sampling({"OTEL_TRACES_SAMPLER": name, "OTEL_TRACES_SAMPLER_ARG": ratio})
    sdk = TraceIdRatioBased(float(ratio))
    assert sampling.parent_based == name.startswith("parentbased")
    # The request path decides a new trace by its id's first low byte against the
    # bound's, and by all 8 on a tie: ids about the bound, and ties, decide as the SDK.
    telemetry = Telemetry(spans=None, sampling=sampling)
    low = sampling.bound
    near = [low - 1, low, low + 1, low & ~0xFF, low | 0xFF << 48, 0, (1 << 64) - 1]
    ids = [random.getrandbits(128) for _ in range(2000)]
    ids += [random.getrandbits(64) << 64 | (n & 0xFFFFFFFFFFFFFFFF) for n in near if n >= 0]
    for trace_id in ids:
        kept = sdk.should_sample(None, trace_id, "x").decision.is_sampled()
        assert ((trace_id & 0xFFFFFFFFFFFFFFFF) < sampling.bound) == kept
        assert telemetry._keeps(trace_id.to_bytes(16, "big"), 8) == kept
    assert sampling.root == 2


def _collector(requests: list[ExportTraceServiceRequest]) -> web.Application:
    async def traces(request: web.Request) -> web.Response:
        requests.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def metrics(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    app.router.add_post("/v1/metrics", metrics)
    return app


def _exported(requests: list[ExportTraceServiceRequest]) -> list[Span]:
    return [s for req in requests for rs in req.resource_spans for ss in rs.scope_spans
            for s in ss.spans]  # fmt: skip


async def _serve(start_sidecar: StartSidecar, api: str, env: dict[str, str]) -> RunningSidecar:
    """The sidecar in front of `api` (service `api`), OTEL_* set as `env` says."""
    return await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{api}'}}\n", env=env)


def _attributes(span: Span) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in span.attributes}


async def test_the_exported_spans_of_a_call_field_by_field(upstream, start_sidecar, client):
    requests: list[ExportTraceServiceRequest] = []
    collector = await upstream(_collector(requests))
    api = await upstream(echo_app())
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector, "OTEL_SERVICE_NAME": "spans-test"}
    sc = await start_sidecar(
        f"version: 1\nservices:\n  api: {{upstream: '{api}/base'}}\n"
        "agents: {header: X-Agent-Id}\n",
        env=env,
    )
    headers = {
        "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01",
        "tracestate": "vendor=x1,other=y",
        "X-Agent-Id": "agent-7",
    }
    async with client.get(f"{sc.url}/api/v1/items?q=1", headers=headers) as r:
        assert r.status == 200
        sent = (await r.json())["headers"]
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)

    [scope_spans] = [ss for req in requests for rs in req.resource_spans for ss in rs.scope_spans]
    assert scope_spans.scope.name == "agent-sidecar"
    spans = {s.kind: s for s in scope_spans.spans}
    server, attempt = spans[Span.SPAN_KIND_SERVER], spans[Span.SPAN_KIND_CLIENT]
    port = int(sc.url.rsplit(":", 1)[1])
    api_port = int(api.rsplit(":", 1)[1])

    assert server.name == "GET /api"
    assert server.trace_id.hex() == TRACE_ID
    assert server.parent_span_id.hex() == PARENT_ID
    assert server.trace_state == "vendor=x1,other=y"
    assert server.flags == 0x300  # has-is-remote, is-remote: the agent's parent
    assert server.status.code == 0  # UNSET
    assert server.HasField("status")
    assert server.end_time_unix_nano >= server.start_time_unix_nano > 0
    assert _attributes(server) == {
        "http.request.method": "GET",
        "url.path": "/api/v1/items",
        "url.scheme": "http",
        "network.protocol.version": "1.1",
        "server.address": "127.0.0.1",
        "server.port": port,
        "http.response.status_code": 200,
        "http.route": "/api",
        "sidecar.service": "api",
        "sidecar.route": "/api",
        "sidecar.upstream.attempts": 1,
        "sidecar.rate_limited": False,
        "sidecar.circuit_open": False,
        "sidecar.agent": "agent-7",
    }

    assert attempt.name == "GET"
    assert attempt.trace_id == server.trace_id
    assert attempt.parent_span_id == server.span_id
    assert attempt.trace_state == "vendor=x1,other=y"
    assert attempt.flags == 0x100  # a local parent
    assert attempt.status.code == 0
    assert server.start_time_unix_nano <= attempt.start_time_unix_nano
    assert attempt.end_time_unix_nano <= server.end_time_unix_nano
    assert _attributes(attempt) == {
        "url.scheme": "http",
        "server.address": "127.0.0.1",
        "server.port": api_port,
        "network.protocol.version": "1.1",
        "sidecar.service": "api",
        "http.request.method": "GET",
        "url.path": "/base/v1/items",
        "sidecar.retry.attempt": 1,
        "http.response.status_code": 200,
    }
    # The upstream continues the trace under the attempt, with the agent's tracestate.
    assert sent["traceparent"] == f"00-{TRACE_ID}-{attempt.span_id.hex()}-01"
    assert sent["tracestate"] == "vendor=x1,other=y"


async def test_a_failed_call_exports_error_status_on_both_spans(
    upstream, start_sidecar, client, closed_port
):
    requests: list[ExportTraceServiceRequest] = []
    collector = await upstream(_collector(requests))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector}
    down = f"http://127.0.0.1:{closed_port}"
    sc = await start_sidecar(f"version: 1\nservices:\n  down: {{upstream: '{down}'}}\n", env=env)
    async with client.post(f"{sc.url}/down/x", data=b"{}") as r:
        assert r.status == 502
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    spans = {s.kind: s for s in _exported(requests)}
    server, attempt = spans[Span.SPAN_KIND_SERVER], spans[Span.SPAN_KIND_CLIENT]
    assert (server.name, server.status.code, server.flags) == ("POST /down", 2, 0x100)
    assert not server.parent_span_id
    assert _attributes(server)["error.type"] == "upstream_unreachable"
    assert _attributes(server)["sidecar.error.reason"] == "upstream_unreachable"
    assert (attempt.name, attempt.status.code) == ("POST", 2)
    assert _attributes(attempt)["error.type"] == "connect-error"
    assert "http.response.status_code" not in _attributes(attempt)


async def test_a_trace_the_sampler_drops_is_continued_and_not_exported(
    upstream, start_sidecar, client
):
    requests: list[ExportTraceServiceRequest] = []
    collector = await upstream(_collector(requests))
    api = await upstream(echo_app())
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_TRACES_SAMPLER": "traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    sc = await _serve(start_sidecar, api, env)
    async with client.get(f"{sc.url}/api/x") as r:
        sent = (await r.json())["headers"]["traceparent"]
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    version, trace_id, span_id, flags = sent.split("-")
    assert (version, flags) == ("00", "00")
    assert int(trace_id, 16) and int(span_id, 16)
    assert not _exported(requests)


def test_tracing_off_makes_no_span_exporter() -> None:
    telemetry = Telemetry.from_env({})
    assert telemetry.spans is None and telemetry.tracer is None


async def test_export_sends_the_configured_headers_gzip_and_retries_a_503(
    upstream, start_sidecar, client
):
    received: list[tuple[dict[str, str], ExportTraceServiceRequest]] = []
    answers = [503]  # the first export is refused once: it must come again

    async def traces(request: web.Request) -> web.Response:
        body = await request.read()
        if answers:
            return web.Response(status=answers.pop())
        # aiohttp has already decompressed what the header says is gzip.
        assert request.headers["Content-Encoding"] == "gzip"
        message = ExportTraceServiceRequest.FromString(body)
        received.append((dict(request.headers), message))
        # Closing after each answer: the next export opens a new connection.
        return web.Response(headers={"Connection": "close"})

    app = web.Application()
    app.router.add_post("/custom/traces", traces)
    collector = await upstream(app)
    api = await upstream(echo_app())
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector}/custom/traces",
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=k1%20k2,x-team=agents",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
    }
    sc = await _serve(start_sidecar, api, env)
    for path in ("a", "b"):
        async with client.get(f"{sc.url}/api/{path}") as r:
            assert r.status == 200
        assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    assert answers == []
    assert len(received) == 2
    for headers, message in received:
        assert headers["x-api-key"] == "k1 k2" and headers["x-team"] == "agents"
        assert headers["Content-Type"] == "application/x-protobuf"
        spans = _exported([message])
        assert sorted(s.kind for s in spans) == [Span.SPAN_KIND_SERVER, Span.SPAN_KIND_CLIENT]
    paths = [
        kv.value.string_value
        for _, m in received
        for rs in m.resource_spans
        for ss in rs.scope_spans
        for s in ss.spans
        for kv in s.attributes
        if kv.key == "url.path" and s.kind == Span.SPAN_KIND_SERVER
    ]
    assert paths == ["/api/a", "/api/b"]


async def test_a_full_queue_drops_spans_and_says_so(upstream, start_sidecar, client, caplog):
    requests: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        requests.append(ExportTraceServiceRequest.FromString(await request.read()))
        if len(requests) == 1:
            await asyncio.sleep(2)  # a slow collector: the queue fills meanwhile
        return web.Response()

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    collector = await upstream(app)
    api = await upstream(echo_app())
    env = {
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector}/v1/traces",
        "OTEL_METRICS_EXPORTER": "none",
        "OTEL_BSP_MAX_QUEUE_SIZE": "3",
    }
    sc = await _serve(start_sidecar, api, env)
    with caplog.at_level("WARNING", logger="sidecar.telemetry"):
        for n in range(5):  # 10 spans for a queue of 3 and a collector that takes 2 s
            async with client.get(f"{sc.url}/api/{n}") as r:
                assert r.status == 200
        assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    spans = _exported(requests)
    dropped = sc.sidecar.telemetry.spans.dropped
    # At most 3 in flight and 3 queued: the rest were dropped, each counted.
    assert len(spans) + dropped == 10
    assert dropped >= 4
    assert "Queue is full" in caplog.text


def test_a_traceparent_keeps_its_leading_zeros_and_says_whether_it_is_sampled() -> None:
    # Made as bytes on every call, sampled or not (records.SpanRecord.traceparent).
    for sampled, flags in ((True, b"01"), (False, b"00")):
        record = SpanRecord("GET", KIND_SERVER, 1, 0, False, sampled, None, span_id=2)
        assert record.traceparent() == b"00-" + b"0" * 31 + b"1-" + b"0" * 15 + b"2-" + flags
    top = SpanRecord("GET", KIND_CLIENT, (1 << 128) - 1, 0, False, True, None, (1 << 64) - 1)
    assert top.traceparent() == b"00-" + b"f" * 32 + b"-" + b"f" * 16 + b"-01"


def test_the_drawn_ids_are_random_nonzero_and_their_hex_is_theirs() -> None:
    # A dropped root span's traceparent is made of the pool's hex: it must be that of the
    # very bytes drawn (the sampler reads those), across refills, and never all zeros.
    ids = Ids()
    seen = set()
    for _ in range(100):
        i = ids.draw()
        raw = ids.raw[24 * i : 24 * i + 24]
        assert ids.hex[48 * i : 48 * i + 48] == raw.hex().encode()
        assert int.from_bytes(raw[:16], "big") and int.from_bytes(raw[16:], "big")
        seen.add(raw)
    assert len(seen) == 100


def test_every_status_and_parent_and_a_large_batch_encode_as_the_sdk_encodes() -> None:
    # The four (error, remote parent) tails, spans above 127 bytes and a batch above
    # 16 KiB (two- and three-byte lengths), names from the encoder's cache.
    described = resource({})
    records = []
    for n in range(400):
        parent_id = random.getrandbits(64) or 1 if n % 3 else 0
        records.append(
            _record(
                name=f"GET /route-{n % 7}",
                kind=KIND_SERVER if n % 2 else KIND_CLIENT,
                trace_id=random.getrandbits(128) or 1,
                parent_id=parent_id,
                remote=parent_id != 0 and n % 4 == 1,
                error=n % 5 == 0,
                attributes={"url.path": "/v1/" + "x" * (n % 300), "server.port": n},
            )
        )
    encoder = Encoder(described)
    ours = ExportTraceServiceRequest.FromString(encoder.request(records))
    assert ours == encode_spans([_sdk(r, described) for r in records])
    assert len(encoder.request(records)) > 1 << 14


def _traceparents(seen: list[list[str]]) -> web.Application:
    """An upstream that keeps every traceparent (and tracestate) field of each call."""

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.getall("traceparent", []))
        seen.append(request.headers.getall("tracestate", []))
        return web.json_response({"kept": request.headers.get("X-Kept")})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_an_unsampled_parent_is_continued_with_the_sampled_flag_off(
    upstream, start_sidecar, client
):
    # Parent-based (the default sampler): the agent's unsampled trace stays unsampled,
    # the upstream continues it (same trace id, flag 00, the agent's tracestate) under an
    # id that is not the agent's own, and nothing is exported.
    requests: list[ExportTraceServiceRequest] = []
    collector = await upstream(_collector(requests))
    seen: list[list[str]] = []
    api = await upstream(_traceparents(seen))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector}
    sc = await _serve(start_sidecar, api, env)
    headers = {
        "traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00",
        "tracestate": "vendor=x1",
        "X-Kept": "yes",
    }
    async with client.get(f"{sc.url}/api/x", headers=headers) as r:
        assert (await r.json())["kept"] == "yes"
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    [parent], state = seen
    version, trace_id, span_id, flags = parent.split("-")
    assert (version, trace_id, flags) == ("00", TRACE_ID, "00")
    assert len(span_id) == 16 and int(span_id, 16) and span_id != PARENT_ID
    assert state == ["vendor=x1"]
    assert not _exported(requests)


@pytest.mark.parametrize("sampler", ["always_on", "always_off"])
async def test_the_traceparent_replaces_the_agents_after_a_step_decoded_the_fields(
    upstream, start_sidecar, client, sampler
):
    # The cache step reads call.headers (decoded): the traceparent then goes into the
    # decoded fields, still once, still the attempt's (sampled) or the dropped trace's.
    requests: list[ExportTraceServiceRequest] = []
    collector = await upstream(_collector(requests))
    seen: list[list[str]] = []
    api = await upstream(_traceparents(seen))
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector, "OTEL_TRACES_SAMPLER": sampler}
    sc = await start_sidecar(
        f"version: 1\nservices:\n  api: {{upstream: '{api}', cache: {{}}}}\n", env=env
    )
    headers = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01", "X-Kept": "yes"}
    async with client.get(f"{sc.url}/api/x", headers=headers) as r:
        assert (await r.json())["kept"] == "yes"
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    [parent], _ = seen
    _, trace_id, span_id, flags = parent.split("-")
    spans = {s.kind: s for s in _exported(requests)}
    if sampler == "always_on":
        # Parent-based on a sampled parent is the default; always_on samples anyway.
        assert (trace_id, flags) == (TRACE_ID, "01")
        assert span_id == spans[Span.SPAN_KIND_CLIENT].span_id.hex()
    else:
        # always_off ignores the agent's sampled flag: dropped, continued with flag 00.
        assert (trace_id, flags) == (TRACE_ID, "00")
        assert span_id != PARENT_ID and not spans


async def test_new_traces_sampled_by_ratio_are_continued_exported_and_logged_by_their_ids(
    upstream, start_sidecar, client, caplog
):
    # New root traces draw their ids from a pool (records.Ids): each call gets its own
    # trace, the sampler keeps those whose low 64 bits fall under the ratio's bound, a
    # kept call's upstream continues under the exported CLIENT span, a dropped one under
    # flag 00, and the access log names the same trace id either way.
    requests: list[ExportTraceServiceRequest] = []
    collector = await upstream(_collector(requests))
    seen: list[list[str]] = []
    api = await upstream(_traceparents(seen))
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0.5",
        "SIDECAR_ACCESS_LOG": "1",
    }
    sc = await _serve(start_sidecar, api, env)
    with caplog.at_level("INFO", logger="sidecar.access"):
        for _ in range(40):
            async with client.get(f"{sc.url}/api/x") as r:
                assert r.status == 200
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    bound = Sampling({"OTEL_TRACES_SAMPLER_ARG": "0.5"}).bound
    parents = [p.split("-") for [p] in seen[0::2]]
    logged = [json.loads(r.getMessage())["trace_id"] for r in caplog.records
              if r.name == "sidecar.access"]  # fmt: skip
    assert [trace_id for _, trace_id, _, _ in parents] == logged
    assert len(set(logged)) == 40
    spans = _exported(requests)
    clients = {s.trace_id.hex(): s for s in spans if s.kind == Span.SPAN_KIND_CLIENT}
    servers = {s.trace_id.hex(): s for s in spans if s.kind == Span.SPAN_KIND_SERVER}
    for version, trace_id, span_id, flags in parents:
        assert version == "00" and len(trace_id) == 32 and len(span_id) == 16
        assert int(trace_id, 16) and int(span_id, 16)
        kept = int(trace_id, 16) & 0xFFFFFFFFFFFFFFFF < bound
        assert flags == ("01" if kept else "00")
        if kept:
            assert clients[trace_id].span_id.hex() == span_id
            assert clients[trace_id].parent_span_id == servers[trace_id].span_id
            assert servers[trace_id].span_id.hex() != span_id
        else:
            assert trace_id not in clients and trace_id not in servers
    assert 0 < len(servers) < 40
