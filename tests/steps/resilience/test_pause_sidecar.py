"""The upstream's pause through the real sidecar, on services without any rate_limit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Counting
from tests.helpers import sidecar_process


def policy(base: str) -> str:
    # No rate_limit, no retry: the pause belongs to every service.
    return f"""
        version: 1
        services:
          api:
            upstream: {base}
        """


async def get(client: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, str], Any]:
    async with client.get(f"{url}/api/x") as resp:
        return resp.status, dict(resp.headers), await resp.read()


@pytest.mark.parametrize(("status", "reason"), [(503, "upstream_paused"), (429, "rate_limited")])
async def test_an_upstream_retry_after_pauses_a_service_without_rate_limit(
    upstream, start_sidecar, client, status: int, reason: str
):
    counting = Counting()
    counting.status = status
    counting.headers = {"Retry-After": "2"}
    counting.body = b'{"error": "busy"}'
    base = await upstream(counting.app())
    sc = await start_sidecar(policy(base))

    got, headers, body = await get(client, sc.url)
    assert got == status
    assert body == b'{"error": "busy"}'
    assert "X-Sidecar-Error" not in headers

    counting.status, counting.headers = 200, {}
    for _ in range(3):
        got, headers, body = await get(client, sc.url)
        assert got == status
        assert headers["X-Sidecar-Error"] == reason
        assert headers["Content-Type"] == "application/problem+json"
        assert 1 <= int(headers["Retry-After"]) <= 2
        assert f"answered {status}".encode() in body
    assert counting.hits == 1


@pytest.mark.process
async def test_sidecar_run_answers_503_upstream_paused_during_an_upstreams_pause(
    upstream, client, tmp_path: Path
):
    counting = Counting()
    counting.status = 503
    counting.headers = {"Retry-After": "2"}
    base = await upstream(counting.app())
    (tmp_path / "policy.yaml").write_text(policy(base))
    async with sidecar_process(tmp_path) as proc:
        assert (await get(client, proc.url))[0] == 503
        counting.status, counting.headers = 200, {}
        got, headers, body = await get(client, proc.url)
        assert got == 503
        assert headers["X-Sidecar-Error"] == "upstream_paused"
        assert 1 <= int(headers["Retry-After"]) <= 2
        problem = json.loads(body)
        assert problem["reason"] == "upstream_paused" and problem["status"] == 503
        assert counting.hits == 1
