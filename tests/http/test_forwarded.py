"""Forwarding headers: none by default, the sidecar's own when a service opts in (issue 7,
item 11)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from yarl import URL

from tests.conftest import echo_app
from tests.helpers import sidecar_process

AGENT_SENT = {
    "X-Forwarded-For": "10.1.2.3",
    "X-Forwarded-Proto": "https",
    "X-Forwarded-Host": "agent.internal",
    "Via": "1.1 agent-proxy",
    "Forwarded": "for=10.1.2.3",
}


def _forwarding(headers: dict[str, str]) -> dict[str, str]:
    names = {n.lower() for n in AGENT_SENT}
    return {k: v for k, v in headers.items() if k.lower() in names}


async def test_no_forwarding_headers_by_default(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  s: {{upstream: '{base}'}}\n")
    async with client.get(f"{sc.url}/s/x") as r:
        assert _forwarding((await r.json())["headers"]) == {}
    # What the agent claims is dropped too: a third-party API learns nothing of the pod.
    async with client.get(f"{sc.url}/s/x", headers=AGENT_SENT) as r:
        assert _forwarding((await r.json())["headers"]) == {}


async def test_forwarded_true_adds_the_sidecars_hop(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"version: 1\nservices:\n  s: {{upstream: '{base}', forwarded: true}}\n"
    )
    authority = URL(sc.url).authority
    async with client.get(f"{sc.url}/s/x") as r:
        assert _forwarding((await r.json())["headers"]) == {
            "X-Forwarded-For": "127.0.0.1",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": authority,
            "Via": "1.1 agent-sidecar",
        }
    async with client.get(f"{sc.url}/s/x", headers=AGENT_SENT) as r:
        assert _forwarding((await r.json())["headers"]) == {
            "X-Forwarded-For": "10.1.2.3, 127.0.0.1",
            "X-Forwarded-Proto": "http",
            "X-Forwarded-Host": authority,
            "Via": "1.1 agent-proxy, 1.1 agent-sidecar",
        }


async def test_headers_set_wins_over_forwarded(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          s:
            upstream: {base}
            forwarded: true
            headers: {{set: {{X-Forwarded-Proto: https}}}}
        """
    )
    async with client.get(f"{sc.url}/s/x") as r:
        headers = (await r.json())["headers"]
    assert headers["X-Forwarded-Proto"] == "https"
    assert headers["X-Forwarded-For"] == "127.0.0.1"


@pytest.mark.process
async def test_the_real_process_sends_no_forwarding_headers_unless_asked(
    tmp_path: Path, upstream, client
):
    base = await upstream(echo_app())
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(
        f"version: 1\nservices:\n  off: {{upstream: '{base}'}}\n"
        f"  on: {{upstream: '{base}', forwarded: true}}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    async with sidecar_process(policies, env=env) as proc:
        async with client.get(f"{proc.url}/off/x", headers=AGENT_SENT) as r:
            assert _forwarding((await r.json())["headers"]) == {}
        async with client.get(f"{proc.url}/on/x", headers=AGENT_SENT) as r:
            headers = _forwarding((await r.json())["headers"])
        assert headers["X-Forwarded-For"] == "10.1.2.3, 127.0.0.1"
        assert headers["Via"] == "1.1 agent-proxy, 1.1 agent-sidecar"
        assert "Forwarded" not in headers
