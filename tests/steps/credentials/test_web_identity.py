"""Web identity credentials against a fake STS on loopback, with an injected clock."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from sidecar.core.problems import ProblemError
from sidecar.policy.cloud import WebIdentity
from sidecar.steps.credentials import aws
from sidecar.steps.credentials.aws import WebIdentityCredentials

ARN = "arn:aws:iam::123456789012:role/agent"


class FakeSts:
    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.fail: str | None = None

    def app(self) -> web.Application:
        async def sts(request: web.Request) -> web.Response:
            form = await request.post()
            assert form["Action"] == "AssumeRoleWithWebIdentity"
            assert form["RoleArn"] == ARN and form["DurationSeconds"] == "900"
            self.tokens.append(str(form["WebIdentityToken"]))
            if self.fail is not None:
                return web.Response(
                    status=403,
                    content_type="text/xml",
                    text=f"<ErrorResponse><Error><Code>{self.fail}</Code></Error></ErrorResponse>",
                )
            n = len(self.tokens)
            return web.Response(
                content_type="text/xml",
                text="<AssumeRoleWithWebIdentityResponse><AssumeRoleWithWebIdentityResult>"
                f"<Credentials><AccessKeyId>ASIA{n}</AccessKeyId>"
                f"<SecretAccessKey>secret-{n}</SecretAccessKey><SessionToken>token-{n}"
                "</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials>"
                "</AssumeRoleWithWebIdentityResult></AssumeRoleWithWebIdentityResponse>",
            )

        app = web.Application()
        app.router.add_post("/", sts)
        return app


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


async def source(
    upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[WebIdentityCredentials, FakeSts, Clock, Path]:
    sts = FakeSts()
    base = await upstream(sts.app())
    clock = Clock()
    monkeypatch.setattr(aws, "CLOCK", clock)
    token = tmp_path / "token"
    token.write_text("oidc-1\n")
    spec = WebIdentity(
        role_arn=ARN,
        token_file=str(token),
        sts_endpoint=base,
        duration="15m",
        refresh_before="5m",
    )
    return WebIdentityCredentials(service="s3", spec=spec, region="us-east-1"), sts, clock, token


async def test_renewed_before_expiry_with_the_rotated_token(
    upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds, sts, clock, token = await source(upstream, tmp_path, monkeypatch)
    first = await creds.get()
    assert (first.access_key, first.secret, first.token) == ("ASIA1", "secret-1", "token-1")
    # Expiration says 2099 (counted from when STS was asked): 100 s before it, inside
    # refresh_before (5 minutes), not expired.
    clock.now = datetime(2099, 1, 1, tzinfo=UTC).timestamp() - time.time() - 100
    token.write_text("oidc-2\n")  # the kubelet rotated the projected token
    assert creds.fresh() is None
    assert (await creds.get()).access_key == "ASIA1"  # still valid: renewed behind the call
    await asyncio.sleep(0.2)
    assert (await creds.get()).access_key == "ASIA2"
    assert sts.tokens == ["oidc-1", "oidc-2"]
    creds.retire()


async def test_sts_refusal_is_auth_failed_with_its_code(
    upstream: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds, sts, _, _ = await source(upstream, tmp_path, monkeypatch)
    sts.fail = "InvalidIdentityToken"
    with pytest.raises(ProblemError) as err:
        await creds.get()
    assert err.value.reason == "auth_failed"
    assert "STS answered HTTP 403 (InvalidIdentityToken)" in err.value.detail
    assert "oidc-1" not in err.value.detail
    creds.retire()
