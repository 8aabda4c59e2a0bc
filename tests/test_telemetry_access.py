"""The access log's writer (what `sidecar run --access-log` starts) writes the same lines
as the logger did, for the same calls: the request path only queues their fields."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest

from sidecar.telemetry import access
from tests.conftest import echo_app

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture
def restore_access_logger():
    logger = logging.getLogger(access.LOGGER)
    saved = (logger.handlers[:], logger.propagate, logger.level)
    yield
    logger.handlers[:], logger.propagate, logger.level = saved
    access.writer = None


async def _calls(sc: Any, client: Any) -> None:
    headers = {"X-Agent-Id": "agent-7", "traceparent": f"00-{TRACE_ID}-00f067aa0ba902b7-01"}
    async with client.get(f"{sc.url}/api/x/y?secret=s3", headers=headers) as r:
        assert r.status == 200
    async with client.post(f"{sc.url}/api/z", data=b"{}", headers={"X-Agent-Id": "a" * 200}):
        pass
    async with client.get(f"{sc.url}/nowhere?q=1") as r:
        assert r.status == 404


def _comparable(line: dict[str, Any]) -> dict[str, Any]:
    # What differs from one call to the next: when, and how long.
    assert line.pop("time").endswith("Z")
    assert line.pop("duration_ms") >= 0
    return line


async def test_the_writer_writes_the_lines_the_logger_wrote(
    upstream, start_sidecar, client, caplog, restore_access_logger
):
    api = await upstream(echo_app())
    policy = (
        f"version: 1\nservices:\n  api: {{upstream: '{api}'}}\nagents: {{header: X-Agent-Id}}\n"
    )
    sc = await start_sidecar(policy, env={"SIDECAR_ACCESS_LOG": "1"})

    with caplog.at_level(logging.INFO, logger=access.LOGGER):
        await _calls(sc, client)
    logged = [json.loads(r.getMessage()) for r in caplog.records if r.name == access.LOGGER]

    stream = io.StringIO()
    writer = access.configure(stream)
    assert access.writer is writer
    await _calls(sc, client)
    logging.getLogger(access.LOGGER).info('{"from":"elsewhere"}')
    writer.stop()  # writes what is queued
    assert access.writer is None
    text = stream.getvalue()
    assert text.endswith("\n")
    written = [json.loads(line) for line in text.splitlines()]

    assert written[-1] == {"from": "elsewhere"}
    assert [_comparable(w) for w in written[:-1]] == [_comparable(x) for x in logged]
    assert len(logged) == 3
    assert logged[0]["trace_id"] == TRACE_ID and logged[0]["path"] == "/api/x/y"
    assert logged[1]["agent"] == "a" * 128
    assert "s3" not in text and "q=1" not in text


def test_a_line_from_its_fields_and_its_keywords_is_the_same() -> None:
    fields = (1765000000.25, "agent", "GET", "api", "/x", 200, 0.0123456, 10, 1, None, None)
    text = access.format_line(fields)
    assert text == access.line(
        at=1765000000.25,
        agent="agent",
        method="GET",
        service="api",
        path="/x",
        status=200,
        duration=0.0123456,
        bytes_sent=10,
        attempts=1,
        reason=None,
        trace_id=None,
    )
    assert json.loads(text) == {
        "time": "2025-12-06T05:46:40.250Z",
        "agent": "agent",
        "method": "GET",
        "service": "api",
        "path": "/x",
        "status": 200,
        "duration_ms": 12.346,
        "bytes_sent": 10,
        "upstream_attempts": 1,
        "reason": None,
        "trace_id": None,
    }
    assert text.startswith('{"time":"2025-12-06T05:46:40.250Z","agent":"agent"')


@pytest.mark.parametrize(
    "fields",
    [
        (1765000000.0, None, "GET", None, "/", 404, 0.0, 0, 0, "no_route", None),
        (1765000000.999, 'a"b\\c\u00e9\u2028\n', "PATCH", "s", "/p\u00e4th/\"x\"", 599, 12.5,
         10**12, 3, "timeout", "0" * 32),
        (1765000001.5, "agent", "GET", "api", "/x", 200, 1e-07, 5, 1, None, None),
    ],
)  # fmt: skip
def test_a_line_is_what_json_dumps_writes(fields: Any) -> None:
    _, agent, method, service, path, status, duration, sent, attempts, reason, trace = fields
    expected = {
        "time": access.format_line(fields)[9:33],
        "agent": agent,
        "method": method,
        "service": service,
        "path": path,
        "status": status,
        "duration_ms": round(duration * 1000, 3),
        "bytes_sent": sent,
        "upstream_attempts": attempts,
        "reason": reason,
        "trace_id": trace,
    }
    assert access.format_line(fields) == json.dumps(expected, separators=(",", ":"))
