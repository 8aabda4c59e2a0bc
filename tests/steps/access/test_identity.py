"""Verified agent identity through the real sidecar: JWTs against a real JWKS served on
loopback (with key rotation), per-agent API keys, and the credential never leaving."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from sidecar.engines import verdicts
from sidecar.engines.identity import Refused
from sidecar.engines.jwks import JwtVerifier
from sidecar.policy.access import JwtVerify
from sidecar.telemetry import access
from tests.conftest import Counting, echo_app
from tests.helpers import eventually

ISSUER = "https://issuer.test"
AUDIENCE = "agent-sidecar"
UPSTREAM_TOKEN = "upstream-secret-canary"
AGENT_KEY = "agent-key-canary-0123456789"
KEY_HASH = "sha256:" + hashlib.sha256(AGENT_KEY.encode()).hexdigest()


class SigningKey:
    def __init__(self, kind: str, kid: str) -> None:
        self.kid = kid
        self.private: Any
        if kind == "RS256":
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.jwk = jwt.algorithms.RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif kind == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            self.jwk = jwt.algorithms.ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = ed25519.Ed25519PrivateKey.generate()
            self.jwk = jwt.algorithms.OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.alg = kind
        self.jwk["kid"] = kid

    def token(self, sub: str = "research-bot", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, self.private, algorithm=self.alg, headers={"kid": self.kid})

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict[str, Any], claims: dict[str, Any], sign: bytes | None) -> str:
    """A token put together by hand: pyjwt itself refuses to make these."""
    head = _b64(json.dumps(header).encode()) + "." + _b64(json.dumps(claims).encode())
    signature = b"" if sign is None else hmac.new(sign, head.encode(), "sha256").digest()
    return head + "." + _b64(signature)


class Jwks:
    """The issuer's key set on loopback; `keys` can be swapped to rotate."""

    def __init__(self, *keys: SigningKey) -> None:
        self.keys = list(keys)
        self.extra: list[dict[str, Any]] = []  # raw JWKs served as they are
        self.fetches = 0

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.fetches += 1
            return web.json_response({"keys": [k.jwk for k in self.keys] + self.extra})

        app = web.Application()
        app.router.add_get("/jwks.json", handle)
        return app


def policy(base: str, jwks: str, *, extra: str = "", allow: str = "") -> str:
    return f"""
        version: 1
        agents:
          verify:
            type: jwt
            jwks: {jwks}
            issuer: {ISSUER}
            audience: {AUDIENCE}
            min_refresh: 0s
          keys:
            ci-bot: {KEY_HASH}
        {allow}
        services:
          api:
            upstream: {base}
            auth: {{type: bearer, token: {UPSTREAM_TOKEN}}}
        {extra}
        """


@pytest.fixture(scope="module")
def rsa_key() -> SigningKey:
    return SigningKey("RS256", "rsa-1")


async def test_tokens_of_every_key_type_name_the_agent_and_never_reach_the_upstream(
    upstream, start_sidecar, client, caplog, rsa_key
):
    es, ed = SigningKey("ES256", "ec-1"), SigningKey("EdDSA", "ed-1")
    issuer = Jwks(rsa_key, es, ed)
    jwks = await upstream(issuer.app())
    api = await upstream(echo_app())
    sc = await start_sidecar(policy(api, f"{jwks}/jwks.json"), env={"SIDECAR_ACCESS_LOG": "1"})
    tokens = {
        "rs": rsa_key.token(sub="rs-agent"),
        "es": es.token(sub="es-agent"),
        "ed": ed.token(sub="ed-agent"),
    }
    caplog.set_level(logging.DEBUG)  # every logger, every level: nothing may show a token
    with caplog.at_level(logging.INFO, logger=access.LOGGER):
        for name, token in tokens.items():
            headers = {"X-Agent-Token": token, "X-Agent-Id": "impostor"}
            async with client.get(f"{sc.url}/api/x", headers=headers) as r:
                assert r.status == 200, await r.text()
                seen = (await r.json())["headers"]
            assert "X-Agent-Token" not in seen, name
            assert "X-Agent-Id" not in seen
            assert seen["Authorization"] == f"Bearer {UPSTREAM_TOKEN}"
            assert token not in json.dumps(seen)
        # `Bearer <jwt>` in the credential header is accepted too.
        bearer = {"X-Agent-Token": f"Bearer {tokens['rs']}"}
        async with client.get(f"{sc.url}/api/x", headers=bearer) as r:
            assert r.status == 200
    agents = [
        json.loads(r.getMessage())["agent"] for r in caplog.records if r.name == access.LOGGER
    ]
    # The verified subject, never the self-declared X-Agent-Id.
    assert agents == ["rs-agent", "es-agent", "ed-agent", "rs-agent"]
    assert issuer.fetches == 1  # fetched once, then cached

    logged = "\n".join(r.getMessage() for r in caplog.records)
    async with client.get(f"{sc.admin}/config") as r:
        config = await r.json()
        logged += json.dumps(config)
    # Enough of a key's hash to tell keys apart, not enough to test guesses against.
    assert config["agents"]["keys"] == {"ci-bot": KEY_HASH[:19] + "..."}
    assert KEY_HASH not in logged
    async with client.get(f"{sc.admin}/services") as r:
        logged += await r.text()
    async with client.get(f"{sc.admin}/metrics") as r:
        logged += await r.text()
    for token in tokens.values():
        assert token not in logged
    assert AGENT_KEY not in logged
    assert UPSTREAM_TOKEN not in logged


async def test_bad_tokens_are_refused_with_401_and_never_reach_the_upstream(
    upstream, start_sidecar, client, rsa_key
):
    issuer = Jwks(rsa_key)
    # A symmetric key in the set must never verify anything: the set is public.
    oct_secret = b"a-shared-secret-published-by-mistake"
    issuer.extra = [{"kty": "oct", "kid": "oct-1", "k": _b64(oct_secret), "alg": "HS256"}]
    jwks = await upstream(issuer.app())
    counting = Counting()
    api = await upstream(counting.app())
    sc = await start_sidecar(policy(api, f"{jwks}/jwks.json"))
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "x", "exp": now + 300}
    stranger = SigningKey("RS256", "rsa-1")  # same kid, another key
    cases = {
        "expired": rsa_key.token(exp=now - 3600, iat=now - 7200),
        "wrong audience": rsa_key.token(aud="someone-else"),
        "wrong issuer": rsa_key.token(iss="https://evil.test"),
        "no exp": rsa_key.token(exp=None),
        "alg none": forged({"alg": "none", "kid": "rsa-1"}, claims, None),
        "HS256 keyed with the RSA public key": forged(
            {"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}, claims, rsa_key.public_pem()
        ),
        "unknown kid": SigningKey("ES256", "nobody").token(),
        "HS256 with the set's oct key": forged(
            {"alg": "HS256", "kid": "oct-1"}, claims, oct_secret
        ),
        "signed by another key": stranger.token(),
        "not a token": "hello",
        "alg not a string": forged({"alg": ["RS256"], "kid": "rsa-1"}, claims, None),
        "kid not a string": forged({"alg": "RS256", "kid": 1}, claims, None),
        "no sub": rsa_key.token(sub=None),
    }
    for case, token in cases.items():
        async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": token}) as r:
            assert r.status == 401, case
            assert r.headers["X-Sidecar-Error"] == "unauthenticated", case
            assert r.headers["Content-Type"] == "application/problem+json"
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            problem = await r.json()
            assert problem["reason"] == "unauthenticated"
            assert problem["service"] == "api"
            assert token not in problem["detail"], case
    # No credential at all, or only a self-declared name.
    for headers in ({}, {"X-Agent-Id": "research-bot"}, {"Authorization": rsa_key.token()}):
        async with client.get(f"{sc.url}/api/x", headers=headers) as r:
            assert r.status == 401
            assert "X-Agent-Token" in (await r.json())["detail"]
    assert counting.hits == 0


async def test_the_refusal_says_why(upstream, start_sidecar, client, rsa_key):
    jwks = await upstream(Jwks(rsa_key).app())
    sc = await start_sidecar(policy(await upstream(echo_app()), f"{jwks}/jwks.json"))
    why = {
        "expired": rsa_key.token(exp=int(time.time()) - 3600, iat=0),
        "aud": rsa_key.token(aud="other"),
        "iss": rsa_key.token(iss="https://other.test"),
        "algorithm": forged({"alg": "none"}, {}, None),
    }
    for words, token in why.items():
        async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": token}) as r:
            assert words in (await r.json())["detail"]


async def test_a_rotated_key_is_picked_up_without_a_restart(
    upstream, start_sidecar, client, rsa_key
):
    issuer = Jwks(rsa_key)
    jwks = await upstream(issuer.app())
    sc = await start_sidecar(policy(await upstream(echo_app()), f"{jwks}/jwks.json"))
    old_token = rsa_key.token()
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": old_token}) as r:
        assert r.status == 200
    # The issuer rotates: a new key in, the old one out.
    new = SigningKey("ES256", "ec-2")
    issuer.keys = [new]
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": new.token()}) as r:
        assert r.status == 200, await r.text()
    # The old key left the set: its tokens (even one verified before) prove nothing now.
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": old_token}) as r:
        assert r.status == 401
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": rsa_key.token()}) as r:
        assert r.status == 401


async def test_api_keys_name_their_agent(upstream, start_sidecar, client, caplog, rsa_key):
    jwks = await upstream(Jwks(rsa_key).app())
    api = await upstream(echo_app())
    sc = await start_sidecar(policy(api, f"{jwks}/jwks.json"), env={"SIDECAR_ACCESS_LOG": "1"})
    with caplog.at_level(logging.INFO, logger=access.LOGGER):
        for value in (AGENT_KEY, f"Bearer {AGENT_KEY}"):
            async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": value}) as r:
                assert r.status == 200
                assert AGENT_KEY not in await r.text()
        async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": AGENT_KEY + "x"}) as r:
            assert r.status == 401
        # Two credentials: which one would count is ambiguous, so neither does.
        headers = [("X-Agent-Token", AGENT_KEY), ("X-Agent-Token", rsa_key.token())]
        async with client.get(f"{sc.url}/api/x", headers=headers) as r:
            assert r.status == 401
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == access.LOGGER]
    assert [line["agent"] for line in lines] == ["ci-bot", "ci-bot", None, None]
    assert AGENT_KEY not in "\n".join(r.getMessage() for r in caplog.records)


async def test_keys_alone_need_no_jwks(upstream, start_sidecar, client):
    api = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        agents:
          credential_header: Authorization
          keys: {{ci-bot: "{KEY_HASH}"}}
        services:
          api: {{upstream: "{api}"}}
        """
    )
    # With Authorization as the credential header, an SDK's api_key works as is.
    headers = {"Authorization": f"Bearer {AGENT_KEY}"}
    async with client.get(f"{sc.url}/api/x", headers=headers) as r:
        assert r.status == 200
        assert "Authorization" not in (await r.json())["headers"]
    async with client.get(f"{sc.url}/api/x", headers={"Authorization": "Bearer nope"}) as r:
        assert r.status == 401
        assert "not one of agents.keys" in (await r.json())["detail"]


async def test_an_unreachable_jwks_is_the_sidecars_failure(
    upstream, start_sidecar, client, closed_port, rsa_key
):
    sc = await start_sidecar(
        policy(await upstream(echo_app()), f"http://127.0.0.1:{closed_port}/jwks.json")
    )
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": rsa_key.token()}) as r:
        assert r.status == 502
        assert r.headers["X-Sidecar-Error"] == "auth_failed"
    # An API key does not need the key set.
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": AGENT_KEY}) as r:
        assert r.status == 200


async def test_a_jwks_file_rotates_with_a_reload(upstream, start_sidecar, client, tmp_path):
    first, second = SigningKey("EdDSA", "ed-a"), SigningKey("EdDSA", "ed-b")
    keyset = tmp_path / "jwks.json"
    keyset.write_text(json.dumps({"keys": [first.jwk]}))
    sc = await start_sidecar(policy(await upstream(echo_app()), f"${{file:{keyset}}}"), watch=True)
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": first.token()}) as r:
        assert r.status == 200
    tmp = tmp_path / "jwks.tmp"
    tmp.write_text(json.dumps({"keys": [second.jwk]}))
    tmp.replace(keyset)

    async def rotated() -> bool:
        token = {"X-Agent-Token": second.token()}
        async with client.get(f"{sc.url}/api/x", headers=token) as r:
            return r.status == 200

    await eventually(rotated, "the rotated key file to be used")
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": first.token()}) as r:
        assert r.status == 401


# -- credentials proven before (engines/verdicts.py): remembered, never trusted past --


async def test_a_remembered_token_is_refused_once_past_its_exp(
    upstream, start_sidecar, client, rsa_key
):
    jwks = await upstream(Jwks(rsa_key).app())
    text = policy(await upstream(echo_app()), f"{jwks}/jwks.json")
    sc = await start_sidecar(
        text.replace("min_refresh: 0s", "min_refresh: 0s\n            leeway: 0s")
    )
    exp = int(time.time()) + 3
    token = {"X-Agent-Token": rsa_key.token(exp=exp)}
    for _ in range(2):  # verified, then answered from what was proven
        async with client.get(f"{sc.url}/api/x", headers=token) as r:
            assert r.status == 200, await r.text()
    # Past `exp` (wall clock, as the token's issuer counts it).
    await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
    async with client.get(f"{sc.url}/api/x", headers=token) as r:
        assert r.status == 401
        assert "expired" in (await r.json())["detail"]


async def test_a_key_removed_by_a_reload_stops_working_at_once(upstream, start_sidecar, client):
    new_key = "new-agent-key-canary"
    new_hash = "sha256:" + hashlib.sha256(new_key.encode()).hexdigest()
    text = f"""
        version: 1
        agents:
          keys:
            ci-bot: {KEY_HASH}
        services:
          api: {{upstream: "{await upstream(echo_app())}"}}
        """
    sc = await start_sidecar(text)
    for _ in range(2):
        async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": AGENT_KEY}) as r:
            assert r.status == 200
    sc.write("policy.yaml", text.replace(f"ci-bot: {KEY_HASH}", f"new-bot: {new_hash}"))
    assert (await sc.sidecar.reload("test")).ok
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": AGENT_KEY}) as r:
        assert r.status == 401
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Token": new_key}) as r:
        assert r.status == 200


async def test_each_credential_is_judged_on_its_own(
    upstream, start_sidecar, client, caplog, rsa_key
):
    """A proven credential vouches for itself only: a token one byte off, another agent's
    token or key, each gets its own verdict, whatever was proven just before."""
    jwks = await upstream(Jwks(rsa_key).app())
    api = await upstream(echo_app())
    sc = await start_sidecar(policy(api, f"{jwks}/jwks.json"), env={"SIDECAR_ACCESS_LOG": "1"})
    token = rsa_key.token(sub="first")
    head, claims, signature = token.split(".")
    flipped = "A" if signature[-2] != "A" else "B"
    tampered = f"{head}.{claims}.{signature[:-2]}{flipped}{signature[-1]}"
    payload = json.loads(base64.urlsafe_b64decode(claims + "=="))
    payload["sub"] = "second"
    swapped = f"{head}.{_b64(json.dumps(payload).encode())}.{signature}"
    calls = [
        (token, 200),
        (tampered, 401),
        (swapped, 401),
        (f"Bearer {token}", 200),
        (rsa_key.token(sub="second"), 200),
        (AGENT_KEY, 200),
        (AGENT_KEY + "x", 401),
        (AGENT_KEY[:-1], 401),
        (token, 200),
    ]
    with caplog.at_level(logging.INFO, logger=access.LOGGER):
        for _ in range(2):  # first judged, then again with every proven one remembered
            for credential, status in calls:
                headers = {"X-Agent-Token": credential}
                async with client.get(f"{sc.url}/api/x", headers=headers) as r:
                    assert r.status == status, credential
    agents = [
        json.loads(r.getMessage())["agent"] for r in caplog.records if r.name == access.LOGGER
    ]
    once = ["first", None, None, "first", "second", "ci-bot", None, None, "first"]
    assert agents == once * 2


def test_remembered_credentials_are_bounded_oldest_out():
    remembered = verdicts.Verdicts()
    far = time.time() + 3600
    for i in range(verdicts.VERDICTS + 10):
        remembered.put(f"credential-{i}", f"agent-{i}", far)
    assert len(remembered) == verdicts.VERDICTS
    assert remembered.get("credential-0") is None
    assert remembered.get("credential-9") is None
    assert remembered.get("credential-10") == "agent-10"
    last = verdicts.VERDICTS + 9
    assert remembered.get(f"credential-{last}") == f"agent-{last}"
    remembered.put("credential-10", "agent-10", far)  # already in: nothing else leaves
    assert remembered.get("credential-11") == "agent-11"
    remembered.put("past", "agent", time.time() - 1)
    assert remembered.get("past") is None


# -- the key set cache, with an injected clock --------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def spec(jwks: str, **extra: Any) -> JwtVerify:
    return JwtVerify.model_validate(
        {"type": "jwt", "jwks": jwks, "issuer": ISSUER, "audience": AUDIENCE, **extra}
    )


async def test_unknown_kids_fetch_at_most_once_per_min_refresh(upstream, rsa_key):
    issuer = Jwks(rsa_key)
    jwks = await upstream(issuer.app())
    clock = FakeClock()
    verifier = JwtVerifier(spec(f"{jwks}/jwks.json", min_refresh="30s"), clock=clock)
    assert await verifier.verify(rsa_key.token(sub="a")) == "a"
    assert issuer.fetches == 1
    for i in range(5):
        with pytest.raises(Refused):
            await verifier.verify(SigningKey("ES256", f"made-up-{i}").token())
    assert issuer.fetches == 1  # within min_refresh: made-up kids fetch nothing
    clock.now += 31
    with pytest.raises(Refused):
        await verifier.verify(SigningKey("ES256", "made-up").token())
    assert issuer.fetches == 2
    verifier.retire()


async def test_an_old_key_set_is_fetched_again_in_the_background(upstream, rsa_key):
    issuer = Jwks(rsa_key)
    jwks = await upstream(issuer.app())
    clock = FakeClock()
    verifier = JwtVerifier(spec(f"{jwks}/jwks.json", cache="10m"), clock=clock)
    token = rsa_key.token()
    await verifier.verify(token)
    clock.now += 601
    await verifier.verify(rsa_key.token(sub="other"))  # answered from the keys it has
    await eventually(lambda: issuer.fetches == 2, "the background fetch")
    verifier.retire()


async def test_a_refresh_that_finds_the_same_keys_keeps_what_they_proved(upstream, rsa_key):
    # The cache is shared with the agent keys' verdicts: emptying it on every periodic
    # refresh made every agent prove itself again (hash or signature) for nothing.
    issuer = Jwks(rsa_key)
    jwks = await upstream(issuer.app())
    clock = FakeClock()
    proven = verdicts.Verdicts()
    verifier = JwtVerifier(spec(f"{jwks}/jwks.json", cache="10m"), clock=clock, verdicts=proven)
    token = rsa_key.token()
    assert await verifier.verify(token) == "research-bot"
    assert proven.get(token) == "research-bot"
    clock.now += 601
    await verifier.verify(rsa_key.token(sub="other"))
    await eventually(lambda: issuer.fetches == 2, "the background fetch")
    assert proven.get(token) == "research-bot"
    verifier.retire()


async def test_a_large_key_set_is_read_whole_and_a_huge_one_refused(
    upstream, start_sidecar, client, rsa_key
):
    padding = [{"kty": "none-such", "kid": f"pad-{i}", "x": "y" * 100} for i in range(1000)]
    issuer = Jwks(rsa_key)
    issuer.extra = padding  # about 130 KB: more than one read of the stream
    big = await upstream(issuer.app())
    huge_issuer = Jwks(rsa_key)
    huge_issuer.extra = padding * 10  # over 1 MiB
    huge = await upstream(huge_issuer.app())
    api = await upstream(echo_app())
    token = {"X-Agent-Token": rsa_key.token()}
    sc = await start_sidecar(policy(api, f"{big}/jwks.json"))
    async with client.get(f"{sc.url}/api/x", headers=token) as r:
        assert r.status == 200
    sc = await start_sidecar(policy(api, f"{huge}/jwks.json"))
    async with client.get(f"{sc.url}/api/x", headers=token) as r:
        assert r.status == 502


async def test_per_agent_limits_count_the_verified_agent(upstream, start_sidecar, client):
    other = "second-agent-key"
    api = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        agents:
          keys:
            ci-bot: {KEY_HASH}
            other-bot: sha256:{hashlib.sha256(other.encode()).hexdigest()}
        services:
          api:
            upstream: {api}
            rate_limit: {{rate: 1/h, burst: 1, per: agent}}
        """
    )
    calls = [
        ({"X-Agent-Token": AGENT_KEY}, 200),
        # A new self-declared name is no new bucket: the key names the agent.
        ({"X-Agent-Token": AGENT_KEY, "X-Agent-Id": "fresh-name"}, 429),
        ({"X-Agent-Token": other}, 200),
    ]
    for headers, status in calls:
        async with client.get(f"{sc.url}/api/x", headers=headers) as r:
            assert r.status == status, headers
