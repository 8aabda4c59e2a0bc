"""Set-up the cache tests share, so each test states only what it changes.

- `up = served(Upstream)` in a test module: a fixture `up`, a new Upstream()
  serving its app() on loopback, its URL in `up.base`.
- `cache_policy(base, cache)`: one service, `api`, on `base`, its bearer token from
  API_TOKEN, with `cache: <cache>` (a YAML flow mapping such as "{ttl: 1h}").
- `cache_sidecar(base, cache, token)` starts the real sidecar with that policy.
- `metrics(client, admin)` and `api_cache(client, admin)`: what the admin port shows,
  the Prometheus text and service `api`'s cache in /services.
- `cache_step(config, store, clock)` and `get_through(step, next, target)` drive a
  CacheStep in-process, with an injected clock.
"""

from __future__ import annotations

import textwrap
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.core.call import Call, Handler, Reply
from sidecar.policy.cache import Cache
from sidecar.steps.answers.cache import CacheStep, CacheStore
from tests.conftest import RunningSidecar, StartSidecar

Upstreams = Callable[[web.Application], Awaitable[str]]
CacheSidecar = Callable[..., Awaitable[RunningSidecar]]


class Origin(Protocol):
    base: str

    def app(self) -> web.Application: ...


AnOrigin = TypeVar("AnOrigin", bound=Origin)


def served(kind: Callable[[], AnOrigin]) -> object:
    """A fixture, named by the module attribute it is assigned to."""

    @pytest.fixture
    async def start(upstream: Upstreams) -> AnOrigin:
        origin = kind()
        origin.base = await upstream(origin.app())
        return origin

    return start


def cache_policy(base: str, cache: str, retry: int = 1) -> str:
    return textwrap.dedent(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth: {{type: bearer, token: "${{env:API_TOKEN}}"}}
            cache: {cache}
            retry: {{attempts: {retry}}}
        """
    )


@pytest.fixture
def cache_sidecar(start_sidecar: StartSidecar) -> CacheSidecar:
    async def start(base: str, cache: str, token: str, retry: int = 1) -> RunningSidecar:
        return await start_sidecar(cache_policy(base, cache, retry), env={"API_TOKEN": token})

    return start


async def metrics(client: aiohttp.ClientSession, admin: str) -> str:
    async with client.get(f"{admin}/metrics") as r:
        return await r.text()


async def api_cache(client: aiohttp.ClientSession, admin: str) -> dict[str, Any]:
    async with client.get(f"{admin}/services") as r:
        cache: dict[str, Any] = (await r.json())["services"]["api"]["cache"]
        return cache


def cache_step(config: dict[str, Any], store: CacheStore, clock: Callable[[], float]) -> CacheStep:
    return CacheStep(
        service="api", config=Cache.model_validate(config), store=store, report=[], clock=clock
    )


async def get_through(step: CacheStep, next: Handler, target: str) -> Reply:
    """A GET of `target` by agent `a` through `step`, its body read to the end."""
    call = Call(
        service="api", method="GET", target=target, headers=CIMultiDict(), body=None, agent="a"
    )
    reply = await step(call, next)
    if reply.body is not None:
        async for _ in reply.body:
            pass
    return reply
