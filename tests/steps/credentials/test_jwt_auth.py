"""JWT minting: the upstream verifies what the sidecar signed, with pyjwt and the public key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from multidict import CIMultiDict

from sidecar.cli import main as cli_main
from sidecar.core.call import Call
from sidecar.policy.models import JwtAuth
from sidecar.steps.credentials.jwt_auth import MintJwt

HS_KEY = "a-shared-secret-of-at-least-32-bytes!!"


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def verifying_app(key: Any, algorithm: str, header: str = "Authorization") -> web.Application:
    """An upstream that accepts only tokens it can verify, and echoes their header and claims."""

    async def handle(request: web.Request) -> web.Response:
        value = request.headers.get(header, "")
        if not value.startswith("Bearer "):
            return web.json_response({"error": "no bearer"}, status=401)
        token = value.removeprefix("Bearer ")
        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], audience="api://upstream", issuer="sidecar"
            )
        except jwt.InvalidTokenError as exc:
            return web.json_response({"error": str(exc)}, status=401)
        return web.json_response({"header": jwt.get_unverified_header(token), "claims": claims})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def policy(base: str, algorithm: str, key_ref: str, extra: str = "") -> str:
    return f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth:
              type: jwt
              algorithm: {algorithm}
              key: {key_ref}
              kid: key-2024
              ttl: 2m
              claims: {{iss: sidecar, aud: "api://upstream", sub: agent-7, scope: [read, write]}}
              {extra}
        """


@pytest.mark.parametrize("algorithm", ["RS256", "ES256", "HS256"])
async def test_upstream_verifies_the_minted_jwt(
    algorithm, upstream, start_sidecar, client, tmp_path: Path
):
    if algorithm == "RS256":
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        secret, verify_with = pem(private), private.public_key()
    elif algorithm == "ES256":
        ec_key = ec.generate_private_key(ec.SECP256R1())
        secret, verify_with = pem(ec_key), ec_key.public_key()
    else:
        secret, verify_with = HS_KEY, HS_KEY
    key_file = tmp_path / "jwt.key"
    key_file.write_text(secret)
    base = await upstream(verifying_app(verify_with, algorithm))
    sc = await start_sidecar(policy(base, algorithm, f"${{file:{key_file}}}"))

    # Whatever the agent sent in the header is replaced by the minted token.
    async with client.get(f"{sc.url}/api/x", headers={"Authorization": "Bearer forged"}) as r:
        assert r.status == 200, await r.text()
        first = await r.json()
    async with client.get(f"{sc.url}/api/y") as r:
        assert r.status == 200
        second = await r.json()

    assert first["header"]["kid"] == "key-2024"
    assert first["header"]["alg"] == algorithm
    claims = first["claims"]
    assert claims["sub"] == "agent-7"
    assert claims["scope"] == ["read", "write"]
    assert claims["exp"] - claims["iat"] == 120
    assert claims["jti"]
    # Cached: the second call carries the same token.
    assert second["claims"] == claims


async def test_custom_header(upstream, start_sidecar, client):
    base = await upstream(verifying_app(HS_KEY, "HS256", header="X-Service-Token"))
    sc = await start_sidecar(policy(base, "HS256", HS_KEY, extra="header: X-Service-Token"))
    async with client.get(f"{sc.url}/api/", headers={"X-Service-Token": "Bearer forged"}) as r:
        assert r.status == 200, await r.text()


def spec(**overrides: Any) -> JwtAuth:
    data: dict[str, Any] = {
        "type": "jwt",
        "algorithm": "HS256",
        "key": HS_KEY,
        "ttl": "100s",
        "claims": {"iss": "sidecar"},
    }
    data.update(overrides)
    return JwtAuth.model_validate(data)


async def test_reminted_only_near_expiry():
    now = [1_700_000_000.0]
    step = MintJwt(spec=spec(), clock=lambda: now[0])
    seen: list[str] = []

    async def next_(call: Call) -> Any:
        seen.append(call.headers["Authorization"])
        return None

    def call() -> Call:
        return Call(
            service="s", method="GET", target="/", headers=CIMultiDict(), body=None, agent=None
        )

    await step(call(), next_)
    now[0] += 79  # margin is min(20% of 100s, 30s) = 20s: still fine at 79s
    await step(call(), next_)
    now[0] += 2  # 81s: within 20s of expiry
    await step(call(), next_)

    assert seen[0] == seen[1]
    assert seen[2] != seen[1]
    claims = [
        jwt.decode(
            s.removeprefix("Bearer "), HS_KEY, algorithms=["HS256"], options={"verify_exp": False}
        )
        for s in seen
    ]
    assert claims[0]["iat"] == 1_700_000_000
    assert claims[0]["exp"] == 1_700_000_100
    assert claims[2]["iat"] == 1_700_000_081
    assert claims[2]["jti"] != claims[0]["jti"]


def write_policy(directory: Path, auth: str) -> None:
    directory.mkdir()
    (directory / "policy.yaml").write_text(
        "version: 1\nservices:\n  api:\n    upstream: http://127.0.0.1:9\n    auth:\n" + auth
    )


@pytest.mark.parametrize(
    ("auth", "line", "message"),
    [
        (
            "      type: jwt\n      algorithm: RS256\n      key: not-a-pem\n",
            8,
            "key is not an RSA private key in PEM, as RS256 needs",
        ),
        (
            "      type: jwt\n      algorithm: HS256\n      key: short\n",
            8,
            "The HMAC key is 5 bytes long",
        ),
        (
            f"      type: jwt\n      algorithm: HS256\n      key: {HS_KEY}\n"
            "      claims: {exp: 1}\n",
            9,
            "claims may not set exp",
        ),
    ],
)
def test_bad_key_or_claims_fail_validate_with_position(tmp_path, capsys, auth, line, message):
    directory = tmp_path / "p"
    write_policy(directory, auth)
    assert cli_main(["validate", str(directory)]) == 1
    err = capsys.readouterr().err
    assert f"policy.yaml:{line}:" in err
    assert message in err


def test_ec_key_on_the_wrong_curve_is_refused(tmp_path, capsys):
    key = pem(ec.generate_private_key(ec.SECP384R1()))
    directory = tmp_path / "p"
    write_policy(
        directory, f"      type: jwt\n      algorithm: ES256\n      key: {json.dumps(key)}\n"
    )
    assert cli_main(["validate", str(directory)]) == 1
    err = capsys.readouterr().err
    assert "policy.yaml:8:" in err
    assert "secp384r1" in err and "does not match" in err
    assert "PRIVATE KEY" not in err


def test_key_references_are_checked_when_resolved(tmp_path, capsys):
    key_file = tmp_path / "jwt.key"
    key_file.write_text("-----BEGIN PRIVATE KEY-----\nbroken\n-----END PRIVATE KEY-----\n")
    directory = tmp_path / "p"
    write_policy(
        directory, f"      type: jwt\n      algorithm: RS256\n      key: ${{file:{key_file}}}\n"
    )
    # CI without the production secrets: the reference's form is all that can be checked.
    assert cli_main(["validate", str(directory)]) == 0
    assert cli_main(["validate", "--resolve-secrets", str(directory)]) == 1
    err = capsys.readouterr().err
    assert "policy.yaml:8:" in err
    assert "key is not an RSA private key in PEM, as RS256 needs" in err
    assert "broken" not in err
