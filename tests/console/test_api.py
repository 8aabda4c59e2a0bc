"""GET /api/console through a real sidecar under traffic: the figures agree with /metrics,
the breaker shows open, budgets, dead letters and the recent problems are there, and no
secret, header value or query ever is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sidecar.telemetry.figures import KEEP_SECONDS, SAMPLE_EVERY, Samples
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.pools import PoolSnapshot
from tests.conftest import echo_app
from tests.console.traffic import (
    CANARY_TOKEN,
    RECEIVER_OK,
    TRACEPARENT,
    Gone,
    Sink,
    busy_policy,
    dead_letter,
    drive,
    failing_app,
    scrape,
    total,
)
from tests.steps.llm_upstream import LLMUpstream


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(path))
    return path


async def busy(upstream, start_sidecar, client, alerts: bool = False, gone: Gone | None = None):
    sink = Sink()
    echo = await upstream(echo_app())
    extra = f"""
    alerts:
      evaluate_every: 100ms
      receivers:
        ops: {{format: slack, url: "{echo}/slack"{RECEIVER_OK}}}
      rules:
        - {{name: flaky-breaker, kind: breaker_open, severity: critical, send_to: [ops]}}
    """
    policy = busy_policy(
        echo=echo,
        flaky=await upstream(failing_app()),
        llm=await upstream(LLMUpstream().app()),
        sink=await upstream(sink.app()),
        extra=extra if alerts else "",
        gone=await upstream(gone.app()) if gone is not None else None,
    )
    sc = await start_sidecar(policy, env={"API_TOKEN": CANARY_TOKEN})
    await drive(client, sc.url)
    return sc, sink


async def test_the_console_document_agrees_with_metrics(upstream, start_sidecar, client, data_dir):
    sc, _ = await busy(upstream, start_sidecar, client)
    await dead_letter(client, sc.admin)
    async with client.get(f"{sc.admin}/api/console") as r:
        assert r.status == 200
        doc = await r.json()
    metrics = await scrape(client, sc.admin)
    services = {s["name"]: s for s in doc["services"]}
    assert set(services) == {"api", "limited", "flaky", "llm", None}
    count = "sidecar_request_duration_seconds_count"
    for name, s in services.items():
        assert s["calls"] == total(metrics, count, service=name or "")
        for reason, n in s["refusals"].items():
            assert n == total(metrics, count, service=name or "", reason=reason)
    assert services["api"]["calls"] == 5 and services["api"]["success_rate"] == 1.0
    assert services["limited"]["refusals"] == {"rate_limited": 2}
    assert services["flaky"]["upstream_errors"] == {"500": 4}
    assert services["flaky"]["refusals"] == {"circuit_open": 2}
    assert services["flaky"]["breaker"]["state"] == "open"
    assert services["api"]["breaker"] is None  # no circuit_breaker: block in its policy
    assert services["llm"]["refusals"] == {"budget_exhausted": 1}
    assert services[None]["refusals"] == {"no_route": 1}
    assert services["api"]["p50_ms"] is not None
    assert services["api"]["p50_ms"] <= services["api"]["p99_ms"]

    agents = {a["agent"]: a for a in doc["agents"]}
    assert (agents["alice"]["calls"], agents["alice"]["refusals"]) == (8, 1)
    assert (agents["bob"]["calls"], agents["bob"]["refusals"]) == (10, 4)
    [model] = agents["alice"]["models"]
    assert (model["model"], model["input_tokens"], model["output_tokens"]) == ("gpt-4o", 24, 10)
    [budget] = agents["alice"]["budgets"]
    assert budget["used_percent"] == 170.0 and budget["resets_at"].endswith("T00:00:00Z")

    [endpoint] = doc["webhooks"]["endpoints"]
    assert (endpoint["webhook"], endpoint["endpoint"], endpoint["dead"]) == ("events", "sink", 1)
    assert doc["webhooks"]["dead_letters"][0]["event_type"] == "order.paid"

    problems = doc["problems"]["recent"]
    assert doc["problems"]["total"] == len(problems) == 10
    flaky = [p for p in problems if p["service"] == "flaky"]
    assert {p["reason"] for p in flaky} == {"upstream", "circuit_open"}
    assert all(p["trace_id"] == TRACEPARENT[3:35] and p["agent"] == "bob" for p in flaky)
    assert doc["policy"]["version"] and doc["policy"]["last_reload"]["ok"]
    assert doc["pools"] == [] and doc["alerts"] == []

    text = json.dumps(doc)
    assert CANARY_TOKEN not in text  # not the policy's token, the agent's, or the query's
    assert "/api/items" not in text and "Bearer" not in text


async def test_a_failed_reload_shows_its_file_line_and_column(
    upstream, start_sidecar, client, data_dir
):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n")
    sc.write("policy.yaml", f"version: 1\nservices:\n  api: {{upstream: '{base}', tiemout: 1}}\n")
    assert not (await sc.sidecar.reload("test")).ok
    async with client.get(f"{sc.admin}/api/console") as r:
        policy = (await r.json())["policy"]
    assert policy["reloads"] == {"succeeded": 1, "failed": 1}
    [error] = policy["last_reload"]["errors"]
    assert error.startswith(f"{sc.policies / 'policy.yaml'}:3:")
    assert "tiemout" in error


async def test_a_connector_pool_shows_once_registered(upstream, start_sidecar, client, data_dir):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n")
    pools = sc.sidecar.telemetry.pools
    unregister = pools.register(lambda: [PoolSnapshot("postgres", "orders", 10, 10, 10, 3)])
    async with client.get(f"{sc.admin}/api/console") as r:
        [pool] = (await r.json())["pools"]
    assert pool == {
        "kind": "postgres",
        "name": "orders",
        "size": 10,
        "in_use": 10,
        "idle": 0,
        "max": 10,
        "waiting": 3,
        "saturation": 1.0,
    }
    unregister()
    async with client.get(f"{sc.admin}/api/console") as r:
        assert (await r.json())["pools"] == []


def test_the_sample_ring_keeps_thirty_minutes_and_no_more() -> None:
    now = [1000.0]
    samples = Samples(Metrics(), clock=lambda: now[0])
    for _ in range(500):
        samples.take()
        now[0] += SAMPLE_EVERY
    assert len(samples.ring) == KEEP_SECONDS / SAMPLE_EVERY == 180
    assert samples.ring[-1][0] - samples.ring[0][0] == KEEP_SECONDS - SAMPLE_EVERY
    assert len(samples.series("api")["calls"]) == 179


async def test_a_cache_hit_ratio_and_an_upstream_pause_show(
    upstream, start_sidecar, client, data_dir
):
    from aiohttp import web

    async def cacheable(request: web.Request) -> web.Response:
        return web.Response(text="same", headers={"Cache-Control": "max-age=60"})

    async def busy_upstream(request: web.Request) -> web.Response:
        return web.Response(status=429, headers={"Retry-After": "120"})

    app = web.Application()
    app.router.add_get("/cached/{tail:.*}", cacheable)
    app.router.add_get("/quiet/{tail:.*}", busy_upstream)
    base = await upstream(app)
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          docs: {{upstream: '{base}/cached', cache: {{}}}}
          quiet: {{upstream: '{base}/quiet'}}
        """
    )
    for _ in range(4):
        async with client.get(f"{sc.url}/docs/page") as r:
            assert r.status == 200
    async with client.get(f"{sc.url}/quiet/x") as r:
        assert r.status == 429 and "X-Sidecar-Error" not in r.headers  # the upstream's own
    async with client.get(f"{sc.url}/quiet/x") as r:
        assert r.headers["X-Sidecar-Error"] == "rate_limited"  # the sidecar holds the pause
    async with client.get(f"{sc.admin}/api/console") as r:
        services = {s["name"]: s for s in (await r.json())["services"]}
    assert services["docs"]["cache"] == {"hits": 3, "lookups": 4, "hit_ratio": 0.75}
    assert services["quiet"]["cache"] is None
    paused = services["quiet"]["paused"]
    assert paused["reason"] == "rate_limited" and 100 < paused["seconds_left"] <= 120
    assert services["quiet"]["upstream_errors"] == {"429": 1}
    assert services["quiet"]["refusals"] == {"rate_limited": 1}
    assert services["docs"]["paused"] is None
