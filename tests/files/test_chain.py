"""A files service goes through the same chain as any service: verified identity, allow
rules, rate limits, metrics, spans and the access log."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging

from sidecar.telemetry import access
from tests.files.helpers import CANARY, refused
from tests.otlp_receiver import Receiver
from tests.test_telemetry import _sample


async def test_allow_rules_on_methods_and_paths(start_sidecar, client, root):
    (root / "drafts").mkdir()
    (root / "public.txt").write_text("hello")
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          docs:
            files: {{root: "{root}"}}
            allow:
              - {{agents: [reader, writer], methods: [GET, HEAD]}}
              - {{agents: [writer], methods: [PUT, DELETE], paths: ["/drafts/**"]}}
        """
    )
    reader, writer = {"X-Agent-Id": "reader"}, {"X-Agent-Id": "writer"}
    async with client.get(f"{sc.url}/docs/public.txt", headers=reader) as r:
        assert await r.text() == "hello"
    async with client.put(f"{sc.url}/docs/drafts/a.txt", data=b"x", headers=reader) as r:
        await refused(r, 403, "forbidden", root)
    async with client.put(f"{sc.url}/docs/public.txt", data=b"x", headers=writer) as r:
        await refused(r, 403, "forbidden", root)
    async with client.put(f"{sc.url}/docs/drafts/a.txt", data=b"x", headers=writer) as r:
        assert r.status == 201
    async with client.get(f"{sc.url}/docs/public.txt") as r:
        await refused(r, 403, "forbidden", root)
    assert (root / "public.txt").read_text() == "hello"


async def test_verified_identity_names_the_agents_directory(start_sidecar, client, root):
    key = "agent-key-for-alice"
    digest = hashlib.sha256(key.encode()).hexdigest()
    sc = await start_sidecar(
        f"""
        version: 1
        agents:
          keys: {{alice: "sha256:{digest}"}}
        services:
          docs:
            files: {{root: "{root}", per_agent: true}}
        """
    )
    # The self-declared name counts for nothing once identity is verified.
    headers = {"X-Agent-Token": key, "X-Agent-Id": "bob"}
    async with client.put(f"{sc.url}/docs/n.txt", data=b"by alice", headers=headers) as r:
        assert r.status == 201
    assert (root / "alice" / "n.txt").read_bytes() == b"by alice"
    assert not (root / "bob").exists()
    async with client.get(f"{sc.url}/docs/n.txt", headers={"X-Agent-Id": "alice"}) as r:
        await refused(r, 401, "unauthenticated", root)


async def test_rate_limit_per_agent(start_sidecar, client, root):
    (root / "a.txt").write_text("a")
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          docs:
            files: {{root: "{root}"}}
            rate_limit: {{rate: 1/min, burst: 1, per: agent}}
        """
    )
    one, two = {"X-Agent-Id": "one"}, {"X-Agent-Id": "two"}
    async with client.get(f"{sc.url}/docs/a.txt", headers=one) as r:
        assert r.status == 200
    async with client.get(f"{sc.url}/docs/a.txt", headers=one) as r:
        await refused(r, 429, "rate_limited", root)
        assert "Retry-After" in r.headers
    async with client.get(f"{sc.url}/docs/a.txt", headers=two) as r:
        assert r.status == 200


async def test_metrics_and_the_access_log(start_sidecar, client, root, caplog):
    (root / "a.txt").write_text("abc")
    policy = f'version: 1\nservices:\n  docs:\n    files: {{root: "{root}"}}\n'
    sc = await start_sidecar(policy, env={"SIDECAR_ACCESS_LOG": "1"})
    with caplog.at_level(logging.INFO, logger=access.LOGGER):
        async with client.get(f"{sc.url}/docs/a.txt", headers={"X-Agent-Id": "al"}) as r:
            assert await r.read() == b"abc"
        async with client.get(f"{sc.url}/docs/missing.txt") as r:
            assert r.status == 404
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == access.LOGGER]
    ok, missing = lines
    assert (ok["service"], ok["path"], ok["agent"]) == ("docs", "/docs/a.txt", "al")
    assert ok["status"] == 200
    assert ok["bytes_sent"] > 3
    assert (missing["status"], missing["reason"]) == (404, "not_found")
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    requests = "sidecar_request_duration_seconds_count"
    assert _sample(text, requests, service="docs", method="GET", code="200", reason="") == 1
    assert _sample(text, requests, service="docs", code="404", reason="not_found") == 1
    assert CANARY not in text
    assert CANARY not in "\n".join(r.getMessage() for r in caplog.records)


async def test_spans_name_the_file_operation(upstream, start_sidecar, client, root):
    receiver = Receiver()
    collector = await upstream(receiver.app())
    policy = f'version: 1\nservices:\n  docs:\n    files: {{root: "{root}"}}\n'
    sc = await start_sidecar(policy, env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector})
    async with client.put(f"{sc.url}/docs/a.txt", data=b"12345") as r:
        assert r.status == 201
    async with client.get(f"{sc.url}/docs/a.txt") as r:
        assert await r.read() == b"12345"
    async with client.get(f"{sc.url}/docs/") as r:
        assert len((await r.json())["entries"]) == 1
    async with client.get(f"{sc.url}/docs/nope.txt") as r:
        assert r.status == 404
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    servers = [s for s in receiver.spans if s.kind == "server"]
    by_name: dict[str, list[dict[str, object]]] = {}
    for span in servers:
        by_name.setdefault(span.name, []).append(span.attributes)
    [put] = by_name["PUT /docs"]
    assert put["sidecar.files.operation"] == "write"
    assert put["sidecar.files.bytes"] == 5
    assert put["sidecar.service"] == "docs"
    read, listing, missing = by_name["GET /docs"]
    assert (read["sidecar.files.operation"], read["sidecar.files.bytes"]) == ("read", 5)
    assert listing["sidecar.files.operation"] == "list"
    assert missing["sidecar.error.reason"] == "not_found"
    dump = json.dumps([(s.attributes, s.resource) for s in receiver.spans])
    assert CANARY not in dump
