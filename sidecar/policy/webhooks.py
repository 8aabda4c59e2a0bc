"""The `webhooks:` part of the policy: inbound receivers and outbound endpoint groups.

Inbound: a path on the ingress listener, how its sender signs, and where each
event goes. Outbound: endpoint URLs that agents' events are signed for and
delivered to. Both share the durable queue's retry settings.
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import re
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .access import AllowRule
from .addresses import check_endpoint_url, check_not_own_listener
from .base import Duration, HeaderName, Model, RedisUrl, SecretStr, Size, _header_name
from .secrets import Secret, resolver_from_context

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Svix's schedule: immediately, then 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h.
DEFAULT_SCHEDULE = (0.0, 5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
VERIFY_TYPES = ("standard", "github", "stripe", "slack", "hmac")
# Keys that only a generic `type: hmac` verifier reads.
_HMAC_ONLY = ("header", "algorithm", "encoding", "prefix", "id_header", "event_header")


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    if parts.username is not None or parts.password is not None:
        raise ValueError("a delivery URL must not hold user:password")
    try:
        parts.port  # noqa: B018  (raises on a bad port)
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    return value


HttpUrl = Annotated[str, AfterValidator(_http_url)]


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str | dict) else value


def _unresolved(secret: Secret, info: ValidationInfo) -> bool:
    # `sidecar validate` without --resolve-secrets leaves references unread.
    return resolver_from_context(info.context).check_only and "${" in secret.source


def _b64(text: str) -> bytes:
    # Standard Webhooks secrets are often written without their base64 padding.
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def standard_key(secret: str) -> tuple[str, bytes]:
    """A Standard Webhooks key: ('whsec'|'whpk'|'whsk', raw bytes); ValueError if malformed."""
    kind, sep, encoded = secret.partition("_")
    if not sep or kind not in ("whsec", "whpk", "whsk"):
        raise ValueError("a Standard Webhooks key starts with whsec_, whpk_ or whsk_")
    try:
        raw = _b64(encoded)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {kind}_ is not base64") from None
    if kind != "whsec" and len(raw) != 32:
        raise ValueError(f"an ed25519 key ({kind}_) holds 32 bytes, this one {len(raw)}")
    if not raw:
        raise ValueError("the key is empty")
    return kind, raw


class ValueMatch(Model):
    """One test of a value; exactly one of the keys."""

    equals: str | int | float | bool | None = Field(default=None, description="Equal to this")
    glob: str | None = Field(default=None, description="Shell-style pattern: *, ?, [abc]")
    one_of: list[str | int | float | bool] | None = Field(
        default=None, description="Equal to any of these"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ValueMatch:
        given = [k for k in ("equals", "glob", "one_of") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of equals, glob, one_of")
        return self


def _plain_equals(value: Any) -> Any:
    # `event: push` is short for `event: {equals: push}`.
    return value if isinstance(value, dict) else {"equals": value}


class Match(Model):
    header: dict[str, ValueMatch] = Field(
        default_factory=dict, description="Request header name -> value test"
    )
    event: ValueMatch | None = Field(default=None, description="Test of the event type")
    pointer: dict[str, ValueMatch] = Field(
        default_factory=dict, description="JSON pointer into the body -> value test"
    )

    @field_validator("header", "pointer", mode="before")
    @classmethod
    def _plain_values(cls, v: Any) -> Any:
        return {k: _plain_equals(x) for k, x in v.items()} if isinstance(v, dict) else v

    @field_validator("event", mode="before")
    @classmethod
    def _plain_event(cls, v: Any) -> Any:
        return None if v is None else _plain_equals(v)

    @field_validator("header")
    @classmethod
    def _check_headers(cls, v: dict[str, ValueMatch]) -> dict[str, ValueMatch]:
        for name in v:
            _header_name(name)
        return v

    @field_validator("pointer")
    @classmethod
    def _check_pointers(cls, v: dict[str, ValueMatch]) -> dict[str, ValueMatch]:
        for pointer in v:
            if pointer and not pointer.startswith("/"):
                raise ValueError(f"JSON pointer {pointer!r} must start with '/' (RFC 6901)")
        return v


class Route(Model):
    name: str | None = Field(default=None, description="Shown in the admin view; default: route-N")
    match: Match = Field(default_factory=Match, description="All tests must hold; empty: any event")
    deliver_to: list[HttpUrl] = Field(min_length=1, description="Local targets, each gets a copy")

    @field_validator("deliver_to", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _one_or_many(v)

    @field_validator("deliver_to")
    @classmethod
    def _not_own(cls, v: list[str], info: ValidationInfo) -> list[str]:
        # Local by design, but never the sidecar itself (its admin port's /reload...).
        for url in v:
            check_not_own_listener(url, info.context)
        return v


class Verify(Model):
    type: Literal["standard", "github", "stripe", "slack", "hmac"] = Field(
        description="standard, github, stripe, slack or hmac"
    )
    secrets: list[SecretStr] = Field(
        min_length=1, description="Every secret that is accepted (several while rotating)"
    )
    tolerance: Duration = Field(
        default=300.0, gt=0, description="Signed timestamps older or newer than this are refused"
    )
    header: HeaderName | None = Field(default=None, description="hmac: the signature header")
    algorithm: Literal["sha256", "sha1", "sha512"] = Field(default="sha256")
    encoding: Literal["hex", "base64"] = Field(default="hex")
    prefix: str = Field(default="", description="hmac: text before the signature, e.g. sha256=")
    id_header: HeaderName | None = Field(
        default=None, description="hmac: header with the delivery id (default: hash of the body)"
    )
    event_header: HeaderName | None = Field(
        default=None, description="hmac: header with the event type"
    )

    @field_validator("secrets", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _one_or_many(v)

    @model_validator(mode="before")
    @classmethod
    def _hmac_keys_only_for_hmac(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") in VERIFY_TYPES[:-1]:
            extra = [k for k in _HMAC_ONLY if k in data]
            if extra:
                raise ValueError(f"{', '.join(extra)}: only for type: hmac, not {data['type']}")
        return data

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Verify:
        if self.type == "hmac" and self.header is None:
            raise ValueError("type: hmac needs 'header', the name of the signature header")
        if self.type == "standard":
            for secret in self.secrets:
                if not _unresolved(secret, info):
                    kind, _ = standard_key(secret.reveal())
                    if kind == "whsk":
                        raise ValueError("verify takes whsec_ or whpk_ keys, not a whsk_ one")
        return self


class DeliveryRetry(Model):
    schedule: list[Duration] = Field(
        default_factory=lambda: list(DEFAULT_SCHEDULE),
        min_length=1,
        description="Delay before each attempt, the first included",
    )
    jitter: float = Field(default=0.2, ge=0, le=1, description="Each delay ± this share")


class InboundWebhook(Model):
    path: str = Field(description="Path on the ingress listener, e.g. /hooks/github")
    verify: Verify
    dedup_window: Duration = Field(
        default=86400.0, ge=0, description="A delivery id seen within this is not delivered again"
    )
    max_body: Size = Field(default=1024 * 1024, ge=1, description="Larger bodies get 413")
    routes: list[Route] = Field(default_factory=list)
    subscribe: bool = Field(
        default=False,
        description="Also keep every accepted event for agents that subscribe at "
        "/_events/<name> on egress (SSE or long-poll JSON), until they acknowledge it",
    )
    allow: list[AllowRule] | None = Field(
        default=None,
        description="Who may subscribe at /_events/<name>; absent: the top-level allow rules",
    )
    retry: DeliveryRetry = Field(default_factory=DeliveryRetry)
    timeout: Duration = Field(default=30.0, gt=0, description="Per delivery attempt")

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        if not v.startswith("/") or any(c in v for c in "?#% "):
            raise ValueError("path must be a plain path starting with '/'")
        if "/../" in v + "/" or "/./" in v + "/" or "//" in v:
            raise ValueError("path must be normalized (no '.', '..' or empty segments)")
        return v


class OutboundEndpoint(Model):
    name: str = Field(description="Names the endpoint in the admin view and its enable operation")
    # Before `url`, whose check reads it.
    allow_private: bool = Field(
        default=False,
        description="Let the URL reach a non-public address (loopback, private ranges, "
        "link-local): an in-cluster receiver. Default: refused at load and at connect time",
    )
    url: HttpUrl
    events: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1, description="Event type globs it receives"
    )

    @field_validator("url")
    @classmethod
    def _public(cls, v: str, info: ValidationInfo) -> str:
        allow_private = bool(info.data.get("allow_private", False))
        check_endpoint_url(v, allow_private=allow_private, context=info.context)
        return v

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"endpoint name {v!r} may hold only letters, digits, _ . -")
        return v

    def wants(self, event_type: str | None) -> bool:
        return any(fnmatch.fnmatchcase(event_type or "", glob) for glob in self.events)


class Signing(Model):
    type: Literal["hmac", "ed25519"] = Field(
        default="hmac", description="hmac (v1, whsec_ secrets) or ed25519 (v1a, whsk_ keys)"
    )
    secrets: list[SecretStr] = Field(
        min_length=1, description="Each one signs every delivery (several while rotating)"
    )

    @field_validator("secrets", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return _one_or_many(v)

    @model_validator(mode="after")
    def _check(self, info: ValidationInfo) -> Signing:
        want = "whsec" if self.type == "hmac" else "whsk"
        for secret in self.secrets:
            if not _unresolved(secret, info):
                kind, _ = standard_key(secret.reveal())
                if kind != want:
                    raise ValueError(f"signing type {self.type} takes {want}_ keys")
        return self


class OutboundWebhook(Model):
    endpoints: list[OutboundEndpoint] = Field(min_length=1)
    signing: Signing
    retry: DeliveryRetry = Field(default_factory=DeliveryRetry)
    timeout: Duration = Field(default=15.0, gt=0, description="Per delivery attempt")
    max_body: Size = Field(default=1024 * 1024, ge=1, description="Larger events get 413")
    idempotency_window: Duration = Field(
        default=86400.0, ge=0, description="An idempotency key seen within this is not sent again"
    )
    allow: list[AllowRule] | None = Field(
        default=None,
        description="Who may publish at /_webhooks/<name>; absent: the top-level allow rules",
    )

    @field_validator("endpoints")
    @classmethod
    def _unique_names(cls, v: list[OutboundEndpoint]) -> list[OutboundEndpoint]:
        names = [e.name for e in v]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"endpoint name {name!r} is used twice")
        return v


class WebhookStore(Model):
    """Where the one queue of both directions lives."""

    backend: RedisUrl | None = Field(
        default=None,
        description="redis://host:port/db (or rediss://, unix://) to share one queue between "
        "replicas over Redis Streams; default: SQLite in --data-dir",
    )
    prefix: str = Field(
        default="sidecar:webhooks",
        min_length=1,
        description="Redis key prefix; replicas with the same prefix share the queue",
    )
    claim_idle: Duration = Field(
        default=60.0,
        gt=0,
        description="Redis: deliveries a replica took and has not touched for this long "
        "(it crashed) are taken over by another",
    )
    retention: Duration | None = Field(
        default=None,
        gt=0,
        description="Messages whose every delivery succeeded are removed this long after "
        "they arrived; default: kept",
    )


class Webhooks(Model):
    inbound: dict[str, InboundWebhook] = Field(default_factory=dict)
    outbound: dict[str, OutboundWebhook] = Field(default_factory=dict)
    store: WebhookStore = Field(
        default_factory=WebhookStore, description="The durable queue: SQLite or Redis"
    )

    @field_validator("inbound", "outbound")
    @classmethod
    def _check_names(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"webhook name {name!r} may hold only letters, digits, _ . -")
        return v

    @field_validator("inbound")
    @classmethod
    def _unique_paths(cls, v: dict[str, InboundWebhook]) -> dict[str, InboundWebhook]:
        seen: dict[str, str] = {}
        for name, hook in v.items():
            if hook.path in seen:
                raise ValueError(
                    f"path {hook.path} of '{name}' is already used by '{seen[hook.path]}'"
                )
            seen[hook.path] = name
        return v


def merge(parts: list[Webhooks]) -> tuple[Webhooks, list[str]]:
    """The webhooks of several policy files as one, and what clashes between them."""
    inbound: dict[str, InboundWebhook] = {}
    outbound: dict[str, OutboundWebhook] = {}
    paths: dict[str, str] = {}
    clashes: list[str] = []
    stores = [p.store for p in parts if "store" in p.model_fields_set]
    if any(s != stores[0] for s in stores[1:]):
        clashes.append("webhooks.store is set differently in two files")
    store = stores[0] if stores else WebhookStore()
    for part in parts:
        for name, hook in part.inbound.items():
            if name in inbound:
                clashes.append(f"inbound webhook '{name}' is defined twice")
            elif hook.path in paths:
                clashes.append(
                    f"path {hook.path} of '{name}' is already used by '{paths[hook.path]}'"
                )
            else:
                inbound[name] = hook
                paths[hook.path] = name
        for name, group in part.outbound.items():
            if name in outbound:
                clashes.append(f"outbound webhook '{name}' is defined twice")
            else:
                outbound[name] = group
    return Webhooks(inbound=inbound, outbound=outbound, store=store), clashes
