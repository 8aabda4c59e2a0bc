"""Built-in auth kinds end to end: what the upstream receives, and what the agent sent is gone."""

from __future__ import annotations

import base64
from typing import Any
from urllib.parse import parse_qsl

import pytest
from aiohttp import web

USER, PASSWORD = "svc-user", "p@ss:word/+"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def echo_all() -> web.Application:
    """Echoes every header line and query pair as received, duplicates included."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "headers": [[k, v] for k, v in request.headers.items()],
                "query": parse_qsl(request.query_string, keep_blank_values=True),
                "raw_query": request.raw_path.partition("?")[2],
            }
        )

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


# kind -> (auth policy, the agent's own credential headers, header name, value expected)
KINDS: dict[str, tuple[str, dict[str, str], str | None, str | None]] = {
    "bearer": (
        '{type: bearer, token: "${env:TOKEN}"}',
        {"Authorization": "Bearer agents-own"},
        "Authorization",
        "Bearer the-real-token",
    ),
    "header": (
        '{type: header, name: X-Api-Key, value: "${env:TOKEN}"}',
        {"x-api-key": "agents-own"},  # another spelling of the same header
        "X-Api-Key",
        "the-real-token",
    ),
    "query": ('{type: query, name: api_key, value: "${env:TOKEN}"}', {}, None, None),
    "basic": (
        f'{{type: basic, username: "{USER}", password: "{PASSWORD}"}}',
        {"Authorization": "Basic YWdlbnQ6b3du"},
        "Authorization",
        BASIC,
    ),
}


def header_values(seen: dict[str, Any], name: str) -> list[str]:
    return [v for k, v in seen["headers"] if k.lower() == name.lower()]


@pytest.mark.parametrize("kind", list(KINDS))
async def test_the_credential_replaces_whatever_the_agent_sent(
    kind, upstream, start_sidecar, client
):
    auth, agent_headers, header, expected = KINDS[kind]
    base = await upstream(echo_all())
    sc = await start_sidecar(
        f"version: 1\nservices:\n  api:\n    upstream: {base}\n    auth: {auth}\n",
        env={"TOKEN": "the-real-token"},
    )
    # The agent tries its own credential in the same header (or query parameter).
    url = f"{sc.url}/api/v1/things?api_key=agents-own&q=1&api_key=again"
    async with client.get(url, headers={**agent_headers, "X-Other": "kept"}) as r:
        assert r.status == 200
        seen = await r.json()

    assert header_values(seen, "X-Other") == ["kept"]
    if header is not None:
        assert header_values(seen, header) == [expected]  # exactly one, the sidecar's
        assert "agents-own" not in str(seen["headers"])
        # Header kinds leave the query alone.
        assert seen["query"] == [["api_key", "agents-own"], ["q", "1"], ["api_key", "again"]]
    else:
        # The query kind: replaced, not duplicated; the agent's other parameters kept.
        assert seen["query"] == [["q", "1"], ["api_key", "the-real-token"]]
        assert "Authorization" not in dict(seen["headers"])


@pytest.mark.parametrize("kind", list(KINDS))
async def test_the_credential_goes_only_to_its_own_service(kind, upstream, start_sidecar, client):
    auth, _, header, _ = KINDS[kind]
    base = await upstream(echo_all())
    sc = await start_sidecar(
        f"version: 1\nservices:\n  api:\n    upstream: {base}\n    auth: {auth}\n"
        f"  other:\n    upstream: {base}\n",
        env={"TOKEN": "the-real-token"},
    )
    async with client.get(f"{sc.url}/other/x?q=1") as r:
        seen = await r.json()
    assert seen["query"] == [["q", "1"]]
    assert "the-real-token" not in str(seen) and USER not in str(seen)
    if header is not None:
        assert header_values(seen, header) == []


async def test_query_credential_is_added_to_a_call_without_a_query(upstream, start_sidecar, client):
    base = await upstream(echo_all())
    auth = KINDS["query"][0]
    sc = await start_sidecar(
        f"version: 1\nservices:\n  api:\n    upstream: {base}\n    auth: {auth}\n",
        env={"TOKEN": "a b&c=d"},  # characters that must be encoded
    )
    async with client.get(f"{sc.url}/api/x") as r:
        seen = await r.json()
    assert seen["query"] == [["api_key", "a b&c=d"]]
    assert seen["raw_query"] == "api_key=a%20b%26c%3Dd"


@pytest.mark.parametrize("kind", ["bearer", "header"])
async def test_a_credential_that_would_split_the_request_is_never_written(
    kind, upstream, start_sidecar, client, tmp_path
):
    # The policy refuses CR and LF in a value it can see; a file secret read per
    # load can still hold a NUL. The field is checked where it joins the call.
    secret = tmp_path / "token"
    secret.write_bytes(b"half\x00secret-canary")
    auth = KINDS[kind][0].replace("${env:TOKEN}", f"${{file:{secret}}}")
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(request.path)
        return web.Response(text="upstream")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    base = await upstream(app)
    sc = await start_sidecar(
        f"version: 1\nservices:\n  api:\n    upstream: {base}\n    auth: {auth}\n"
    )
    async with client.get(f"{sc.url}/api/x") as r:
        body = await r.text()
        assert r.status >= 500
        assert r.headers["Content-Type"] == "application/problem+json"
    assert seen == []
    assert "secret-canary" not in body and "secret-canary" not in str(r.headers)
