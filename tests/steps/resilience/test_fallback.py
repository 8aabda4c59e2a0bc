"""Fallbacks end to end: a real sidecar, real local upstreams, each hop with its own credential."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from aiohttp import web

from tests.policy.test_loader import errors, write


def recording(status: int, seen: list[dict[str, Any]], name: str) -> web.Application:
    """Answers every call with `status`, noting what it received."""

    async def handle(request: web.Request) -> web.Response:
        seen.append(
            {
                "upstream": name,
                "path": request.path_qs,
                "headers": dict(request.headers),
                "body": await request.read(),
            }
        )
        return web.json_response({"served": name}, status=status)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def policy(primary: str, secondary: str) -> str:
    return f"""
        version: 1
        services:
          primary:
            upstream: {primary}
            auth: {{type: bearer, token: "${{env:PRIMARY_TOKEN}}"}}
            retry: {{attempts: 2, on: [connect-error, 503], backoff: {{initial: 10ms, max: 20ms}}}}
            fallback: [secondary]
          secondary:
            upstream: {secondary}
            auth: {{type: header, name: X-Api-Key, value: "${{env:SECONDARY_TOKEN}}"}}
        """


ENV = {"PRIMARY_TOKEN": "primary-secret", "SECONDARY_TOKEN": "secondary-secret"}


async def test_a_primary_that_is_down_is_served_by_the_fallback_with_its_own_credential(
    upstream, start_sidecar, client, closed_port
):
    seen: list[dict[str, Any]] = []
    secondary = await upstream(recording(200, seen, "secondary"))
    sidecar = await start_sidecar(policy(f"http://127.0.0.1:{closed_port}", secondary), env=ENV)
    async with client.post(
        f"{sidecar.url}/primary/v1/chat?x=1",
        json={"model": "m"},
        headers={"Authorization": "Bearer agents-own"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Served-By"] == "secondary"
        assert await resp.json() == {"served": "secondary"}
    [hop] = seen
    assert hop["path"] == "/v1/chat?x=1"
    assert hop["body"] == b'{"model": "m"}'
    assert hop["headers"]["X-Api-Key"] == "secondary-secret"
    # Neither the primary's credential nor the agent's own reaches the other service.
    assert "Authorization" not in hop["headers"]
    assert "primary-secret" not in str(hop["headers"])


async def test_a_primary_answering_503_after_its_retries_falls_back(
    upstream, start_sidecar, client
):
    seen: list[dict[str, Any]] = []
    primary = await upstream(recording(503, seen, "primary"))
    secondary = await upstream(recording(200, seen, "secondary"))
    sidecar = await start_sidecar(policy(primary, secondary), env=ENV)
    async with client.get(f"{sidecar.url}/primary/items") as resp:
        assert resp.status == 200
        assert resp.headers["X-Sidecar-Served-By"] == "secondary"
    assert [s["upstream"] for s in seen] == ["primary", "primary", "secondary"]
    assert seen[0]["headers"]["Authorization"] == "Bearer primary-secret"
    assert "X-Api-Key" not in seen[0]["headers"]
    assert seen[2]["headers"]["X-Api-Key"] == "secondary-secret"
    assert "Authorization" not in seen[2]["headers"]


async def test_a_good_answer_from_the_primary_is_final(upstream, start_sidecar, client):
    seen: list[dict[str, Any]] = []
    primary = await upstream(recording(200, seen, "primary"))
    secondary = await upstream(recording(200, seen, "secondary"))
    sidecar = await start_sidecar(policy(primary, secondary), env=ENV)
    async with client.get(f"{sidecar.url}/primary/items") as resp:
        assert resp.status == 200
        assert "X-Sidecar-Served-By" not in resp.headers
        assert await resp.json() == {"served": "primary"}
    # A 4xx is the agent's fault, not the upstream's: no other service is tried.
    primary404 = await upstream(recording(404, seen, "primary"))
    sidecar = await start_sidecar(policy(primary404, secondary), env=ENV)
    async with client.get(f"{sidecar.url}/primary/items") as resp:
        assert resp.status == 404
    assert [s["upstream"] for s in seen] == ["primary", "primary"]


async def test_when_every_service_fails_the_agent_gets_the_last_answer(
    upstream, start_sidecar, client, closed_port
):
    seen: list[dict[str, Any]] = []
    secondary = await upstream(recording(502, seen, "secondary"))
    sidecar = await start_sidecar(policy(f"http://127.0.0.1:{closed_port}", secondary), env=ENV)
    async with client.get(f"{sidecar.url}/primary/items") as resp:
        assert resp.status == 502
        assert resp.headers["X-Sidecar-Served-By"] == "secondary"
        assert "X-Sidecar-Error" not in resp.headers


def test_unknown_and_cyclic_fallbacks_are_refused_at_load(tmp_path: Path) -> None:
    write(
        tmp_path,
        "policy.yaml",
        """
        version: 1
        services:
          openai:
            upstream: http://127.0.0.1:1
            fallback: [anthropc]
          anthropic:
            upstream: http://127.0.0.1:2
            fallback: [mistral]
          mistral:
            upstream: http://127.0.0.1:3
            fallback: [anthropic]
        """,
    )
    problems = errors(tmp_path)
    assert any(
        "policy.yaml:5:" in p and "unknown service 'anthropc'" in p and "anthropic" in p
        for p in problems
    ), problems
    assert any("fallback of service 'anthropic' leads back to it" in p for p in problems)
    assert any("fallback of service 'mistral' leads back to it" in p for p in problems)


async def test_model_map_renames_the_model_for_the_fallback_hop(
    upstream, start_sidecar, client, closed_port
):
    seen: list[dict[str, Any]] = []
    secondary = await upstream(recording(200, seen, "secondary"))
    text = policy(f"http://127.0.0.1:{closed_port}", secondary)
    text += "    model_map: {gpt-4o: claude-sonnet-4-5}\n"
    sidecar = await start_sidecar(text, env=ENV)
    async with client.post(
        f"{sidecar.url}/primary/v1/chat", json={"model": "gpt-4o", "n": 1}
    ) as resp:
        assert resp.status == 200
    assert json.loads(seen[0]["body"]) == {"model": "claude-sonnet-4-5", "n": 1}
