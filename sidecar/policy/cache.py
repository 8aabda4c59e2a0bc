"""The `cache:` part of a service: answers kept in memory and served again.

A hit is answered by the sidecar (steps/cache.py): no token spent, no
upstream call. The upstream's Cache-Control is honoured (no-store, no-cache,
private, max-age, s-maxage); `ttl` is the longest an answer is kept.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from .base import Duration, HeaderName, Model, Size

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
    key_headers: list[HeaderName] = Field(
        default_factory=list,
        description="Request headers that are part of the key (Accept-Encoding always is)",
    )
    shared: bool = Field(
        default=False,
        description="false: each agent has its own entries; true: agents share them "
        "(answers marked Cache-Control: private are then not kept)",
    )

    @field_validator("methods")
    @classmethod
    def _unique(cls, v: list[CacheMethod]) -> list[CacheMethod]:
        if len(set(v)) != len(v):
            raise ValueError("methods lists a method twice")
        return v
