"""Google and Azure workload credentials against token endpoints on loopback.

- gcp: a service-account key whose token_uri is a local server, which checks
  the signed JWT assertion google-auth sends with the key's public half;
- azure: a fake IMDS (managed identity) and a fake Entra ID token endpoint
  (AKS workload identity federation, the projected token as client assertion).
The upstream echoes what it got: the token the sidecar injected.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import StartSidecar, echo_app

SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"


class GoogleTokenEndpoint:
    def __init__(self) -> None:
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.requests: list[dict[str, Any]] = []
        self.gate: asyncio.Event | None = None

    def key_file(self, token_uri: str) -> str:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        return json.dumps(
            {
                "type": "service_account",
                "project_id": "agents",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": "agent@agents.iam.gserviceaccount.com",
                "client_id": "1",
                "token_uri": token_uri,
            }
        )

    def app(self) -> web.Application:
        async def token(request: web.Request) -> web.Response:
            form = await request.post()
            if self.gate is not None:
                await self.gate.wait()
            claims = jwt.decode(
                str(form["assertion"]),
                self.key.public_key(),
                algorithms=["RS256"],
                audience="https://oauth2.googleapis.com/token",  # google-auth's default
            )
            self.requests.append({"grant": form["grant_type"], "claims": claims})
            return web.json_response(
                {
                    "access_token": f"ya29.t{len(self.requests)}",
                    "expires_in": 3600,
                    "token_type": "Bearer",
                }
            )

        app = web.Application()
        app.router.add_post("/token", token)
        return app


async def test_gcp_service_account_key(
    start_sidecar: StartSidecar, upstream: Any, tmp_path: Path
) -> None:
    google = GoogleTokenEndpoint()
    token_url = f"{await upstream(google.app())}/token"
    (tmp_path / "key.json").write_text(google.key_file(token_url))
    echo = await upstream(echo_app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          gcs:
            upstream: {echo}
            auth:
              type: gcp
              credentials: ${{file:{tmp_path / "key.json"}}}
              scopes: [{SCOPE}]
        """
    )
    google.gate = asyncio.Event()
    async with aiohttp.ClientSession(headers={"Authorization": "Bearer agent-own"}) as http:

        async def call() -> str:
            async with http.get(f"{sidecar.url}/gcs/storage/v1/b") as resp:
                assert resp.status == 200
                return str((await resp.json())["headers"]["Authorization"])

        calls = [asyncio.ensure_future(call()) for _ in range(5)]
        await asyncio.sleep(0.2)
        google.gate.set()
        assert await asyncio.gather(*calls) == ["Bearer ya29.t1"] * 5
    assert len(google.requests) == 1  # one refresh, in a thread, for all five calls
    grant = google.requests[0]
    assert grant["grant"] == "urn:ietf:params:oauth:grant-type:jwt-bearer"
    assert grant["claims"]["iss"] == "agent@agents.iam.gserviceaccount.com"
    assert grant["claims"]["scope"] == SCOPE


class EntraEndpoints:
    """IMDS and Entra ID's token endpoint, recording what each got."""

    def __init__(self) -> None:
        self.imds: list[dict[str, str]] = []
        self.federated: list[dict[str, str]] = []

    def app(self) -> web.Application:
        async def imds(request: web.Request) -> web.Response:
            if request.headers.get("Metadata") != "true":
                return web.json_response({"error": "invalid_request"}, status=400)
            self.imds.append(dict(request.query))
            return web.json_response(
                {"access_token": "mi-token", "expires_in": "3599", "token_type": "Bearer"}
            )

        async def entra(request: web.Request) -> web.Response:
            form = {k: str(v) for k, v in (await request.post()).items()}
            form["tenant"] = request.match_info["tenant"]
            self.federated.append(form)
            if form.get("client_assertion") != "projected-oidc-token":
                return web.json_response({"error": "invalid_client"}, status=401)
            return web.json_response({"access_token": "wi-token", "expires_in": 3599})

        app = web.Application()
        app.router.add_get("/metadata/identity/oauth2/token", imds)
        app.router.add_post("/{tenant}/oauth2/v2.0/token", entra)
        return app


async def test_azure_managed_and_workload_identity(
    start_sidecar: StartSidecar, upstream: Any, tmp_path: Path
) -> None:
    entra = EntraEndpoints()
    base = await upstream(entra.app())
    echo = await upstream(echo_app())
    (tmp_path / "azure-token").write_text("projected-oidc-token\n")
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          blob:
            upstream: {echo}
            auth:
              type: azure
              scope: https://storage.azure.com/.default
              managed_identity:
                client_id: 11111111-2222-3333-4444-555555555555
                endpoint: {base}/metadata/identity/oauth2/token
          graph:
            upstream: {echo}
            auth:
              type: azure
              scope: https://graph.microsoft.com/.default
              workload_identity: {{}}
        """,
        env={
            "AZURE_TENANT_ID": "tenant-1",
            "AZURE_CLIENT_ID": "client-1",
            "AZURE_FEDERATED_TOKEN_FILE": str(tmp_path / "azure-token"),
            "AZURE_AUTHORITY_HOST": base,
        },
    )
    async with aiohttp.ClientSession() as http:
        for service, token in (("blob", "mi-token"), ("graph", "wi-token")):
            async with http.get(f"{sidecar.url}/{service}/x") as resp:
                assert resp.status == 200
                assert (await resp.json())["headers"]["Authorization"] == f"Bearer {token}"
    assert entra.imds == [
        {
            "api-version": "2018-02-01",
            "resource": "https://storage.azure.com",
            "client_id": "11111111-2222-3333-4444-555555555555",
        }
    ]
    (federated,) = entra.federated
    assert federated["tenant"] == "tenant-1" and federated["client_id"] == "client-1"
    assert federated["scope"] == "https://graph.microsoft.com/.default"
    assert federated["client_assertion_type"].endswith("client-assertion-type:jwt-bearer")


async def test_azure_refusal_is_auth_failed(
    start_sidecar: StartSidecar, upstream: Any, tmp_path: Path
) -> None:
    entra = EntraEndpoints()
    base = await upstream(entra.app())
    (tmp_path / "azure-token").write_text("a-token-entra-refuses")
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          graph:
            upstream: {await upstream(echo_app())}
            auth:
              type: azure
              scope: https://graph.microsoft.com/.default
              workload_identity:
                tenant_id: t
                client_id: c
                token_file: {tmp_path / "azure-token"}
                authority: {base}
        """
    )
    async with aiohttp.ClientSession() as http, http.get(f"{sidecar.url}/graph/x") as resp:
        problem = await resp.json(content_type=None)
    assert resp.status == 502 and resp.headers["X-Sidecar-Error"] == "auth_failed"
    assert "HTTP 401 (invalid_client)" in problem["detail"]
    assert "a-token-entra-refuses" not in json.dumps(problem)
