"""Traces to a real OTLP/HTTP receiver, Prometheus /metrics, the JSON access log."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.telemetry import Telemetry, access
from sidecar.telemetry.metrics import method_label
from sidecar.telemetry.tracing import resource, sampler, traces_endpoint
from tests.conftest import echo_app
from tests.helpers import sidecar_process
from tests.otlp_receiver import Receiver
from tests.steps.llm_upstream import LLMUpstream

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
# Values that must never reach a span, a metric or a log line.
KEY_CANARY = "canary-key-5f1e"
QUERY_CANARY = "canary-query-77"
HEADER_CANARY = "canary-header-99"
CANARIES = (KEY_CANARY, QUERY_CANARY, HEADER_CANARY)


def flaky_app(seen: list[dict[str, str]]) -> web.Application:
    """503 on the first call, then 200; keeps the headers of every call."""

    async def handle(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        if len(seen) == 1:
            return web.Response(status=503, text="warming up")
        return web.json_response({"ok": True, "query": request.query_string})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def policy(api: str, down: str) -> str:
    return f"""
    version: 1
    services:
      api:
        upstream: {api}
        auth: {{type: query, name: api_key, value: "${{env:API_KEY}}"}}
        retry: {{attempts: 2, on: [503], backoff: {{initial: 1ms, max: 1ms}}}}
      down:
        upstream: {down}
        circuit_breaker: {{min_requests: 1, failure_ratio: 1.0, open_for: 60s}}
      limited:
        upstream: {api}
        rate_limit: {{rate: 1/min, burst: 1}}
    """


async def test_spans_reach_a_real_otlp_receiver(upstream, start_sidecar, client, closed_port):
    receiver = Receiver()
    collector = await upstream(receiver.app())
    seen: list[dict[str, str]] = []
    api = await upstream(flaky_app(seen))
    down = f"http://127.0.0.1:{closed_port}"
    env = {"API_KEY": KEY_CANARY, "OTEL_EXPORTER_OTLP_ENDPOINT": collector}
    sc = await start_sidecar(policy(api, down), env=env)

    headers = {
        "traceparent": TRACEPARENT,
        "X-Agent-Id": "agent-7",
        "Authorization": f"Bearer {HEADER_CANARY}",
    }
    async with client.get(f"{sc.url}/api/v1/models?secret={QUERY_CANARY}", headers=headers) as r:
        assert r.status == 200
        assert (await r.json())["ok"] is True
    async with client.get(f"{sc.url}/nowhere/x") as r:
        assert r.status == 404
    async with client.post(f"{sc.url}/down/x", data=b"{}") as r:
        assert r.status == 502
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)

    spans = receiver.spans
    assert set(receiver.content_types) == {"application/x-protobuf"}
    servers = {s.name: s for s in spans if s.kind == "server"}
    assert sorted(servers) == ["GET", "GET /api", "POST /down"]

    server = servers["GET /api"]
    assert (server.trace_id, server.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert server.resource["service.name"] == "agent-sidecar"
    a = server.attributes
    assert a["http.request.method"] == "GET"
    assert a["url.path"] == "/api/v1/models"
    assert a["url.scheme"] == "http"
    assert a["network.protocol.version"] == "1.1"
    assert a["http.response.status_code"] == 200
    assert a["sidecar.service"] == "api"
    assert a["sidecar.route"] == "/api"
    assert a["sidecar.agent"] == "agent-7"
    assert a["sidecar.upstream.attempts"] == 2
    assert a["sidecar.rate_limited"] is False
    assert "error.type" not in a

    clients = sorted(
        (s for s in spans if s.kind == "client" and s.trace_id == TRACE_ID),
        key=lambda s: s.attributes["sidecar.retry.attempt"],
    )
    assert len(clients) == 2
    first, second = clients
    for span in clients:
        assert span.parent_span_id == server.span_id
        assert span.name == "GET"
        assert span.attributes["server.address"] == "127.0.0.1"
        assert span.attributes["server.port"] == int(api.rsplit(":", 1)[1])
        assert span.attributes["url.path"] == "/v1/models"
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["error.type"] == "503"
    assert "http.request.resend_count" not in first.attributes
    assert second.attributes["http.response.status_code"] == 200
    assert second.attributes["http.request.resend_count"] == 1

    # The upstream saw the same trace, each try parented by its own CLIENT span.
    parents = [h["traceparent"].split("-") for h in seen]
    assert [p[1] for p in parents] == [TRACE_ID, TRACE_ID]
    assert [p[2] for p in parents] == [first.span_id, second.span_id]

    unrouted = servers["GET"].attributes
    assert unrouted["sidecar.error.reason"] == "no_route"
    assert unrouted["http.response.status_code"] == 404
    assert "sidecar.service" not in unrouted

    failed = servers["POST /down"]
    assert failed.trace_id != TRACE_ID
    assert failed.attributes["sidecar.error.reason"] == "upstream_unreachable"
    assert failed.attributes["error.type"] == "upstream_unreachable"
    assert failed.attributes["sidecar.breaker.state"] == "open"
    assert failed.status_code == 2  # STATUS_CODE_ERROR
    [attempt] = [s for s in spans if s.kind == "client" and s.trace_id == failed.trace_id]
    assert attempt.parent_span_id == failed.span_id
    assert attempt.attributes["error.type"] == "connect-error"

    # The same endpoint gets the metrics: nothing secret there either.
    assert {p.metric for p in receiver.points} >= {"sidecar_request_duration_seconds"}
    dump = json.dumps([(s.attributes, s.resource) for s in spans])
    dump += json.dumps([(p.metric, p.attributes, p.resource) for p in receiver.points])
    for canary in CANARIES:
        assert canary not in dump
    assert "secret=" not in dump and "api_key" not in dump


async def test_without_an_endpoint_no_spans_and_the_agents_traceparent_passes(
    upstream, start_sidecar, client
):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n", env={})
    assert sc.sidecar.telemetry.tracer is None
    async with client.get(f"{sc.url}/api/x", headers={"traceparent": TRACEPARENT}) as r:
        assert (await r.json())["headers"]["traceparent"] == TRACEPARENT


def _sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


async def test_metrics_count_requests_attempts_refusals_and_reloads(
    upstream, start_sidecar, client, closed_port
):
    api = await upstream(echo_app())
    down = f"http://127.0.0.1:{closed_port}"
    sc = await start_sidecar(policy(api, down), env={"API_KEY": KEY_CANARY})
    for _ in range(2):
        async with client.get(f"{sc.url}/api/x?secret={QUERY_CANARY}") as r:
            assert r.status == 200
    async with client.get(f"{sc.url}/nowhere") as r:
        assert r.status == 404
    for expected in (502, 503):  # the first failure opens the breaker
        async with client.get(f"{sc.url}/down/x") as r:
            assert r.status == expected
    for expected in (200, 429):
        async with client.get(f"{sc.url}/limited/x") as r:
            assert r.status == expected
    sc.write("policy.yaml", "version: 2\n")
    async with client.post(f"{sc.admin}/reload") as r:
        assert r.status == 422

    async with client.get(f"{sc.admin}/metrics") as r:
        assert r.status == 200
        assert r.content_type == "text/plain"
        text = await r.text()
    requests = "sidecar_request_duration_seconds_count"
    assert _sample(text, requests, service="api", method="GET", code="200", reason="") == 2
    assert _sample(text, requests, service="", code="404", reason="no_route") == 1
    assert _sample(text, requests, service="down", code="502", reason="upstream_unreachable") == 1
    assert _sample(text, requests, service="down", code="503", reason="circuit_open") == 1
    assert _sample(text, requests, service="limited", code="429", reason="rate_limited") == 1
    assert _sample(text, "sidecar_request_duration_seconds_bucket", service="api", le="+Inf") == 2
    attempts = "sidecar_upstream_attempt_duration_seconds_count"
    assert _sample(text, attempts, service="api", outcome="200") == 2
    assert _sample(text, attempts, service="down", outcome="connect-error") == 1
    assert _sample(text, attempts, service="down") == 1  # the open breaker made no attempt
    assert _sample(text, "sidecar_rate_limited_total", service="limited") == 1
    assert _sample(text, "sidecar_rate_limited_total", service="api") == 0
    transitions = "sidecar_circuit_breaker_transitions_total"
    assert _sample(text, transitions, service="down", to="open") == 1
    assert _sample(text, "sidecar_reloads_total", result="success") == 1
    assert _sample(text, "sidecar_reloads_total", result="failure") == 1
    assert _sample(text, "sidecar_requests_in_flight") == 0
    assert QUERY_CANARY not in text and KEY_CANARY not in text


def test_methods_outside_the_standard_set_share_one_label():
    # aiohttp's parser refuses most unknown methods before the sidecar sees them;
    # whatever gets through must not mint a series per method.
    assert [method_label(m) for m in ("GET", "PATCH", "BREW", "get")] == [
        "GET",
        "PATCH",
        "_OTHER",
        "_OTHER",
    ]


def _access_lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == access.LOGGER]


async def test_access_log_one_json_line_per_request(
    upstream, start_sidecar, client, caplog, closed_port
):
    api = await upstream(echo_app())
    down = f"http://127.0.0.1:{closed_port}"
    env = {"API_KEY": KEY_CANARY, "SIDECAR_ACCESS_LOG": "1"}
    sc = await start_sidecar(policy(api, down), env=env)
    headers = {
        "X-Agent-Id": "agent-7",
        "traceparent": TRACEPARENT,
        "Authorization": f"Bearer {HEADER_CANARY}",
    }
    with caplog.at_level(logging.INFO, logger=access.LOGGER):
        async with client.get(f"{sc.url}/api/x/y?secret={QUERY_CANARY}", headers=headers) as r:
            body = await r.read()
        async with client.get(f"{sc.url}/nowhere?secret={QUERY_CANARY}") as r:
            assert r.status == 404
    ok, missing = _access_lines(caplog)
    assert ok["agent"] == "agent-7"
    assert ok["method"] == "GET"
    assert ok["service"] == "api"
    assert ok["path"] == "/api/x/y"
    assert ok["status"] == 200
    assert ok["duration_ms"] >= 0
    assert ok["bytes_sent"] > len(body)  # the status line and headers count too
    assert ok["upstream_attempts"] == 1
    assert ok["reason"] is None
    assert ok["trace_id"] == TRACE_ID  # tracing is off: the agent's own trace id
    assert ok["time"].endswith("Z")
    assert missing["status"] == 404
    assert missing["reason"] == "no_route"
    assert missing["service"] is None
    assert missing["upstream_attempts"] == 0
    assert missing["path"] == "/nowhere"
    text = "\n".join(r.getMessage() for r in caplog.records)
    for canary in CANARIES:
        assert canary not in text


async def test_access_log_is_off_by_default(upstream, start_sidecar, client, caplog):
    api = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{api}'}}\n", env={})
    with caplog.at_level(logging.INFO, logger=access.LOGGER):
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 200
    assert _access_lines(caplog) == []


def test_access_log_writer_sends_bare_lines_to_its_stream():
    logger = logging.getLogger(access.LOGGER)
    saved = (logger.handlers[:], logger.propagate, logger.level)
    stream = io.StringIO()
    listener = access.configure(stream)
    try:
        logger.info('{"status":200}')
    finally:
        listener.stop()  # drains the queue
        logger.handlers[:], logger.propagate, logger.level = saved
    assert stream.getvalue() == '{"status":200}\n'


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1/x"}, "http://c:1/x"),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_SDK_DISABLED": "true"},
            None,
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, None),
    ],
)
def test_traces_endpoint_follows_the_otel_variables(env, expected):
    assert traces_endpoint(env) == expected
    assert (Telemetry.from_env(env).tracer is None) == (expected is None)


def test_service_name_and_sampler_come_from_env():
    assert resource({})._attributes["service.name"] == "agent-sidecar"
    assert resource({"OTEL_SERVICE_NAME": "x"}).attributes["service.name"] == "x"
    assert (
        "TraceIdRatioBased{0.25}"
        in sampler(
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
        ).get_description()
    )


async def test_metrics_reach_a_real_otlp_receiver_with_the_same_names_and_labels(
    upstream, start_sidecar, client
):
    receiver = Receiver()
    collector = await upstream(receiver.app())
    api = await upstream(echo_app())
    # Metrics only: a signal-specific endpoint, traces explicitly off.
    env = {
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{collector}/v1/metrics",
        "OTEL_TRACES_EXPORTER": "none",
        "OTEL_SERVICE_NAME": "agent-7-sidecar",
    }
    policy = f"""
    version: 1
    services:
      api: {{upstream: '{api}'}}
      limited:
        upstream: {api}
        rate_limit: {{rate: 1/min, burst: 1}}
    """
    sc = await start_sidecar(policy, env=env)
    assert sc.sidecar.telemetry.tracer is None
    async with client.post(f"{sc.url}/api/x", data=b"{}") as r:
        assert r.status == 200
    for expected in (200, 429):
        async with client.get(f"{sc.url}/limited/x") as r:
            assert r.status == expected
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)

    assert set(receiver.content_types) == {"application/x-protobuf"}
    points = receiver.points
    [request] = [
        p
        for p in points
        if p.metric == "sidecar_request_duration_seconds" and p.attributes["service"] == "api"
    ]
    assert request.kind == "histogram" and request.unit == "s"
    assert request.attributes == {"service": "api", "method": "POST", "code": "200", "reason": ""}
    assert request.value == 1
    assert sum(request.bucket_counts) == 1
    assert len(request.bucket_counts) == len(request.explicit_bounds) + 1
    assert request.resource["service.name"] == "agent-7-sidecar"
    refused = {
        p.attributes["code"]: p.attributes["reason"]
        for p in points
        if p.metric == "sidecar_request_duration_seconds" and p.attributes["service"] == "limited"
    }
    assert refused == {"200": "", "429": "rate_limited"}
    attempts = {
        (p.attributes["service"], p.attributes["outcome"])
        for p in points
        if p.metric == "sidecar_upstream_attempt_duration_seconds"
    }
    assert attempts == {("api", "200"), ("limited", "200")}
    limited = {
        p.attributes["service"]: p.value for p in points if p.metric == "sidecar_rate_limited"
    }
    assert limited["limited"] == 1 and limited["api"] == 0
    [reloads] = [
        p for p in points if p.metric == "sidecar_reloads" and p.attributes == {"result": "success"}
    ]
    assert reloads.kind == "sum" and reloads.value == 1
    [in_flight] = [p for p in points if p.metric == "sidecar_requests_in_flight"]
    assert in_flight.kind == "gauge" and in_flight.value == 0


async def test_llm_tokens_and_cache_counts_reach_the_otlp_receiver(upstream, start_sidecar, client):
    receiver = Receiver()
    collector = await upstream(receiver.app())
    llm = await upstream(LLMUpstream().app())
    env = {"OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{collector}/v1/metrics"}
    policy = f"""
    version: 1
    services:
      oai:
        upstream: {llm}/v1
        llm: {{api: openai}}
        cache: {{methods: [POST]}}
    """
    sc = await start_sidecar(policy, env=env)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(2):  # a miss, then a hit that spends no token
        async with client.post(
            f"{sc.url}/oai/chat/completions", json=body, headers={"X-Agent-Id": "a1"}
        ) as r:
            assert r.status == 200
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)

    tokens = {
        p.attributes["kind"]: p.value
        for p in receiver.points
        if p.metric == "sidecar_llm_tokens" and p.attributes["model"] == "gpt-4o"
    }
    assert tokens == {"input": 12, "output": 5}
    cache = {
        p.attributes["result"]: p.value
        for p in receiver.points
        if p.metric == "sidecar_cache_requests"
    }
    assert cache["hit"] == 1 and cache["miss"] == 1


async def test_metrics_export_is_off_without_an_endpoint_or_with_none(
    upstream, start_sidecar, client
):
    receiver = Receiver()
    collector = await upstream(receiver.app())
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector, "OTEL_METRICS_EXPORTER": "none"}
    off = await start_sidecar("version: 1\nservices: {}\n", env=env)
    assert off.sidecar.telemetry.meter_provider is None
    assert off.sidecar.telemetry.tracer is not None  # only the metrics were turned off
    bare = await start_sidecar("version: 1\nservices: {}\n", env={})
    assert bare.sidecar.telemetry.meter_provider is None


def test_the_otel_metrics_sdk_is_not_imported_unless_metrics_are_exported() -> None:
    probe = (
        "import sys; from sidecar.telemetry import Telemetry; "
        "Telemetry.from_env({env!r}); print('opentelemetry.sdk.metrics' in sys.modules)"
    )
    for env, imported in (
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"}, "False"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "True"),
    ):
        done = subprocess.run(
            [sys.executable, "-c", probe.format(env=env)],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        )
        assert done.stdout.strip() == imported, (env, done.stderr)


async def test_metrics_endpoint_needs_no_traffic(start_sidecar, client):
    sc = await start_sidecar("version: 1\nservices: {}\n", env={})
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    assert "# TYPE sidecar_request_duration_seconds histogram" in text
    assert _sample(text, "sidecar_reloads_total", result="success") == 1


@pytest.mark.process
async def test_the_real_process_logs_json_to_stdout_and_exports_on_shutdown(
    tmp_path, upstream, client
):
    receiver = Receiver()
    collector = await upstream(receiver.app())
    api = await upstream(echo_app())
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(f"version: 1\nservices:\n  api: {{upstream: '{api}'}}\n")
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "SIDECAR_"))
    }
    env |= {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector}/v1/traces"}
    # An hour: the metrics reach the collector only through the export at shutdown.
    env |= {
        "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": f"{collector}/v1/metrics",
        "OTEL_METRIC_EXPORT_INTERVAL": "3600000",
    }
    env |= {"OTEL_SERVICE_NAME": "agent-7-sidecar", "SIDECAR_ACCESS_LOG": "1"}
    async with sidecar_process(policies, env=env) as proc:
        url = f"{proc.url}/api/x?secret={QUERY_CANARY}"
        async with client.get(url, headers={"traceparent": TRACEPARENT}) as r:
            assert r.status == 200
        code = await proc.stop(signal.SIGTERM, limit=30)
    stdout, stderr = "".join(proc.stdout), proc.output
    assert code == 0, stderr
    [line] = [json.loads(text) for text in stdout.splitlines()]
    assert (line["service"], line["path"], line["status"]) == ("api", "/api/x", 200)
    assert line["trace_id"] == TRACE_ID
    assert QUERY_CANARY not in stdout + stderr
    # Shutdown flushed the batch: the span is at the collector without a force_flush.
    [server] = [s for s in receiver.spans if s.kind == "server"]
    assert server.name == "GET /api"
    assert server.trace_id == TRACE_ID
    assert server.resource["service.name"] == "agent-7-sidecar"
    [request] = [
        p
        for p in receiver.points
        if p.metric == "sidecar_request_duration_seconds" and p.attributes["service"] == "api"
    ]
    assert request.value == 1 and request.attributes["code"] == "200"
    assert request.resource["service.name"] == "agent-7-sidecar"


async def test_an_unsampled_trace_is_continued_but_not_exported(upstream, start_sidecar, client):
    receiver = Receiver()
    collector = await upstream(receiver.app())
    api = await upstream(echo_app())
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": collector}
    sc = await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{api}'}}\n", env=env)
    unsampled = f"00-{TRACE_ID}-{PARENT_ID}-00"  # the agent's tracer decided not to sample
    async with client.get(f"{sc.url}/api/x", headers={"traceparent": unsampled}) as r:
        sent = (await r.json())["headers"]["traceparent"]
    async with client.get(f"{sc.url}/api/y") as r:  # a new trace: sampled by default
        assert r.status == 200
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    assert sent.split("-")[1] == TRACE_ID
    assert sent.endswith("-00")
    assert TRACE_ID not in {s.trace_id for s in receiver.spans}
    assert sorted(s.kind for s in receiver.spans) == ["client", "server"]


@pytest.mark.process
async def test_an_attempt_cut_by_timeout_total_says_timeout(tmp_path, upstream, client):
    receiver = Receiver()
    collector = await upstream(receiver.app())

    async def hangs(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    app = web.Application()
    app.router.add_get("/slow", hangs)
    api = await upstream(app)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(
        f"version: 1\nservices:\n  api: {{upstream: '{api}', timeout: {{total: 200ms}}}}\n"
    )
    env = {
        key: value for key, value in os.environ.items() if not key.startswith(("OTEL_", "SIDECAR_"))
    }
    env |= {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{collector}/v1/traces"}
    async with sidecar_process(policies, env=env) as proc:
        async with client.get(f"{proc.url}/api/slow") as r:
            assert r.status == 504
            assert r.headers["X-Sidecar-Error"] == "upstream_timeout"
        assert await proc.stop(signal.SIGTERM, limit=30) == 0
    [attempt] = [s for s in receiver.spans if s.kind == "client"]
    assert attempt.attributes["error.type"] == "timeout"
