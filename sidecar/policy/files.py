"""`files:` on a service: a directory served over HTTP instead of an upstream (sidecar/files/).

A files service has no upstream: the sidecar itself answers GET, HEAD, PUT and
DELETE on the files beneath `root`. The keys that only mean something with an
upstream (auth, retry, breaker, cache, LLM and protocol rules, mock and record
modes) are refused next to `files:`, so a policy never looks like it does what
it cannot.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import Field, field_validator, model_validator

from .base import Model, Size

# What a files service is given as its `upstream`, which every route has: a name that
# never resolves (RFC 2606 `.invalid`), so nothing can ever connect to it.
FILES_UPSTREAM = "http://files.invalid"

# Keys of a service that need an upstream (or an API behind it): refused with `files:`.
NOT_WITH_FILES = (
    "upstream",
    "template",
    "auth",
    "retry",
    "circuit_breaker",
    "cache",
    "translate",
    "llm",
    "graphql",
    "mcp",
    "mock",
    "cassettes",
    "fallback",
    "model_map",
    "budget",
    "prices",
    "limits",
    "redirects",
    "forwarded",
    "check",
)

_EXTENSION = re.compile(r"^\.[A-Za-z0-9][A-Za-z0-9._+-]*$")


class Files(Model):
    root: str = Field(
        description="Absolute path of the directory served; nothing outside it is ever opened"
    )
    read_only: bool = Field(default=False, description="Refuse PUT and DELETE (403 forbidden)")
    extensions: list[str] | None = Field(
        default=None,
        description="File name endings allowed (e.g. .txt, .md), compared without case; "
        "absent: any",
    )
    max_size: Size | None = Field(
        default=None, description="Largest file a PUT may write; larger: 413 request_too_large"
    )
    per_agent: bool = Field(
        default=False,
        description="Each agent sees only root/<agent>/, named by its identity (X-Agent-Id or "
        "the verified name); a call without one gets 401 unauthenticated",
    )
    quota: Size | None = Field(
        default=None,
        description="Bytes each agent's directory may hold (needs per_agent); over it: "
        "507 quota_exceeded",
    )
    list_limit: int = Field(
        default=1000,
        ge=1,
        le=100_000,
        description="Most entries a directory listing returns; more: `truncated: true`",
    )

    @field_validator("root")
    @classmethod
    def _absolute(cls, v: str) -> str:
        if "\0" in v:
            raise ValueError("root must not hold a NUL")
        if not os.path.isabs(v):
            raise ValueError("root must be an absolute path (e.g. /data)")
        normal = os.path.normpath(v)
        if normal == "/":
            raise ValueError("root must not be / (serve a directory of its own)")
        return normal

    @field_validator("extensions")
    @classmethod
    def _extensions(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return v
        for ext in v:
            if not _EXTENSION.match(ext):
                raise ValueError(f"extension {ext!r} must look like .txt (a dot, then a name)")
        return sorted({ext.lower() for ext in v})

    @model_validator(mode="after")
    def _quota_needs_agents(self) -> Files:
        if self.quota is not None and not self.per_agent:
            raise ValueError("quota is per agent: it needs per_agent: true")
        return self


def fill_upstream(data: Any) -> Any:
    """A service's raw mapping with `files:`: its upstream filled in (it has none), and
    the keys that need one refused. Anything else is returned as it is."""
    if not isinstance(data, dict) or data.get("files") is None:
        return data
    wrong = [key for key in NOT_WITH_FILES if key in data]
    if wrong:
        raise ValueError(
            f"a files service has no upstream: {', '.join(wrong)} cannot be used with files"
        )
    mode = data.get("mode", "live")
    if mode != "live":
        raise ValueError("a files service is always mode: live (it has nothing to mock or record)")
    return {**data, "upstream": FILES_UPSTREAM}
