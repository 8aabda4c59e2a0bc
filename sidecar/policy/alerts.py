"""The `admin:` and `alerts:` parts of the policy: the admin token, and alert rules.

An alert rule watches one thing the sidecar already knows (a breaker, an
error ratio, a p99, a budget, the webhook queue, the last reload, a
connector's pool) and, with Alertmanager's semantics, sends `firing` once
the condition has held for `for:`, again every `repeat:` while it holds, and
`resolved` once when it stops. Notifications go through the durable webhook
queue to receivers in Slack, PagerDuty Events v2 or Standard Webhooks format.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .addresses import check_endpoint_url
from .base import Duration, Model, SecretStr
from .secrets import Secret, resolver_from_context
from .webhooks import DeliveryRetry, Signing, _http_url

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

RuleKind = Literal[
    "breaker_open",
    "error_ratio",
    "p99",
    "budget_used",
    "dead_letters",
    "queue_age",
    "reload_failed",
    "pool_saturated",
]
# The threshold keys each kind reads; any other one is an error.
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "breaker_open": (),
    "error_ratio": ("ratio", "window", "min_calls"),
    "p99": ("latency", "window", "min_calls"),
    "budget_used": ("percent",),
    "dead_letters": (),
    "queue_age": ("age",),
    "reload_failed": (),
    "pool_saturated": ("percent",),
}
_REQUIRED: dict[str, tuple[str, ...]] = {
    "error_ratio": ("ratio",),
    "p99": ("latency",),
    "budget_used": ("percent",),
    "queue_age": ("age",),
}
_THRESHOLDS = ("ratio", "window", "min_calls", "latency", "percent", "age")


class Admin(Model):
    """The admin listener."""

    token: SecretStr | None = Field(
        default=None,
        description="Bearer token the console and every admin call need (HTTP Basic with "
        "any user name works too, for browsers). Required when --admin is not a loopback "
        "address; also read from SIDECAR_ADMIN_TOKEN or the file SIDECAR_ADMIN_TOKEN_FILE",
    )


class Receiver(Model):
    format: Literal["slack", "pagerduty", "standard"] = Field(
        description="slack (incoming webhook), pagerduty (Events API v2) or standard "
        "(Standard Webhooks, signed)"
    )
    # Before `url`, whose check reads it.
    allow_private: bool = Field(
        default=False,
        description="Let the URL reach a non-public address (loopback, private ranges, "
        "link-local): an in-cluster receiver. Default: refused at load and at connect time, "
        "as for webhook endpoints",
    )
    url: SecretStr = Field(
        description="Where notifications are POSTed; a secret, as a Slack incoming-webhook "
        "URL is its own credential. PagerDuty: https://events.pagerduty.com/v2/enqueue"
    )
    routing_key: SecretStr | None = Field(
        default=None, description="pagerduty: the integration's routing key"
    )
    signing: Signing | None = Field(default=None, description="standard: how deliveries are signed")
    retry: DeliveryRetry = Field(default_factory=DeliveryRetry)
    timeout: Duration = Field(default=15.0, gt=0, description="Per delivery attempt")

    @model_validator(mode="after")
    def _keys_of_format(self) -> Receiver:
        if self.format == "pagerduty" and self.routing_key is None:
            raise ValueError("format: pagerduty needs routing_key")
        if self.format != "pagerduty" and self.routing_key is not None:
            raise ValueError(f"routing_key is only for format: pagerduty, not {self.format}")
        if self.format == "standard" and self.signing is None:
            raise ValueError("format: standard needs signing (whsec_ secrets)")
        if self.format != "standard" and self.signing is not None:
            raise ValueError(f"signing is only for format: standard, not {self.format}")
        return self

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: Secret, info: ValidationInfo) -> Secret:
        # `sidecar validate` without --resolve-secrets leaves references unread.
        if not (resolver_from_context(info.context).check_only and "${" in v.source):
            _http_url(v.reveal())
            allow_private = bool(info.data.get("allow_private", False))
            check_endpoint_url(v.reveal(), allow_private=allow_private, context=info.context)
        return v


class Rule(Model):
    name: str = Field(description="Names the alert in notifications, the console and /metrics")
    kind: RuleKind = Field(description="What is watched")
    services: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Globs of what the rule watches: service names (breaker_open, error_ratio, "
        "p99, budget_used), webhook endpoints as WEBHOOK/ENDPOINT (dead_letters, queue_age), "
        "pool names (pool_saturated)",
    )
    ratio: float | None = Field(
        default=None, gt=0, le=1, description="error_ratio: share of calls answered 4xx/5xx"
    )
    latency: Duration | None = Field(default=None, gt=0, description="p99: over this")
    window: Duration = Field(
        default=300.0, gt=0, description="error_ratio, p99: over the calls of this long"
    )
    min_calls: int = Field(
        default=10, ge=1, description="error_ratio, p99: fewer calls in the window say nothing"
    )
    percent: float | None = Field(
        default=None,
        gt=0,
        le=100,
        description="budget_used: of the budget spent; pool_saturated: of the pool in use",
    )
    age: Duration | None = Field(
        default=None, gt=0, description="queue_age: the oldest pending delivery older than this"
    )
    for_: Duration = Field(
        default=0.0,
        ge=0,
        alias="for",
        description="How long the condition holds before the alert fires (pending until then)",
    )
    repeat: Duration = Field(
        default=14400.0, gt=0, description="While firing, sent again this often"
    )
    severity: Literal["critical", "warning", "info"] = "warning"
    send_to: list[str] = Field(min_length=1, description="Receiver names")

    @field_validator("name")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError(f"rule name {v!r} may hold only letters, digits, _ . -")
        return v

    @model_validator(mode="after")
    def _keys_of_kind(self) -> Rule:
        allowed = KIND_KEYS[self.kind]
        extra = [k for k in _THRESHOLDS if k in self.model_fields_set and k not in allowed]
        if extra:
            raise ValueError(f"{', '.join(extra)}: not read by kind {self.kind}")
        missing = [k for k in _REQUIRED.get(self.kind, ()) if getattr(self, k) is None]
        if missing:
            raise ValueError(f"kind {self.kind} needs {', '.join(missing)}")
        return self


class Alerts(Model):
    evaluate_every: Duration = Field(
        default=10.0, gt=0, description="How often the rules are evaluated"
    )
    receivers: dict[str, Receiver] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("receivers")
    @classmethod
    def _receiver_names(cls, v: dict[str, Receiver]) -> dict[str, Receiver]:
        for name in v:
            if not _NAME.match(name):
                raise ValueError(f"receiver name {name!r} may hold only letters, digits, _ . -")
        return v

    @model_validator(mode="after")
    def _rules_refer(self) -> Alerts:
        names: set[str] = set()
        for rule in self.rules:
            if rule.name in names:
                raise ValueError(f"rule name {rule.name!r} is used twice")
            names.add(rule.name)
            for receiver in rule.send_to:
                if receiver not in self.receivers:
                    known = ", ".join(sorted(self.receivers)) or "none"
                    raise ValueError(
                        f"rule {rule.name!r} sends to receiver {receiver!r}, which is not "
                        f"declared (receivers: {known})"
                    )
        return self
