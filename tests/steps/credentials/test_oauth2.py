"""OAuth2 client credentials against a real loopback token endpoint and upstream."""

from __future__ import annotations

import asyncio
import base64
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from sidecar.policy.models import OAuth2ClientCredentials
from sidecar.steps.credentials import oauth2
from sidecar.steps.credentials.oauth2 import TokenSource
from tests.helpers import eventually, stop_task

CLIENT_ID = "agent-client"
CLIENT_SECRET = "s3cr3t:with/odd+chars"


@dataclass
class TokenEndpoint:
    """Issues tok-1, tok-2, ... and records every token request it gets."""

    expires_in: int | None = 3600
    fail_with: int | None = None
    secret: str = CLIENT_SECRET
    gate: asyncio.Event | None = None  # when set, requests wait for it
    requests: list[dict[str, Any]] = field(default_factory=list)
    issued: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            form = dict(await request.post())
            self.requests.append(
                {"form": form, "authorization": request.headers.get("Authorization")}
            )
            if self.gate is not None:
                await self.gate.wait()
            if self.fail_with is not None:
                return web.json_response(
                    {"error": "server_error", "error_description": "down for maintenance"},
                    status=self.fail_with,
                )
            if not self._client_ok(request, form):
                return web.json_response({"error": "invalid_client"}, status=401)
            if form.get("grant_type") != "client_credentials":
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
            self.issued.append(f"tok-{len(self.issued) + 1}")
            body: dict[str, Any] = {"access_token": self.issued[-1], "token_type": "Bearer"}
            if self.expires_in is not None:
                body["expires_in"] = self.expires_in
            return web.json_response(body)

        app = web.Application()
        app.router.add_post("/oauth/token", token)
        return app

    def _client_ok(self, request: web.Request, form: dict[str, Any]) -> bool:
        basic = request.headers.get("Authorization", "")
        if basic.startswith("Basic "):
            pair = base64.b64decode(basic[6:]).decode()
            return pair == f"{CLIENT_ID}:{self.secret}" and "client_secret" not in form
        return form.get("client_id") == CLIENT_ID and form.get("client_secret") == self.secret


@dataclass
class Api:
    """An upstream that accepts the tokens issued and not revoked."""

    endpoint: TokenEndpoint
    always_401: bool = False
    revoked: set[str] = field(default_factory=set)
    seen: list[tuple[str | None, bytes]] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            auth = request.headers.get("Authorization")
            self.seen.append((auth, await request.read()))
            valid = {f"Bearer {t}" for t in self.endpoint.issued if t not in self.revoked}
            if self.always_401 or auth not in valid:
                return web.json_response({"error": "invalid token"}, status=401)
            return web.json_response({"token": auth})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def policy(api: str, tokens: str, secret: str = "${env:CLIENT_SECRET}", **auth: str) -> str:
    extra = "".join(f"\n              {k}: {v}" for k, v in auth.items())
    return f"""
        version: 1
        services:
          api:
            upstream: {api}
            auth:
              type: oauth2_client_credentials
              token_url: {tokens}/oauth/token
              client_id: {CLIENT_ID}
              client_secret: {secret}{extra}
        """


ENV = {"CLIENT_SECRET": CLIENT_SECRET}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The clock token lifetimes are measured with, moved by hand."""
    now = [1000.0]
    monkeypatch.setattr(oauth2, "CLOCK", lambda: now[0])
    return now


async def setup(upstream, start_sidecar, endpoint=None, api=None, **auth: str):
    endpoint = endpoint or TokenEndpoint()
    api = api or Api(endpoint)
    tokens = await upstream(endpoint.app())
    base = await upstream(api.app())
    sc = await start_sidecar(policy(base, tokens, **auth), env=ENV)
    return sc, endpoint, api


def source_of(sc) -> TokenSource:
    [source] = sc.sidecar.state.find("api", "oauth2")
    return source


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_token_fetched_once_and_injected(method, upstream, start_sidecar, client):
    sc, endpoint, _api = await setup(
        upstream, start_sidecar, auth_method=method, scope='"read write"', audience="api://x"
    )
    for _ in range(3):
        async with client.get(f"{sc.url}/api/v1", headers={"Authorization": "Bearer mine"}) as r:
            assert r.status == 200
            assert (await r.json())["token"] == "Bearer tok-1"

    assert len(endpoint.requests) == 1
    [req] = endpoint.requests
    assert req["form"]["grant_type"] == "client_credentials"
    assert req["form"]["scope"] == "read write"
    assert req["form"]["audience"] == "api://x"
    if method == "client_secret_basic":
        assert req["authorization"].startswith("Basic ")
        assert "client_secret" not in req["form"]
    else:
        assert req["authorization"] is None
        assert req["form"]["client_secret"] == CLIENT_SECRET


async def test_single_flight_on_expired_token(upstream, start_sidecar, client, clock):
    sc, endpoint, _api = await setup(upstream, start_sidecar)
    async with client.get(f"{sc.url}/api/") as r:
        assert r.status == 200
    clock[0] += 3601  # tok-1 has expired
    endpoint.gate = asyncio.Event()
    source = source_of(sc)

    async def one() -> tuple[int, Any]:
        async with client.get(f"{sc.url}/api/") as r:
            return r.status, await r.json()

    calls = [asyncio.create_task(one()) for _ in range(100)]
    await eventually(lambda: source.waiting == 100, "100 calls waiting for the token")
    endpoint.gate.set()
    results = await asyncio.gather(*calls)

    assert len(endpoint.requests) == 2  # tok-1 at first, then exactly one for all 100 calls
    assert results == [(200, {"token": "Bearer tok-2"})] * 100


async def test_refreshed_in_background_before_expiry(upstream, start_sidecar, client, clock):
    endpoint = TokenEndpoint(expires_in=600)
    sc, endpoint, _api = await setup(
        upstream, start_sidecar, endpoint=endpoint, refresh_before="60s"
    )

    async def token() -> str:
        async with client.get(f"{sc.url}/api/") as r:
            assert r.status == 200
            return str((await r.json())["token"])

    assert await token() == "Bearer tok-1"
    clock[0] += 539
    assert await token() == "Bearer tok-1"
    assert len(endpoint.requests) == 1

    # Within refresh_before of expiry: the old token still goes out while a new one is fetched.
    clock[0] += 2
    endpoint.gate = asyncio.Event()
    assert await token() == "Bearer tok-1"
    await eventually(lambda: len(endpoint.requests) == 2, "a background token request")
    endpoint.gate.set()
    await eventually(lambda: len(endpoint.issued) == 2, "the second token issued")
    assert await token() == "Bearer tok-2"
    assert len(endpoint.requests) == 2


async def test_no_expires_in_means_one_hour(upstream, start_sidecar, client, clock):
    sc, endpoint, _api = await setup(
        upstream, start_sidecar, endpoint=TokenEndpoint(expires_in=None), refresh_before="0s"
    )
    for step in (0, 3599, 2):
        clock[0] += step
        async with client.get(f"{sc.url}/api/") as r:
            assert r.status == 200
    assert len(endpoint.requests) == 2


async def test_upstream_401_refreshes_and_retries_once(upstream, start_sidecar, client):
    sc, endpoint, api = await setup(upstream, start_sidecar)
    async with client.post(f"{sc.url}/api/a", data=b"first") as r:
        assert r.status == 200
    api.revoked.add("tok-1")  # before it expired
    async with client.post(f"{sc.url}/api/a", data=b"payload") as r:
        assert r.status == 200
        assert (await r.json())["token"] == "Bearer tok-2"
    assert api.seen[-2:] == [("Bearer tok-1", b"payload"), ("Bearer tok-2", b"payload")]
    assert len(endpoint.requests) == 2


async def test_persistent_401_is_returned_after_one_retry(upstream, start_sidecar, client):
    endpoint = TokenEndpoint()
    sc, endpoint, api = await setup(
        upstream, start_sidecar, endpoint=endpoint, api=Api(endpoint, always_401=True)
    )
    async with client.get(f"{sc.url}/api/") as r:
        assert r.status == 401
        assert "X-Sidecar-Error" not in r.headers  # the upstream's own answer
    assert [auth for auth, _ in api.seen] == ["Bearer tok-1", "Bearer tok-2"]


async def test_streamed_body_is_not_replayed_after_401(upstream, start_sidecar, client):
    endpoint = TokenEndpoint()
    sc, endpoint, api = await setup(
        upstream, start_sidecar, endpoint=endpoint, api=Api(endpoint, always_401=True)
    )

    async def chunks():
        yield b"part one, "
        yield b"part two"

    # No Content-Length: the body streams through and cannot be sent twice.
    async with client.post(f"{sc.url}/api/upload", data=chunks()) as r:
        assert r.status == 401
    assert api.seen == [("Bearer tok-1", b"part one, part two")]
    # The refused token was dropped: the next call fetches a new one.
    async with client.get(f"{sc.url}/api/") as r:
        assert r.status == 401
    assert api.seen[1][0] == "Bearer tok-2"


@pytest.mark.parametrize("failure", ["status", "down", "wrong-secret"])
async def test_token_endpoint_failure_is_a_502_without_secrets(
    failure, upstream, start_sidecar, client, closed_port
):
    endpoint = TokenEndpoint()
    if failure == "status":
        endpoint.fail_with = 503
    elif failure == "wrong-secret":
        endpoint.secret = "another secret"
    tokens = await upstream(endpoint.app())
    if failure == "down":
        tokens = f"http://127.0.0.1:{closed_port}"
    api = Api(endpoint)
    base = await upstream(api.app())
    sc = await start_sidecar(policy(base, tokens), env=ENV)

    async with client.get(f"{sc.url}/api/") as r:
        assert r.status == 502
        assert r.headers["X-Sidecar-Error"] == "auth_failed"
        assert r.content_type == "application/problem+json"
        body = await r.json()
        text = await r.text()
    assert body["reason"] == "auth_failed"
    assert body["service"] == "api"
    assert CLIENT_SECRET not in text and CLIENT_ID not in text
    assert api.seen == []  # never sent without a credential
    if failure == "wrong-secret":
        assert "HTTP 401 (invalid_client)" in body["detail"]
    if failure == "status":
        assert "HTTP 503 (server_error)" in body["detail"]
        assert "maintenance" not in body["detail"]
        # Not cached: once the endpoint recovers, the next call gets a token.
        endpoint.fail_with = None
        async with client.get(f"{sc.url}/api/") as r:
            assert r.status == 200


async def test_rotated_client_secret_starts_a_new_token(upstream, start_sidecar, client, tmp_path):
    endpoint = TokenEndpoint()
    tokens = await upstream(endpoint.app())
    base = await upstream(Api(endpoint).app())
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET + "\n")
    sc = await start_sidecar(policy(base, tokens, secret=f"${{file:{secret_file}}}"))
    async with client.get(f"{sc.url}/api/") as r:
        assert r.status == 200
    # The same policy reloaded keeps the token...
    assert (await sc.sidecar.reload("test")).ok
    async with client.get(f"{sc.url}/api/") as r:
        assert r.status == 200
    assert len(endpoint.requests) == 1
    # ...a rotated secret does not.
    secret_file.write_text("rotated-secret\n")
    endpoint.secret = "rotated-secret"
    result = await sc.sidecar.reload("test")
    assert result.ok and result.changed
    async with client.get(f"{sc.url}/api/") as r:
        assert r.status == 200
        assert (await r.json())["token"] == "Bearer tok-2"
    assert len(endpoint.requests) == 2


async def test_reload_during_a_token_request_lets_the_waiting_calls_finish(
    upstream, start_sidecar, client, tmp_path
):
    endpoint = TokenEndpoint(gate=asyncio.Event())
    tokens = await upstream(endpoint.app())
    base = await upstream(Api(endpoint).app())
    secret_file = tmp_path / "client_secret"
    secret_file.write_text(CLIENT_SECRET)
    sc = await start_sidecar(policy(base, tokens, secret=f"${{file:{secret_file}}}"))
    old = source_of(sc)
    waiting = asyncio.create_task(client.get(f"{sc.url}/api/"))
    await eventually(lambda: old.waiting == 1, "a call waiting for the token")
    secret_file.write_text("rotated-secret")
    assert (await sc.sidecar.reload("test")).changed  # retires the old token source
    endpoint.gate.set()
    async with await waiting as r:
        assert r.status == 200
        assert (await r.json())["token"] == "Bearer tok-1"


async def test_cancelled_caller_does_not_cancel_the_token_request(upstream, start_sidecar, client):
    endpoint = TokenEndpoint(gate=asyncio.Event())
    sc, endpoint, _api = await setup(upstream, start_sidecar, endpoint=endpoint)
    source = source_of(sc)
    first = asyncio.create_task(client.get(f"{sc.url}/api/"))
    await eventually(lambda: source.waiting == 1, "one call waiting for the token")
    await stop_task(first)  # the agent hangs up while the token is being fetched
    await eventually(lambda: source.waiting == 0, "the hung-up call no longer waiting")
    second = asyncio.create_task(client.get(f"{sc.url}/api/"))
    await eventually(lambda: source.waiting == 1, "one call waiting for the token")
    endpoint.gate.set()
    async with await second as r:
        assert r.status == 200
    assert len(endpoint.requests) == 1


async def test_token_source_alone_with_fake_clock(upstream):
    """The cache on its own: no sidecar, the clock moved by hand."""
    endpoint = TokenEndpoint(expires_in=100)
    tokens = await upstream(endpoint.app())
    spec = OAuth2ClientCredentials.model_validate(
        {
            "type": "oauth2_client_credentials",
            "token_url": f"{tokens}/oauth/token",
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "refresh_before": "80s",
        }
    )
    now = [0.0]
    source = TokenSource(service="api", spec=spec, clock=lambda: now[0])
    try:
        assert await source.header() == "Bearer tok-1"
        now[0] = 49.9  # refresh_before is capped at half the lifetime: 50s
        assert await source.header() == "Bearer tok-1"
        assert len(endpoint.requests) == 1
        now[0] = 100.0  # expired: callers wait for the new token
        assert await source.header() == "Bearer tok-2"
        source.invalidate("Bearer tok-1")  # a late 401 for an old token changes nothing
        assert await source.header() == "Bearer tok-2"
        assert len(endpoint.requests) == 2
    finally:
        source.retire()
        await asyncio.sleep(0)
