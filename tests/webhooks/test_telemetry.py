"""Metrics on the admin port and spans at a real OTLP receiver for every webhook
receipt and delivery attempt, through a real sidecar with its ingress listener;
no secret and no body in any of them, nor in the log."""

from __future__ import annotations

import asyncio
import json
import logging
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from sidecar.app import serve
from sidecar.runtime import Sidecar
from tests.helpers import eventually
from tests.otlp_receiver import Receiver as Collector

from .conftest import Receiver, github_headers

SECRET = "gh-secret-canary-5d1c"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
BODY_CANARY = "body-canary-77e0"
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


@dataclass
class Running:
    sidecar: Sidecar
    url: str
    admin: str
    ingress: str


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Sidecar, list[web.BaseRunner]]] = []

    async def run(policy: str, env: dict[str, str] | None = None) -> Running:
        policies = tmp_path / f"policies{len(made)}"
        policies.mkdir()
        (policies / "policy.yaml").write_text(textwrap.dedent(policy))
        sidecar = Sidecar(str(policies), env=env or {}, data_dir=str(tmp_path / "data"))
        assert (await sidecar.reload("startup")).ok
        runners = await serve(
            sidecar,
            listen=("127.0.0.1", 0),
            admin=("127.0.0.1", 0),
            ingress=("127.0.0.1", 0),
        )
        made.append((sidecar, runners))
        url, admin, ingress = (f"http://127.0.0.1:{r.addresses[0][1]}" for r in runners)
        return Running(sidecar, url, admin, ingress)

    yield run
    for sidecar, runners in made:
        for runner in runners:
            await runner.cleanup()
        await sidecar.close()


def policy(ok: str, failing: str) -> str:
    return f"""
        version: 1
        webhooks:
          inbound:
            github:
              path: /hooks/github
              verify: {{type: github, secrets: ["{SECRET}"]}}
              retry: {{schedule: [0s, 10ms, 1h], jitter: 0}}
              routes:
                - deliver_to: ["{ok}/events"]
          outbound:
            events:
              signing: {{secrets: ["{WHSEC}"]}}
              retry: {{schedule: [0s, 1h], jitter: 0}}
              endpoints:
                - {{name: billing, url: "{failing}/hook?token=url-canary", allow_private: true}}
        """


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


async def test_receipts_and_attempts_are_counted_on_the_admin_metrics(
    start, receiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    ok: Receiver = await receiver((500, {}), (200, {}))
    failing: Receiver = await receiver((503, {}))
    sc = await start(policy(ok.url, failing.url))
    body = json.dumps({"action": "opened", "note": BODY_CANARY}).encode()
    async with aiohttp.ClientSession() as client:
        for _ in range(2):  # the second is GitHub redelivering: a duplicate
            async with client.post(
                f"{sc.ingress}/hooks/github", data=body, headers=github_headers(body, SECRET, "d-1")
            ) as r:
                assert r.status == 200
        wrong = github_headers(body, "not-the-secret", "d-2")
        async with client.post(f"{sc.ingress}/hooks/github", data=body, headers=wrong) as r:
            assert r.status == 401
        async with client.post(f"{sc.ingress}/hooks/gitlab", data=body) as r:
            assert r.status == 404
        async with client.post(
            f"{sc.url}/_webhooks/events", json={"type": "invoice.paid", "note": BODY_CANARY}
        ) as r:
            assert r.status == 202
        await eventually(lambda: len(ok.received) == 2, "the inbound event delivered on try 2")
        await eventually(lambda: len(failing.received) == 1, "the outbound event tried once")

        async def scrape() -> str:
            async with client.get(f"{sc.admin}/metrics") as r:
                return await r.text()

        async def settled() -> bool:
            found = samples(await scrape())
            key = (
                "sidecar_webhook_deliveries_total",
                labels(direction="outbound", webhook="events", endpoint="billing", outcome="retry"),
            )
            return found.get(key) == 1

        await eventually(settled, "the outbound attempt recorded")
        text = await scrape()
    found = samples(text)

    def received(direction: str, webhook: str, outcome: str) -> float | None:
        key = labels(direction=direction, webhook=webhook, outcome=outcome)
        return found.get(("sidecar_webhook_received_total", key))

    assert received("inbound", "github", "accepted") == 1
    assert received("inbound", "github", "duplicate") == 1
    assert received("inbound", "github", "bad_signature") == 1
    assert received("inbound", "", "no_route") == 1
    assert received("outbound", "events", "accepted") == 1

    target = labels(direction="inbound", webhook="github", endpoint=f"{ok.url}/events")
    for outcome in ("retry", "delivered"):
        key = ("sidecar_webhook_deliveries_total", target | labels(outcome=outcome))
        assert found[key] == 1
    assert found[("sidecar_webhook_delivery_seconds_count", target)] == 2
    e2e = labels(direction="inbound", webhook="github")
    assert found[("sidecar_webhook_end_to_end_seconds_count", e2e)] == 1
    # The failed outbound delivery waits an hour for its retry: it is the queue.
    billing = labels(direction="outbound", webhook="events", endpoint="billing")
    assert found[("sidecar_webhook_queue_depth", billing)] == 1
    assert found[("sidecar_webhook_oldest_pending_seconds", billing)] >= 0
    assert ("sidecar_webhook_queue_depth", target) not in found

    logged = "\n".join(r.getMessage() for r in caplog.records)
    for canary in (SECRET, WHSEC, BODY_CANARY, "url-canary"):
        assert canary not in text
        assert canary not in logged


async def test_a_span_per_receipt_and_attempt_in_one_trace(upstream, receiver, start) -> None:
    collector = Collector()
    endpoint = await upstream(collector.app())
    ok: Receiver = await receiver((500, {}), (200, {}))
    failing: Receiver = await receiver((503, {}))
    sc = await start(policy(ok.url, failing.url), {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint})
    body = json.dumps({"note": BODY_CANARY}).encode()
    headers = {**github_headers(body, SECRET, "d-1"), "traceparent": TRACEPARENT}
    async with aiohttp.ClientSession() as client:
        async with client.post(f"{sc.ingress}/hooks/github", data=body, headers=headers) as r:
            assert r.status == 200
            message_id = (await r.json())["id"]
        async with client.post(
            f"{sc.url}/_webhooks/events",
            json={"type": "invoice.paid", "note": BODY_CANARY},
            headers={"traceparent": f"00-{'ab' * 16}-{'cd' * 8}-01"},
        ) as r:
            assert r.status == 202
            published = (await r.json())["id"]
    await eventually(lambda: len(ok.received) == 2, "the inbound event delivered on try 2")
    await eventually(lambda: len(failing.received) == 1, "the outbound event tried once")

    async def exported() -> bool:
        # An attempt's span ends once its outcome is stored, just after the answer.
        assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
        return sum(s.name.startswith("webhook deliver") for s in collector.spans) == 3

    await eventually(exported, "three attempt spans exported")
    spans = collector.spans

    [receipt] = [s for s in spans if s.name == "webhook receive github"]
    assert receipt.kind == "server"
    assert (receipt.trace_id, receipt.parent_span_id) == (TRACE_ID, PARENT_ID)
    assert receipt.attributes["sidecar.webhook.message_id"] == message_id
    assert receipt.attributes["sidecar.webhook.outcome"] == "accepted"
    assert receipt.attributes["http.response.status_code"] == 200

    attempts = sorted(
        (s for s in spans if s.name == "webhook deliver github"),
        key=lambda s: s.attributes["sidecar.webhook.attempt"],
    )
    assert [a.kind for a in attempts] == ["client", "client"]
    for span in attempts:
        assert (span.trace_id, span.parent_span_id) == (TRACE_ID, receipt.span_id)
        assert span.attributes["sidecar.webhook.message_id"] == message_id
    assert [a.attributes["http.response.status_code"] for a in attempts] == [500, 200]
    assert [a.attributes["sidecar.webhook.outcome"] for a in attempts] == ["retry", "delivered"]
    assert attempts[0].status_code == 2  # ERROR
    # The target continues the trace, each try parented by its own attempt span.
    sent = [h.split("-") for h in ok.header("traceparent")]
    assert [(p[1], p[2]) for p in sent] == [(TRACE_ID, a.span_id) for a in attempts]

    [publish] = [s for s in spans if s.name == "webhook publish events"]
    assert publish.kind == "producer"
    assert (publish.trace_id, publish.parent_span_id) == ("ab" * 16, "cd" * 8)
    assert publish.attributes["sidecar.webhook.message_id"] == published
    [out] = [s for s in spans if s.name == "webhook deliver events"]
    assert (out.trace_id, out.parent_span_id) == ("ab" * 16, publish.span_id)
    assert out.attributes["sidecar.webhook.endpoint"] == "billing"
    assert out.attributes["error.type"] == "503"

    dump = json.dumps([(s.name, s.attributes, s.resource) for s in spans])
    for canary in (SECRET, WHSEC, BODY_CANARY, "url-canary", "/hook"):
        assert canary not in dump
