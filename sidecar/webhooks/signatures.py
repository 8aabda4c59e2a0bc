"""Webhook signatures: verifying what senders sign, signing what the sidecar sends.

Each verifier is built once from the policy (keys decoded at load) and then
checks a request's headers and raw body. Every secret of the list is tried,
so a sender can rotate its secret without downtime; comparisons are
constant-time; signed timestamps outside the tolerance are refused (replay).
A verifier also says what dedup and routing need: the sender's delivery id
and the event type.

Headers are passed as a mapping with lower-case names.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..policy.webhooks import Signing, Verify, standard_key

Clock = Callable[[], float]


class Failure(enum.Enum):
    """Why a signature was refused; never says which secret was close."""

    missing = "missing_signature"
    malformed = "malformed_signature"
    mismatch = "bad_signature"
    stale = "timestamp_out_of_tolerance"


class SignatureError(Exception):
    def __init__(self, failure: Failure, detail: str) -> None:
        super().__init__(detail)
        self.failure = failure
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Verified:
    delivery_id: str  # the sender's id of this delivery: dedup key
    event_type: str | None


class Verifier(Protocol):
    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified: ...


def body_digest(*parts: bytes) -> str:
    return hashlib.sha256(b"\0".join(parts)).hexdigest()


def _json(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None


def _required(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if not value:
        raise SignatureError(Failure.missing, f"the {name} header is missing")
    return value


def _check_timestamp(text: str, now: float, tolerance: float) -> int:
    try:
        stamp = int(text)
    except ValueError:
        raise SignatureError(Failure.malformed, "the signature timestamp is not a number") from None
    if abs(now - stamp) > tolerance:
        raise SignatureError(
            Failure.stale, f"the signature timestamp is more than {tolerance:g}s from now"
        )
    return stamp


def _any_equal(expected: list[bytes], given: list[bytes]) -> bool:
    # Every pair is compared, so the time taken does not tell which one matched.
    found = False
    for e in expected:
        for g in given:
            found |= hmac.compare_digest(e, g)
    return found


def _hex(text: str) -> bytes | None:
    try:
        return bytes.fromhex(text)
    except ValueError:
        return None


def _b64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


class StandardVerifier:
    """Standard Webhooks: v1 (HMAC-SHA256, whsec_) and v1a (ed25519, whpk_)."""

    def __init__(self, spec: Verify, clock: Clock) -> None:
        self._hmac_keys: list[bytes] = []
        self._public_keys: list[Ed25519PublicKey] = []
        for secret in spec.secrets:
            kind, raw = standard_key(secret.reveal())
            if kind == "whsec":
                self._hmac_keys.append(raw)
            else:
                self._public_keys.append(Ed25519PublicKey.from_public_bytes(raw))
        self._tolerance = spec.tolerance
        self._clock = clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        # Svix, the spec's origin, still sends svix-* names.
        msg_id = headers.get("webhook-id") or _required(headers, "svix-id")
        stamp = headers.get("webhook-timestamp") or _required(headers, "svix-timestamp")
        signatures = headers.get("webhook-signature") or _required(headers, "svix-signature")
        _check_timestamp(stamp, self._clock(), self._tolerance)
        content = f"{msg_id}.{stamp}.".encode() + body
        v1: list[bytes] = []
        v1a: list[bytes] = []
        for item in signatures.split():
            version, _, encoded = item.partition(",")
            raw = _b64(encoded)
            if raw is None:
                continue
            if version == "v1":
                v1.append(raw)
            elif version == "v1a":
                v1a.append(raw)
        expected = [hmac.new(k, content, hashlib.sha256).digest() for k in self._hmac_keys]
        ok = _any_equal(expected, v1)
        for key in self._public_keys:
            for signature in v1a:
                try:
                    key.verify(signature, content)
                    ok = True
                except InvalidSignature:
                    pass
        if not ok:
            raise SignatureError(Failure.mismatch, "no webhook-signature matches")
        event = _json(body)
        event_type = event.get("type") if isinstance(event, dict) else None
        return Verified(msg_id, event_type if isinstance(event_type, str) else None)


class GithubVerifier:
    """GitHub: X-Hub-Signature-256: sha256=<hex HMAC of the body>."""

    def __init__(self, spec: Verify) -> None:
        self._keys = [s.reveal().encode() for s in spec.secrets]

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        header = _required(headers, "x-hub-signature-256")
        scheme, _, digest = header.partition("=")
        given = _hex(digest)
        if scheme != "sha256" or given is None:
            raise SignatureError(Failure.malformed, "X-Hub-Signature-256 is not sha256=<hex>")
        expected = [hmac.new(k, body, hashlib.sha256).digest() for k in self._keys]
        if not _any_equal(expected, [given]):
            raise SignatureError(Failure.mismatch, "X-Hub-Signature-256 does not match")
        return Verified(
            headers.get("x-github-delivery") or body_digest(body), headers.get("x-github-event")
        )


class StripeVerifier:
    """Stripe: Stripe-Signature: t=<unix>,v1=<hex HMAC of 't.body'>[,v1=...]."""

    def __init__(self, spec: Verify, clock: Clock) -> None:
        # Stripe uses its whsec_ secret as text, not base64-decoded.
        self._keys = [s.reveal().encode() for s in spec.secrets]
        self._tolerance = spec.tolerance
        self._clock = clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        header = _required(headers, "stripe-signature")
        stamp = ""
        given: list[bytes] = []
        for item in header.split(","):
            key, _, value = item.strip().partition("=")
            if key == "t":
                stamp = value
            elif key == "v1" and (raw := _hex(value)) is not None:
                given.append(raw)
        if not stamp or not given:
            raise SignatureError(Failure.malformed, "Stripe-Signature has no t= or no v1=")
        _check_timestamp(stamp, self._clock(), self._tolerance)
        content = stamp.encode() + b"." + body
        expected = [hmac.new(k, content, hashlib.sha256).digest() for k in self._keys]
        if not _any_equal(expected, given):
            raise SignatureError(Failure.mismatch, "no Stripe-Signature v1 matches")
        event = _json(body)
        event = event if isinstance(event, dict) else {}
        event_id, event_type = event.get("id"), event.get("type")
        return Verified(
            event_id if isinstance(event_id, str) else body_digest(body),
            event_type if isinstance(event_type, str) else None,
        )


class SlackVerifier:
    """Slack: X-Slack-Signature: v0=<hex HMAC of 'v0:ts:body'>, X-Slack-Request-Timestamp."""

    def __init__(self, spec: Verify, clock: Clock) -> None:
        self._keys = [s.reveal().encode() for s in spec.secrets]
        self._tolerance = spec.tolerance
        self._clock = clock

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        header = _required(headers, "x-slack-signature")
        stamp = _required(headers, "x-slack-request-timestamp")
        version, _, digest = header.partition("=")
        given = _hex(digest)
        if version != "v0" or given is None:
            raise SignatureError(Failure.malformed, "X-Slack-Signature is not v0=<hex>")
        _check_timestamp(stamp, self._clock(), self._tolerance)
        content = b"v0:" + stamp.encode() + b":" + body
        expected = [hmac.new(k, content, hashlib.sha256).digest() for k in self._keys]
        if not _any_equal(expected, [given]):
            raise SignatureError(Failure.mismatch, "X-Slack-Signature does not match")
        event = _json(body)
        event = event if isinstance(event, dict) else {}
        # Events API bodies carry an event_id that Slack keeps across its retries;
        # other payloads (slash commands, forms) have none: hash what was signed.
        event_id = event.get("event_id")
        inner = event.get("event")
        event_type = inner.get("type") if isinstance(inner, dict) else event.get("type")
        return Verified(
            event_id if isinstance(event_id, str) else body_digest(stamp.encode(), body),
            event_type if isinstance(event_type, str) else None,
        )


class HmacVerifier:
    """Any HMAC of the raw body in one header: algorithm, hex/base64, optional prefix."""

    def __init__(self, spec: Verify) -> None:
        if spec.header is None:
            raise ValueError("type: hmac needs a header")  # the model refuses it already
        self._header = spec.header.lower()
        self._keys = [s.reveal().encode() for s in spec.secrets]
        self._algorithm = spec.algorithm
        self._decode = _hex if spec.encoding == "hex" else _b64
        self._prefix = spec.prefix
        self._id_header = spec.id_header.lower() if spec.id_header else None
        self._event_header = spec.event_header.lower() if spec.event_header else None

    def verify(self, headers: Mapping[str, str], body: bytes) -> Verified:
        header = _required(headers, self._header)
        if not header.startswith(self._prefix):
            raise SignatureError(Failure.malformed, f"the {self._header} header has no prefix")
        given = self._decode(header[len(self._prefix) :].strip())
        if given is None:
            raise SignatureError(Failure.malformed, f"the {self._header} header is not encoded")
        expected = [hmac.new(k, body, self._algorithm).digest() for k in self._keys]
        if not _any_equal(expected, [given]):
            raise SignatureError(Failure.mismatch, f"the {self._header} header does not match")
        delivery_id = headers.get(self._id_header) if self._id_header else None
        event_type = headers.get(self._event_header) if self._event_header else None
        return Verified(delivery_id or body_digest(body), event_type)


def build_verifier(spec: Verify, *, clock: Clock = time.time) -> Verifier:
    """The verifier for a policy's `verify:`; `clock` gives Unix seconds."""
    if spec.type == "standard":
        return StandardVerifier(spec, clock)
    if spec.type == "github":
        return GithubVerifier(spec)
    if spec.type == "stripe":
        return StripeVerifier(spec, clock)
    if spec.type == "slack":
        return SlackVerifier(spec, clock)
    return HmacVerifier(spec)


class Signer:
    """Signs outbound deliveries per Standard Webhooks, once per configured key."""

    def __init__(self, spec: Signing) -> None:
        self._hmac_keys: list[bytes] = []
        self._private_keys: list[Ed25519PrivateKey] = []
        for secret in spec.secrets:
            kind, raw = standard_key(secret.reveal())
            if kind == "whsec":
                self._hmac_keys.append(raw)
            else:
                self._private_keys.append(Ed25519PrivateKey.from_private_bytes(raw))

    def headers(self, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
        content = f"{msg_id}.{timestamp}.".encode() + body
        signatures = [
            "v1," + base64.b64encode(hmac.new(k, content, hashlib.sha256).digest()).decode()
            for k in self._hmac_keys
        ]
        signatures += [
            "v1a," + base64.b64encode(k.sign(content)).decode() for k in self._private_keys
        ]
        return {
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": " ".join(signatures),
        }


def lower_headers(headers: Mapping[str, str] | list[tuple[str, str]]) -> dict[str, str]:
    """Header names lower-cased once; of a repeated header the first value counts."""
    items = headers.items() if isinstance(headers, Mapping) else headers
    out: dict[str, str] = {}
    for name, value in items:
        out.setdefault(name.lower(), value)
    return out
