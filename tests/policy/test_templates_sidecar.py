"""Templates through a real sidecar: the upstream (a local aiohttp server standing in
for the provider) gets the credential and the headers the provider requires."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import Counting, StartSidecar, echo_app
from tests.helpers import eventually

Upstream = Callable[[web.Application], Awaitable[str]]

SECRET = "sk-test-0123456789abcdef"


async def echoed(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> dict[str, Any]:
    async with client.post(url, json={"model": "m"}, headers=headers or {}) as r:
        assert r.status == 200, await r.text()
        body: dict[str, Any] = await r.json()
        return body


async def test_openai_template_sends_the_key_in_place_of_the_agents(
    upstream: Upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    base = await upstream(echo_app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          openai:
            template: openai
            upstream: {base}/v1
        """,
        env={"OPENAI_API_KEY": SECRET},
    )
    seen = await echoed(
        client,
        f"{sidecar.url}/openai/chat/completions",
        {"Authorization": "Bearer unused"},
    )
    assert seen["path"] == "/v1/chat/completions"
    assert seen["headers"]["Authorization"] == f"Bearer {SECRET}"
    # The admin port shows where the key comes from, never the key.
    async with client.get(f"{sidecar.admin}/config") as r:
        config = await r.text()
    assert SECRET not in config and "${env:OPENAI_API_KEY}" in config
    assert '"template": "openai"' in config


async def test_anthropic_template_sends_x_api_key_and_a_default_anthropic_version(
    upstream: Upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    base = await upstream(echo_app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          anthropic:
            template: anthropic
            upstream: {base}
        """,
        env={"ANTHROPIC_API_KEY": SECRET},
    )
    url = f"{sidecar.url}/anthropic/v1/messages"
    seen = await echoed(client, url, {"x-api-key": "agent-guess"})
    assert seen["path"] == "/v1/messages"
    assert seen["headers"]["x-api-key"] == SECRET
    assert seen["headers"]["anthropic-version"] == "2023-06-01"
    # An SDK that pins its own version keeps it.
    pinned = await echoed(client, url, {"anthropic-version": "2026-10-21"})
    assert pinned["headers"]["anthropic-version"] == "2026-10-21"


async def test_azure_openai_template_sends_api_key_and_api_version(
    upstream: Upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    base = await upstream(echo_app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          azure_openai:
            template: azure_openai
            upstream: {base}
        """,
        env={"AZURE_OPENAI_API_KEY": SECRET},
    )
    path = "/openai/deployments/gpt-4o/chat/completions"
    seen = await echoed(
        client, f"{sidecar.url}/azure_openai{path}", {"Authorization": "Bearer unused"}
    )
    assert seen["path"] == path
    assert seen["query"] == "api-version=2024-10-21"
    assert seen["headers"]["api-key"] == SECRET
    assert "Authorization" not in seen["headers"]
    # The AzureOpenAI SDK sends its own api-version: it is kept, not doubled.
    seen = await echoed(client, f"{sidecar.url}/azure_openai{path}?api-version=2025-04-01")
    assert seen["query"] == "api-version=2025-04-01"


async def test_gemini_template_sends_x_goog_api_key(
    upstream: Upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    base = await upstream(echo_app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          gemini:
            template: gemini
            upstream: {base}
        """,
        env={"GEMINI_API_KEY": SECRET},
    )
    seen = await echoed(
        client,
        f"{sidecar.url}/gemini/v1beta/models/gemini-2.5-flash:generateContent",
        {"Authorization": "Bearer unused"},
    )
    assert seen["headers"]["x-goog-api-key"] == SECRET
    assert "Authorization" not in seen["headers"]


async def test_a_429_with_retry_after_ms_pauses_the_service_in_the_sidecar(
    upstream: Upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    counting = Counting()
    counting.status = 429
    counting.headers = {"retry-after-ms": "30000", "x-ratelimit-remaining-requests": "0"}
    base = await upstream(counting.app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          openai:
            template: openai
            upstream: {base}/v1
        """,
        env={"OPENAI_API_KEY": SECRET},
    )
    url = f"{sidecar.url}/openai/chat/completions"
    async with client.post(url, json={}) as r:
        assert r.status == 429
        assert "X-Sidecar-Error" not in r.headers  # the provider's own answer, unchanged
    async with client.post(url, json={}) as r:
        assert r.status == 429
        assert r.headers["X-Sidecar-Error"] == "rate_limited"
        assert 29 <= int(r.headers["Retry-After"]) <= 30
        assert SECRET not in await r.text()
    assert counting.hits == 1


async def test_editing_a_user_template_reloads_the_services_built_on_it(
    upstream: Upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    base = await upstream(echo_app())
    sidecar = await start_sidecar(
        f"version: 1\nservices:\n  plain:\n    upstream: {base}\n", watch=True
    )
    templates = sidecar.policies / "templates"
    templates.mkdir()
    text = (
        'description: ours\nservice:\n  upstream: {base}\n  headers: {{set: {{X-Rev: "{rev}"}}}}\n'
    )

    def write_template(rev: str) -> None:
        tmp = templates / ".ours.yaml.tmp"
        tmp.write_text(text.format(base=base, rev=rev))
        os.replace(tmp, templates / "ours.yaml")

    write_template("1")
    sidecar.write("policy.yaml", "version: 1\nservices:\n  svc: {template: ours}\n")

    async def revision() -> str | None:
        async with client.get(f"{sidecar.url}/svc/x") as r:
            if r.status != 200:
                return None
            body: dict[str, Any] = await r.json()
            return body["headers"].get("X-Rev")

    async def is_(rev: str) -> bool:
        return await revision() == rev

    await eventually(lambda: is_("1"), "the service built on the user template")
    write_template("2")
    await eventually(lambda: is_("2"), "the edited template in effect")
