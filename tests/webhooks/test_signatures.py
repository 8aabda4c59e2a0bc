"""Signatures: published vectors, the real `standardwebhooks` package, and every refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any

import pytest
import standardwebhooks
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from sidecar.policy.webhooks import Signing, Verify
from sidecar.webhooks.signatures import (
    Failure,
    SignatureError,
    Signer,
    build_verifier,
    lower_headers,
)

NOW = 1_700_000_000
SECRET = "whsec_" + base64.b64encode(b"a secret of 24 bytes....").decode()
OTHER = "whsec_" + base64.b64encode(b"another secret, rotated!").decode()


def verifier(**spec: Any) -> Any:
    return build_verifier(Verify.model_validate(spec), clock=lambda: NOW)


def refused(check: Any, headers: dict[str, str], body: bytes) -> Failure:
    with pytest.raises(SignatureError) as info:
        check.verify(lower_headers(headers), body)
    return info.value.failure


# --- Standard Webhooks -----------------------------------------------------------------


def test_the_standardwebhooks_package_verifies_what_we_sign() -> None:
    body = b'{"type": "invoice.paid", "data": {"id": 1}}'
    headers = Signer(Signing(secrets=[SECRET])).headers(
        "msg_1", int(datetime.now(UTC).timestamp()), body
    )
    assert standardwebhooks.Webhook(SECRET).verify(body, headers) == json.loads(body)


def test_we_verify_what_the_standardwebhooks_package_signs() -> None:
    body = b'{"type": "invoice.paid"}'
    when = datetime.fromtimestamp(NOW, UTC)
    signature = standardwebhooks.Webhook(SECRET).sign("msg_2", when, body.decode())
    headers = {"webhook-id": "msg_2", "webhook-timestamp": str(NOW), "webhook-signature": signature}
    verified = verifier(type="standard", secrets=[SECRET]).verify(lower_headers(headers), body)
    assert (verified.delivery_id, verified.event_type) == ("msg_2", "invoice.paid")


def test_standard_rotation_several_signatures_and_refusals() -> None:
    body = b'{"type": "a"}'
    signed = Signer(Signing(secrets=[OTHER])).headers("msg_3", NOW, body)
    # The receiver still holds the old secret first and the new one second.
    check = verifier(type="standard", secrets=[SECRET, OTHER])
    assert check.verify(signed, body).delivery_id == "msg_3"
    # A sender signing with both during its own rotation: several space-separated signatures.
    both = Signer(Signing(secrets=[SECRET, OTHER])).headers("msg_3", NOW, body)
    assert len(both["webhook-signature"].split()) == 2
    assert verifier(type="standard", secrets=[OTHER]).verify(both, body)
    assert refused(check, signed, body + b" ") is Failure.mismatch
    assert refused(verifier(type="standard", secrets=[SECRET]), signed, body) is Failure.mismatch
    stale = Signer(Signing(secrets=[OTHER])).headers("msg_3", NOW - 301, body)
    assert refused(check, stale, body) is Failure.stale
    future = Signer(Signing(secrets=[OTHER])).headers("msg_3", NOW + 301, body)
    assert refused(check, future, body) is Failure.stale
    for header in ("webhook-id", "webhook-timestamp", "webhook-signature"):
        partial = {k: v for k, v in signed.items() if k != header}
        assert refused(check, partial, body) is Failure.missing
    # A wider tolerance lets the same old timestamp through.
    assert verifier(type="standard", secrets=[OTHER], tolerance="10m").verify(stale, body)


def test_standard_v1a_ed25519() -> None:
    private = Ed25519PrivateKey.generate()
    raw_private = private.private_bytes_raw()
    raw_public = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    whsk = "whsk_" + base64.b64encode(raw_private).decode()
    whpk = "whpk_" + base64.b64encode(raw_public).decode()
    body = b'{"type": "x"}'
    signed = Signer(Signing(type="ed25519", secrets=[whsk])).headers("msg_4", NOW, body)
    assert signed["webhook-signature"].startswith("v1a,")
    assert verifier(type="standard", secrets=[SECRET, whpk]).verify(signed, body)
    assert refused(verifier(type="standard", secrets=[whpk]), signed, b"{}") is Failure.mismatch
    # An HMAC secret never accepts an ed25519 signature, nor the other way round.
    assert refused(verifier(type="standard", secrets=[SECRET]), signed, body) is Failure.mismatch


# --- GitHub ----------------------------------------------------------------------------

GITHUB_SECRET = "It's a Secret to Everybody"
GITHUB_SIGNATURE = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17"


def test_github_published_test_vector() -> None:
    headers = {
        "X-Hub-Signature-256": GITHUB_SIGNATURE,
        "X-GitHub-Delivery": "72d3162e-cc78-11e3-81ab-4c9367dc0958",
        "X-GitHub-Event": "push",
    }
    check = verifier(type="github", secrets=["old secret", GITHUB_SECRET])
    verified = check.verify(lower_headers(headers), b"Hello, World!")
    assert verified.delivery_id == "72d3162e-cc78-11e3-81ab-4c9367dc0958"
    assert verified.event_type == "push"
    assert refused(check, headers, b"Hello, World?") is Failure.mismatch
    assert refused(verifier(type="github", secrets=["nope"]), headers, b"Hello, World!") is (
        Failure.mismatch
    )
    assert refused(check, {}, b"Hello, World!") is Failure.missing
    sha1 = {"X-Hub-Signature-256": "sha1=" + "0" * 40}
    assert refused(check, sha1, b"Hello, World!") is Failure.malformed


# --- Stripe ----------------------------------------------------------------------------

STRIPE_SECRET = "whsec_test_secret"


def stripe_header(body: bytes, t: int, secret: str = STRIPE_SECRET) -> str:
    # As Stripe's docs describe it: HMAC-SHA256 of "{t}.{payload}" with the endpoint secret.
    v1 = hmac.new(secret.encode(), f"{t}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={t},v1={v1},v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39"


def test_stripe() -> None:
    body = b'{\n  "id": "evt_test_webhook",\n  "object": "event",\n  "type": "charge.succeeded"\n}'
    check = verifier(type="stripe", secrets=[STRIPE_SECRET])
    verified = check.verify({"stripe-signature": stripe_header(body, NOW)}, body)
    assert (verified.delivery_id, verified.event_type) == ("evt_test_webhook", "charge.succeeded")
    # Several v1 entries (Stripe sends one per active secret while rolling).
    rolled = stripe_header(body, NOW, "whsec_old") + "," + stripe_header(body, NOW).split(",")[1]
    assert check.verify({"stripe-signature": rolled}, body)
    assert refused(check, {"Stripe-Signature": stripe_header(body, NOW - 400)}, body) is (
        Failure.stale
    )
    assert refused(check, {"Stripe-Signature": stripe_header(body, NOW, "whsec_x")}, body) is (
        Failure.mismatch
    )
    assert refused(check, {"Stripe-Signature": stripe_header(body, NOW)}, body + b"\n") is (
        Failure.mismatch
    )
    assert refused(check, {"Stripe-Signature": "v1=abc"}, body) is Failure.malformed


# --- Slack -----------------------------------------------------------------------------

# The example of Slack's "Verifying requests from Slack" page.
SLACK_SECRET = "8f742231b10e8888abcd99yyyzzz85a5"
SLACK_BODY = (
    b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id="
    b"G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-"
    b"collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700"
    b"885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2"
    b"c447fce8b6703c"
)
SLACK_HEADERS = {
    "X-Slack-Request-Timestamp": "1531420618",
    "X-Slack-Signature": "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503",
}


def test_slack_documented_example() -> None:
    spec = Verify.model_validate({"type": "slack", "secrets": [SLACK_SECRET]})
    check = build_verifier(spec, clock=lambda: 1531420618 + 60)
    verified = check.verify(lower_headers(SLACK_HEADERS), SLACK_BODY)
    assert len(verified.delivery_id) == 64  # no event_id in a slash command: a digest
    assert refused(check, SLACK_HEADERS, SLACK_BODY + b"&x=1") is Failure.mismatch
    late = build_verifier(spec, clock=lambda: 1531420618 + 301)
    assert refused(late, SLACK_HEADERS, SLACK_BODY) is Failure.stale
    no_stamp = {"X-Slack-Signature": SLACK_HEADERS["X-Slack-Signature"]}
    assert refused(check, no_stamp, SLACK_BODY) is Failure.missing


def test_slack_events_api_id_and_type() -> None:
    body = b'{"type": "event_callback", "event_id": "Ev123", "event": {"type": "app_mention"}}'
    base = f"v0:{NOW}:".encode() + body
    signature = "v0=" + hmac.new(SLACK_SECRET.encode(), base, hashlib.sha256).hexdigest()
    headers = {"x-slack-request-timestamp": str(NOW), "x-slack-signature": signature}
    verified = verifier(type="slack", secrets=[SLACK_SECRET]).verify(headers, body)
    assert (verified.delivery_id, verified.event_type) == ("Ev123", "app_mention")


# --- generic HMAC ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithm", "encoding", "prefix"),
    [("sha256", "hex", ""), ("sha1", "base64", "sha1="), ("sha512", "hex", "v1=")],
)
def test_generic_hmac(algorithm: str, encoding: str, prefix: str) -> None:
    body = b'{"n": 1}'
    digest = hmac.new(b"k2", body, algorithm).digest()
    text = digest.hex() if encoding == "hex" else base64.b64encode(digest).decode()
    check = verifier(
        type="hmac",
        secrets=["k1", "k2"],
        header="X-Signature",
        algorithm=algorithm,
        encoding=encoding,
        prefix=prefix,
        id_header="X-Delivery",
        event_header="X-Event",
    )
    headers = {"X-Signature": prefix + text, "X-Delivery": "d-1", "X-Event": "thing.done"}
    verified = check.verify(lower_headers(headers), body)
    assert (verified.delivery_id, verified.event_type) == ("d-1", "thing.done")
    assert refused(check, headers, b'{"n": 2}') is Failure.mismatch
    assert refused(check, {"X-Delivery": "d-1"}, body) is Failure.missing
    no_id = verifier(
        type="hmac",
        secrets=["k2"],
        header="X-Signature",
        algorithm=algorithm,
        encoding=encoding,
        prefix=prefix,
    )
    assert (
        no_id.verify(lower_headers(headers), body).delivery_id == hashlib.sha256(body).hexdigest()
    )
