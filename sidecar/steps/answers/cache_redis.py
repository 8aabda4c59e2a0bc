"""A service's cache kept in Redis, shared by every sidecar that points at it.

Layout, under `sidecar:cache:<service>:<fingerprint of upstream and rules>:`
and the hex digest of the call's key (method, target, key headers, agent
unless shared, POST body; never the injected credential, which the cache step
never sees):
- `<key>` holds the Vary names (JSON) of the latest answer stored for the key;
- `<key>:<variant>` holds that answer (entry metadata as one JSON line, then
  the body, at most `max_body`); `<variant>` is a digest of the request
  headers its Vary names, empty without Vary.
Both expire (PX) when the entry is no more use, even to revalidate or serve
stale. A lookup without Vary costs one round trip (MGET), with Vary two.

Redis sits on the request path, so it gets the same short leash as the shared
rate limits: a 250 ms timeout, no client retries, and after a failure it is
left alone for a second. A failed read is a miss and a failed write keeps
nothing; the call itself never fails for it. Writes happen in the background,
after the answer has been relayed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from .cache_entry import Entry, Request, vary_digest

log = logging.getLogger("sidecar.cache")

TIMEOUT = 0.25  # seconds, connecting and each reply
DOWN_FOR = 1.0  # after a failure, calls do not wait on Redis again for this long
WARN_EVERY = 30.0

_FAILURES = (RedisError, OSError, TimeoutError)


class RedisCacheStore:
    def __init__(self, *, url: str, prefix: str, failed: Callable[[], None]) -> None:
        parts = urlsplit(url)
        # For logs and /services: never the URL itself, which may carry a password.
        self.where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port}"
        self.prefix = prefix
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._failed_hook = failed
        self._down_until = 0.0
        self._warned_at = -WARN_EVERY
        self._writes: set[asyncio.Task[None]] = set()
        self.errors = 0

    def _down(self) -> bool:
        return bool(self._down_until) and time.monotonic() < self._down_until

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self._failed_hook()
        now = time.monotonic()
        self._down_until = now + DOWN_FOR
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(
                "cache backend %s unavailable (%s): calls go upstream uncached until it "
                "answers again",
                self.where,
                type(exc).__name__,
            )

    async def lookup(self, key: bytes, request: Request, now: float) -> Entry | None:
        if self._down():
            self._failed_hook()
            return None
        base = self.prefix + key.hex()
        try:
            index, plain = await self.client.mget(base, base + ":")
            if index is None:
                blob = None
            else:
                names = tuple(str(n) for n in json.loads(index))
                blob = (
                    plain
                    if not names
                    else await self.client.get(f"{base}:{vary_digest(names, request)}")
                )
        except _FAILURES as exc:
            self._failed(exc)
            return None
        except ValueError:
            return None  # not ours, or garbled: a miss
        self._down_until = 0.0
        if not isinstance(blob, bytes):
            return None
        try:
            entry = Entry.load(blob)
        except (ValueError, KeyError, TypeError):
            return None
        if entry.keep_until <= now or not entry.matches(request):
            return None
        return entry

    def save(self, key: bytes, entry: Entry, now: float) -> None:
        ttl = int((entry.keep_until - now) * 1000)
        if ttl <= 0 or self._down():
            return
        task = asyncio.get_running_loop().create_task(self._write(key, entry, ttl))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _write(self, key: bytes, entry: Entry, ttl: int) -> None:
        base = self.prefix + key.hex()
        try:
            pipe = self.client.pipeline(transaction=False)
            pipe.set(base, json.dumps(list(entry.vary)), px=ttl)
            pipe.set(f"{base}:{entry.vary_key}", entry.dump(), px=ttl)
            await pipe.execute()
        except _FAILURES as exc:
            self._failed(exc)

    def snapshot(self) -> dict[str, Any]:
        return {"backend": "redis", "where": self.where, "errors": self.errors}

    def retire(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self._close())
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _close(self) -> None:
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)
        await self.client.aclose()


_closing: set[asyncio.Task[None]] = set()
