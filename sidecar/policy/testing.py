"""The `mode:`, `mock:` and `faults:` parts of a service: for testing agents.

`mode: record` saves each exchange with the live upstream as a file of the
service's cassette directory, and `mode: replay` answers from those files.
`mode: mock` answers every call to the service from its `mock:` rules, so an
agent runs offline, without keys; the upstream is never contacted. `faults:`
makes a live service misbehave on purpose (Envoy's fault filter, Toxiproxy):
added latency, aborts, connection resets, a slow answer, SSE streams cut
short, each for a ratio of the calls.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import Duration, HeaderName, Model, Size

# How a service is answered: `live` by its upstream, `mock` by its `mock:` rules,
# `record` by its upstream with each exchange saved to its cassettes, `replay` by
# those cassettes (steps/answers/cassette.py), `observe` by its upstream with the shape of each
# call written down for `sidecar learn` (learn/observe.py).
Mode = Literal["live", "mock", "record", "replay", "observe"]

HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def _ratio() -> Any:
    return Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of the calls this applies to, 0.0 to 1.0 (default 1.0: every call)",
    )


def _path_glob(value: str) -> str:
    if not value.startswith(("/", "*")):
        raise ValueError("path must start with '/' (or be a glob starting with '*')")
    return value


class MockMatch(Model):
    method: str = Field(default="*", description="HTTP method (GET, POST, ...) or * for any method")
    path: str = Field(
        default="*",
        description="Glob on the path after the service's prefix, without the query "
        "(* also matches '/')",
    )

    @field_validator("method")
    @classmethod
    def _check_method(cls, v: str) -> str:
        v = v.upper()
        if v != "*" and v not in HTTP_METHODS:
            raise ValueError(f"method must be * or one of {', '.join(HTTP_METHODS)}")
        return v

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        return _path_glob(v)


class MockAnswer(Model):
    """One inline answer: the first rule whose `match` fits the call answers it."""

    match: MockMatch = Field(default_factory=MockMatch)
    status: int = Field(default=200, ge=200, le=599, description="The answer's status")
    headers: dict[HeaderName, str] = Field(default_factory=dict, description="The answer's headers")
    body: Any = Field(
        default=None,
        description="A string is sent as it is (text/plain unless headers say otherwise); "
        "any other value as JSON (application/json)",
    )
    delay: Duration | None = Field(default=None, description="Wait this long before answering")

    @field_validator("body")
    @classmethod
    def _check_body(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, str):
            try:
                json.dumps(v)
            except (TypeError, ValueError):
                raise ValueError("body must be a string or plain JSON (quote dates)") from None
        return v


class DelayFault(Model):
    ratio: float = _ratio()
    fixed: Duration | None = Field(default=None, description="Add exactly this long")
    min: Duration | None = Field(default=None, description="Add a uniform random delay from min")
    max: Duration | None = Field(default=None, description="... to max")

    @model_validator(mode="after")
    def _one_kind(self) -> DelayFault:
        ranged = self.min is not None or self.max is not None
        if self.fixed is not None and ranged:
            raise ValueError("give either fixed, or min and max, not both")
        if self.fixed is None and not ranged:
            raise ValueError("give fixed, or min and max")
        if ranged and (self.min is None or self.max is None):
            raise ValueError("give both min and max")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("min must not be larger than max")
        return self


class AbortFault(Model):
    ratio: float = _ratio()
    status: int = Field(
        default=503, ge=400, le=599, description="Status of the sidecar's fault_injected answer"
    )


class ResetFault(Model):
    ratio: float = _ratio()


class BandwidthFault(Model):
    ratio: float = _ratio()
    per_second: Size = Field(description="Bytes per second the answer is sent at, e.g. 64KiB")

    @field_validator("per_second")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v <= 0:
            raise ValueError("per_second must be more than 0 bytes")
        return v


class SSEFault(Model):
    ratio: float = _ratio()
    cut_after: int = Field(
        ge=0, description="Cut the agent's connection after this many events of an SSE answer"
    )


FAULT_KINDS = ("delay", "abort", "reset", "bandwidth", "sse")


class Faults(Model):
    enabled: bool = Field(
        default=True,
        description="Whether the faults apply; the admin port's POST /faults switches it "
        "at runtime until the next reload that changes this block",
    )
    agents: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Agent id globs the faults apply to (a call without an agent id is '')",
    )
    seed: int | None = Field(
        default=None, description="Seed of the random choices, for a repeatable run"
    )
    delay: DelayFault | None = Field(default=None, description="Added latency before the call")
    abort: AbortFault | None = Field(
        default=None, description="Answer with this status instead of calling the upstream"
    )
    reset: ResetFault | None = Field(
        default=None, description="Cut the agent's connection instead of answering"
    )
    bandwidth: BandwidthFault | None = Field(
        default=None, description="Send the answer no faster than this"
    )
    sse: SSEFault | None = Field(default=None, description="Cut SSE answers after N events")

    def kinds(self) -> list[str]:
        return [kind for kind in FAULT_KINDS if getattr(self, kind) is not None]


class CassetteMatch(Model):
    ignore_json_fields: list[str] = Field(
        default_factory=list,
        description="Fields of a JSON request body left out of the comparison "
        "(dotted for nested ones: metadata.request_id)",
    )


class Cassettes(Model):
    """Where `mode: record` writes and `mode: replay` reads, and how they behave."""

    dir: str | None = Field(
        default=None,
        min_length=1,
        description="Directory of the cassette files, relative to the policy file; "
        "default cassettes/<service> beside it",
    )
    redact: list[HeaderName] = Field(
        default_factory=list,
        description="Headers (of the request or the answer) whose values are never written",
    )
    match: CassetteMatch = Field(
        default_factory=CassetteMatch, description="How a call is matched to a recording"
    )
    pacing: Literal["recorded", "fast"] = Field(
        default="recorded",
        description="recorded: SSE events replayed at their recorded pace; fast: at once",
    )
    on_missing: Literal["error", "passthrough"] = Field(
        default="error",
        description="error: a call with no recording gets 501 no_recording; "
        "passthrough: it goes to the upstream (not recorded)",
    )
    max_body: Size = Field(
        default=8 << 20,
        description="Largest answer recorded; a larger one reaches the agent but is not saved",
    )

    @model_validator(mode="before")
    @classmethod
    def _dir_only(cls, v: Any) -> Any:
        # `cassettes: fixtures/billing` is the common spelling.
        return {"dir": v} if isinstance(v, str) else v


@dataclass(frozen=True, slots=True)
class CassetteOverride:
    """What `sidecar record|replay` flags change in every recording or replaying service's
    `cassettes:`, over its policy file: one switch for a whole test run."""

    # Absolute; each service's cassettes go to root/<service>, whatever its `dir:`.
    root: str | None = None
    pacing: Literal["recorded", "fast"] | None = None
    on_missing: Literal["error", "passthrough"] | None = None

    def apply(self, service: str, cassettes: Cassettes | None) -> Cassettes:
        update: dict[str, Any] = {}
        if self.root is not None:
            update["dir"] = str(Path(self.root) / service)
        if self.pacing is not None:
            update["pacing"] = self.pacing
        if self.on_missing is not None:
            update["on_missing"] = self.on_missing
        return (cassettes or Cassettes()).model_copy(update=update)
