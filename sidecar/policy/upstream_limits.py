"""The `limits:` part of a service: how its upstream reports its own limits.

The adaptive pause (steps/resilience/pause.py) reads these headers from the upstream's
answers. Providers name them differently (OpenAI `x-ratelimit-*` and
`retry-after-ms`, Anthropic `anthropic-ratelimit-*`, GitHub `x-ratelimit-*`,
GitLab `RateLimit-*`), so the names are policy, usually filled by a template.
"""

from __future__ import annotations

from pydantic import Field

from .base import HeaderName, Model


class Quota(Model):
    remaining: HeaderName = Field(
        description="Header with what is left of one of the upstream's limits"
    )
    reset: HeaderName = Field(
        description="Header saying when that limit resets: seconds, a duration like 6m0s, "
        "epoch seconds, an ISO 8601 time or an HTTP date"
    )


class UpstreamLimits(Model):
    retry_after: list[HeaderName] = Field(
        default_factory=lambda: ["Retry-After"],
        description="Headers of a 429/503 naming how long to wait, the first present wins; "
        "a name ending in -ms counts milliseconds",
    )
    quota: list[Quota] = Field(
        default_factory=list,
        description="Limit headers: a refusal (403/429) reporting 0 remaining pauses the "
        "service until the matching reset when no retry_after header says otherwise",
    )
    early: bool = Field(
        default=False,
        description="Also pause when an answer that was not refused reports 0 remaining "
        "(right only when the limit covers every call to the service)",
    )
