"""GET /faults shows durations as written, and an agent's hang-up is counted with the
reason client_closed (issue 21, item 11)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import eventually, sidecar_process


@pytest.mark.process
async def test_faults_shows_a_clean_duration(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "services:\n"
        "  slow:\n"
        "    upstream: http://127.0.0.1:9\n"
        "    faults: {delay: {fixed: 700ms, ratio: 0.1}}\n"
    )
    async with (
        sidecar_process(tmp_path, "--data-dir", str(tmp_path / "d")) as sc,
        aiohttp.ClientSession() as client,
        client.get(f"{sc.admin}/faults") as r,
    ):
        view = await r.json()
    assert view["faults"]["slow"]["delay"]["fixed"] == "700ms"


async def test_a_hang_up_is_counted_as_client_closed(upstream, start_sidecar) -> None:  # type: ignore[no-untyped-def]
    arrived = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await asyncio.sleep(30)
        return web.Response(text="late")

    app = web.Application()
    app.router.add_get("/{tail:.*}", slow)
    base = await upstream(app)
    sc = await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n")
    host, port = sc.url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(arrived.wait(), 10)
    writer.close()  # the agent hangs up before the answer
    await writer.wait_closed()

    async def counted() -> bool:
        async with aiohttp.ClientSession() as client, client.get(f"{sc.admin}/metrics") as r:
            text = await r.text()
        return any(
            line.startswith("sidecar_request_duration_seconds_count{")
            and 'code="499"' in line
            and 'reason="client_closed"' in line
            and 'service="api"' in line
            for line in text.splitlines()
        )

    await eventually(counted, "a 499 with reason client_closed in /metrics")
