"""A span per statement, with literals replaced, and metrics per database and agent."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
import psycopg
import pytest

from tests.otlp_receiver import Receiver

from .pg_server import DATABASE, PASSWORD, USER, PostgresServer


async def test_spans_and_metrics_of_statements(
    postgres: PostgresServer, start_sidecar: Any, upstream: Any
) -> None:
    receiver = Receiver()
    collector = await upstream(receiver.app())
    running = await start_sidecar(
        f"""
        version: 1
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{postgres.port}/{DATABASE}
            auth: {{username: {USER}, password: {PASSWORD}}}
            read_only: true
        """,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector},
    )
    host, port = running.sidecar.databases.address("shop")
    dsn = f"postgresql://research-7:x@{host}:{port}/{DATABASE}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT item FROM orders WHERE id = 42 AND item <> 'secret-value'")
        with contextlib.suppress(psycopg.Error):
            await conn.execute("DELETE FROM orders WHERE id = 1")
    assert await asyncio.to_thread(running.sidecar.telemetry.force_flush)
    spans = [s for s in receiver.spans if s.attributes.get("db.system.name") == "postgresql"]
    select = next(s for s in spans if s.attributes.get("db.operation.name") == "SELECT")
    a = select.attributes
    assert a["db.namespace"] == DATABASE
    assert a["db.collection.name"] == "public.orders" or a["db.collection.name"] == "orders"
    assert "42" not in a["db.query.text"] and "secret-value" not in a["db.query.text"]
    assert a["sidecar.agent"] == "research-7" and a["db.response.status_code"] == "00000"
    refused = next(s for s in spans if s.attributes.get("db.operation.name") == "DELETE")
    assert refused.attributes["db.response.status_code"] in ("25006", "42501")
    async with aiohttp.ClientSession() as http, http.get(running.admin + "/metrics") as resp:
        metrics = await resp.text()
    assert (
        'sidecar_db_queries_total{agent="research-7",database="shop",outcome="ok",'
        'sqlstate_class="00"} 1.0' in metrics
    )
    assert 'outcome="refused"' in metrics
    assert 'sidecar_db_pool_connections{database="shop",state="idle"}' in metrics
    for span in receiver.spans:
        assert PASSWORD not in repr(span.attributes)


async def test_the_access_log_has_a_line_per_statement_without_values(
    postgres: PostgresServer, start_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_sidecar(
        f"""
        version: 1
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{postgres.port}/{DATABASE}
            auth: {{username: {USER}, password: {PASSWORD}}}
        """,
        env={"SIDECAR_ACCESS_LOG": "1"},
    )
    host, port = running.sidecar.databases.address("shop")
    caplog.set_level(logging.INFO, logger="sidecar.access")
    dsn = f"postgresql://research-7:x@{host}:{port}/{DATABASE}"
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SELECT item FROM orders WHERE item = 'private-value'")
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "sidecar.access"]
    line = next(x for x in lines if x["operation"] == "SELECT")
    assert (line["agent"], line["database"], line["sqlstate"], line["rows"]) == (
        "research-7",
        "shop",
        "00000",
        0,
    )
    assert "private-value" not in caplog.text and PASSWORD not in caplog.text
