"""The `cache:` part of a service: answers kept (in memory or Redis) and served again.

A hit is answered by the sidecar (steps/answers/cache.py): no token spent, no
upstream call. The upstream's Cache-Control is honoured (no-store, no-cache,
private, max-age, s-maxage, stale-if-error); `ttl` is the longest an answer
is served without asking the upstream again.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import Duration, HeaderName, Model, RedisUrl, Size

CacheMethod = Literal["GET", "HEAD", "POST"]
_SAFE_METHODS: tuple[CacheMethod, ...] = ("GET", "HEAD")


class Cache(Model):
    ttl: Duration = Field(
        default=300.0,
        gt=0,
        description="Longest an answer is served from the cache; an upstream max-age "
        "(s-maxage when shared) shortens it",
    )
    max_entries: int = Field(
        default=1000, ge=1, description="Most answers kept; the least recently used go first"
    )
    max_bytes: Size = Field(
        default=64 << 20,
        ge=0,
        description="Most bytes of answer bodies kept for the service; the least recently "
        "used go first",
    )
    max_body: Size = Field(
        default=1 << 20, ge=0, description="Largest answer body kept; larger ones pass uncached"
    )
    methods: list[CacheMethod] = Field(
        default_factory=lambda: list(_SAFE_METHODS),
        min_length=1,
        description="Methods whose answers are cached; with POST the request body "
        "(canonical JSON when it is JSON) is part of the key, for deterministic LLM calls "
        "(temperature 0) and read-only GraphQL queries",
    )
    ignore_upstream_cache_control: list[CacheMethod] = Field(
        default_factory=list,
        description="Methods (of `methods`) whose 2xx answers are kept for `ttl` whatever "
        "the upstream's Cache-Control or Expires says (no-cache, no-store, private, "
        "max-age): an opt-in for streamed (SSE) LLM answers, which usually say no-cache",
    )
    key_headers: list[HeaderName] = Field(
        default_factory=list,
        description="Request headers that are part of the key (Accept-Encoding always is)",
    )
    shared: bool = Field(
        default=False,
        description="false: each agent has its own entries; true: agents share them "
        "(answers marked Cache-Control: private are then not kept); `scope` says the same",
    )
    scope: Literal["service", "agent"] | None = Field(
        default=None,
        description="agent: each agent has its own entries; service: agents share them "
        "(the same as shared: true); default agent",
    )
    stale_if_error: Duration | None = Field(
        default=None,
        ge=0,
        description="How long past its freshness an answer may still be served when the "
        "upstream fails (5xx, unreachable, timeout, breaker open); an answer's own "
        "Cache-Control stale-if-error also allows it",
    )
    backend: RedisUrl | None = Field(
        default=None,
        description="redis://host:port/db to keep the entries in Redis, shared by the "
        "sidecars that use it; default: this sidecar's memory",
    )

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[CacheMethod]) -> list[CacheMethod]:
        if len(set(v)) != len(v):
            raise ValueError("methods lists a method twice")
        return v

    @model_validator(mode="after")
    def _overrides_cached_methods(self) -> Cache:
        extra = [m for m in self.ignore_upstream_cache_control if m not in self.methods]
        if extra:
            raise ValueError(
                f"ignore_upstream_cache_control names {', '.join(extra)}, which `methods` "
                "does not cache; add it to methods"
            )
        return self

    @model_validator(mode="after")
    def _one_scope(self) -> Cache:
        # `shared` came first; `scope` is the name for it. Both may be
        # written, but they must agree.
        if (
            self.scope is not None
            and "shared" in self.model_fields_set
            and self.shared != (self.scope == "service")
        ):
            raise ValueError(
                f"shared: {str(self.shared).lower()} contradicts scope: {self.scope}; "
                "write only one of them"
            )
        return self

    @property
    def per_service(self) -> bool:
        """Agents share the entries (scope: service, or shared: true)."""
        return self.scope == "service" if self.scope is not None else self.shared
