"""Canary: cloud secrets never show in logs, spans, metrics, cassettes or admin output.

The secret access key and session token of static keys, the ones a web
identity exchange returns (with the OIDC token it sent), a Google
service-account key and the Google and Azure access tokens each get a unique
value; calls succeed, fail upstream and fail at their token endpoint;
everything the sidecar shows or writes is then searched for them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.cloud.fake_bedrock import FakeBedrock
from tests.conftest import StartSidecar
from tests.otlp_receiver import Receiver

CANARIES = {
    "secret": "canary-aws-secret-5e1f0b9c",
    "token": "canary-aws-session-token-77c2d1",
    "sts_secret": "canary-sts-secret-0d9e8f",
    "sts_token": "canary-sts-session-token-3a4b5c",
    "oidc": "canary-oidc-token-6c7d8e",
    "google_token": "ya29.canary-google-token-9f8e7d",
    "azure_token": "canary-azure-token-1a2b3c",
}
MODEL = "anthropic.claude-sonnet-4-5-20250929-v1:0"


def sts_app(fail: bool) -> web.Application:
    async def sts(request: web.Request) -> web.Response:
        form = await request.post()
        assert form["WebIdentityToken"] == CANARIES["oidc"]
        if fail:
            return web.Response(
                status=400,
                content_type="text/xml",
                text="<ErrorResponse><Error><Code>InvalidIdentityToken</Code>"
                f"<Message>bad token {CANARIES['oidc']}</Message></Error></ErrorResponse>",
            )
        return web.Response(
            content_type="text/xml",
            text=(
                '<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/'
                '2011-06-15/"><AssumeRoleWithWebIdentityResult><Credentials>'
                "<AccessKeyId>ASIAROLEKEY000000001</AccessKeyId>"
                f"<SecretAccessKey>{CANARIES['sts_secret']}</SecretAccessKey>"
                f"<SessionToken>{CANARIES['sts_token']}</SessionToken>"
                "<Expiration>2099-01-01T00:00:00Z</Expiration>"
                "</Credentials></AssumeRoleWithWebIdentityResult>"
                "</AssumeRoleWithWebIdentityResponse>"
            ),
        )

    app = web.Application()
    app.router.add_post("/", sts)
    return app


def token_app(token: str) -> web.Application:
    """A token endpoint (Google's, IMDS) issuing `token`, or failing under /fail."""

    async def issue(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"access_token": token, "expires_in": 3600})

    async def fail(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"error": "server_error"}, status=500)

    app = web.Application()
    app.router.add_route("*", "/token", issue)
    app.router.add_route("*", "/fail", fail)
    return app


def quiet_app() -> web.Application:
    """An upstream that answers without echoing what it got."""

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", ok)
    return app


async def test_no_cloud_secret_appears_anywhere(
    start_sidecar: StartSidecar, upstream: Any, tmp_path: Path, caplog: Any, closed_port: int
) -> None:
    caplog.set_level(logging.DEBUG, logger="sidecar")
    static = FakeBedrock(key_id="AKIASTATIC0000000001", secret=CANARIES["secret"])
    static.token = CANARIES["token"]
    role = FakeBedrock(key_id="ASIAROLEKEY000000001", secret=CANARIES["sts_secret"])
    role.token = CANARIES["sts_token"]
    receiver = Receiver()
    collector = await upstream(receiver.app())
    token_file = tmp_path / "oidc"
    token_file.write_text(CANARIES["oidc"])
    google = await upstream(token_app(CANARIES["google_token"]))
    imds = await upstream(token_app(CANARIES["azure_token"]))
    quiet = await upstream(quiet_app())
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    key = {
        "type": "service_account",
        "private_key": pem,
        "client_email": "a@p.iam.gserviceaccount.com",
        "token_uri": f"{google}/token",
    }
    (tmp_path / "key.json").write_text(json.dumps(key))
    (tmp_path / "bad-key.json").write_text(json.dumps({**key, "token_uri": f"{google}/fail"}))
    key_lines = [line for line in pem.splitlines() if "-----" not in line]
    arn = "arn:aws:iam::123456789012:role/agent"

    def web_identity(sts: str) -> str:
        return (
            f"{{type: aws_sigv4, service: bedrock, region: us-east-1, web_identity: "
            f"{{role_arn: '{arn}', token_file: {token_file}, sts_endpoint: '{sts}'}}}}"
        )

    keys = (
        "{type: aws_sigv4, service: bedrock, region: us-east-1, access_key_id: "
        "AKIASTATIC0000000001, secret_access_key: '${env:SECRET}', "
        "session_token: '${env:TOKEN}'}"
    )
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          static:
            upstream: {await upstream(static.app())}
            auth: {keys}
            mode: record
            llm: {{api: anthropic}}
          static-down:
            upstream: http://127.0.0.1:{closed_port}
            auth: {keys}
          role:
            upstream: {await upstream(role.app())}
            auth: {web_identity(await upstream(sts_app(fail=False)))}
          role-refused:
            upstream: {await upstream(role.app())}
            auth: {web_identity(await upstream(sts_app(fail=True)))}
          google:
            upstream: {quiet}
            auth: {{type: gcp, credentials: "${{file:{tmp_path / "key.json"}}}"}}
          google-refused:
            upstream: {quiet}
            auth: {{type: gcp, credentials: "${{file:{tmp_path / "bad-key.json"}}}"}}
          azure:
            upstream: {quiet}
            auth: {{type: azure, scope: x/.default, managed_identity: {{endpoint: "{imds}/token"}}}}
          azure-refused:
            upstream: {quiet}
            auth: {{type: azure, scope: x/.default, managed_identity: {{endpoint: "{imds}/fail"}}}}
        """,
        env={
            "SECRET": CANARIES["secret"],
            "TOKEN": CANARIES["token"],
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector,
        },
    )
    seen: list[str] = []
    async with aiohttp.ClientSession() as http:
        for service, status in (
            ("static", 200),
            ("static-down", 502),
            ("role", 200),
            ("role-refused", 502),
            ("google", 200),
            ("google-refused", 502),
            ("azure", 200),
            ("azure-refused", 502),
        ):
            url = f"{sidecar.url}/{service}/model/{MODEL}/invoke"
            async with http.post(url, json={"messages": []}) as resp:
                assert resp.status == status, await resp.text()
                seen.append(str(dict(resp.headers)))
                seen.append(await resp.text())  # no echo here: every body may be searched
        for path in ("/config", "/services", "/metrics"):
            async with http.get(f"{sidecar.admin}{path}") as resp:
                assert resp.status == 200
                seen.append(await resp.text())
    assert static.refused == [] and role.refused == []
    assert await asyncio.to_thread(sidecar.sidecar.telemetry.force_flush)
    assert receiver.spans
    seen.extend(repr(span) for span in receiver.spans)
    cassettes = [p for p in sidecar.policies.rglob("*") if p.is_file() and "cassettes" in p.parts]
    assert cassettes  # the recording was written, and is searched
    seen.extend(p.read_text(errors="replace") for p in cassettes)
    seen.append(repr(sidecar.sidecar.policy))
    seen.append(caplog.text)
    everything = "\n".join(seen)
    assert "auth_failed" in everything and "InvalidIdentityToken" in everything
    assert [name for name, value in CANARIES.items() if value in everything] == []
    assert [line for line in key_lines if line in everything] == []
