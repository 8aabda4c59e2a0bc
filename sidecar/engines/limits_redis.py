"""Rate limits shared by several sidecars: a token bucket kept in Redis.

One Lua script refills, checks and takes in a single atomic step, reading the
time from Redis itself (`TIME`), so sidecars whose clocks disagree still
agree on the bucket. The key is the service plus a fingerprint of the limit's
rate, burst and scope (plus the agent for `per: agent`): sidecars with the
same limit share it, and a changed limit starts from a fresh key.

Redis is a dependency on the hot path, so it gets a short leash: a 250 ms
socket timeout, no client retries, and after a failure it is left alone for
a second. Meanwhile `fail_open` decides: let calls through, or refuse them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisError

from ..core.problems import ProblemError
from ..core.reasons import Reason
from ..core.state import fingerprint
from ..policy.models import RateLimit

log = logging.getLogger("sidecar.ratelimit")

T = TypeVar("T")

TIMEOUT = 0.25  # seconds, connecting and each reply
DOWN_FOR = 1.0  # after a failure, calls do not wait on Redis again for this long
WARN_EVERY = 30.0  # at most one "backend unavailable" warning per backend per interval
BACKEND_RETRY_AFTER = 1.0

# KEYS[1] bucket; ARGV rate (tokens/s), burst, cost (1 to take, -1 to give back),
# max_wait (s). Returns {taken 0/1, seconds until the token exists, tokens left}.
# A take may push the bucket into debt by up to max_wait's worth: the caller
# then sleeps until its token exists, in the order the takes arrived.
SCRIPT = """
if redis.replicate_commands then pcall(redis.replicate_commands) end
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local max_wait = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local saved = redis.call('HMGET', KEYS[1], 'tokens', 'stamp')
local tokens = tonumber(saved[1])
local stamp = tonumber(saved[2])
if tokens == nil or stamp == nil then
  tokens = burst
  stamp = now
elseif now > stamp then
  tokens = math.min(burst, tokens + (now - stamp) * rate)
  stamp = now
end
local wait = 0
if cost > 0 and tokens < cost then
  wait = (cost - tokens) / rate
end
local taken = 0
if wait <= max_wait then
  tokens = math.min(burst, tokens - cost)
  taken = 1
end
redis.call('HSET', KEYS[1], 'tokens', string.format('%.17g', tokens),
  'stamp', string.format('%.6f', stamp))
redis.call('PEXPIRE', KEYS[1], math.ceil(((burst - tokens) / rate + 1) * 1000))
return {taken, string.format('%.17g', wait), string.format('%.17g', tokens)}
"""
SCRIPT_SHA = hashlib.sha1(SCRIPT.encode()).hexdigest()


class BackendDown(Exception):
    pass


class RedisBackend:
    """One Redis client (one connection pool) per backend URL, shared by all services."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        # For logs: never the URL itself, which may carry a password.
        self.where = parts.path if parts.scheme == "unix" else f"{parts.hostname}:{parts.port}"
        self.client: Redis = Redis.from_url(
            url,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
            retry=Retry(NoBackoff(), 0),
        )
        self._down_until = 0.0
        self._warned_at = -WARN_EVERY

    async def run(
        self, key: str, rate: float, burst: int, cost: int, max_wait: float
    ) -> tuple[bool, float, float]:
        if self._down_until and time.monotonic() < self._down_until:
            raise BackendDown
        args = (key, rate, burst, cost, max_wait)
        try:
            try:
                result = await self.client.evalsha(SCRIPT_SHA, 1, *args)
            except NoScriptError:
                # A restarted or flushed Redis forgot the script: send it whole once.
                result = await self.client.eval(SCRIPT, 1, *args)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise BackendDown from None
        self._down_until = 0.0
        taken, wait, tokens = result
        return bool(taken), float(wait), float(tokens)

    async def command(self, work: Callable[[Redis], Awaitable[T]]) -> T:
        """Any other use of the client (budgets), on the same short leash as `run`."""
        if self._down_until and time.monotonic() < self._down_until:
            raise BackendDown
        try:
            result = await work(self.client)
        except (RedisError, OSError, TimeoutError) as exc:
            self._failed(exc)
            raise BackendDown from None
        self._down_until = 0.0
        return result

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        self._down_until = now + DOWN_FOR
        if now - self._warned_at >= WARN_EVERY:
            self._warned_at = now
            log.warning(
                "rate-limit backend %s unavailable (%s): limits with fail_open let calls "
                "through, the others refuse them, until it answers again",
                self.where,
                type(exc).__name__,
            )

    def retire(self) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        task = loop.create_task(self.client.aclose())
        _closing.add(task)
        task.add_done_callback(_closing.discard)


_closing: set[asyncio.Task[None]] = set()


class SharedLimit:
    """One `rate_limit` entry with a backend; its bucket lives in Redis."""

    # What the refusal while Redis is down calls this limiter.
    kind = "rate limiter"

    def __init__(
        self, *, service: str, limit: RateLimit, burst: int, backend: RedisBackend, detail: str
    ) -> None:
        self._setup(
            service=service,
            limit=limit,
            rate=limit.call_rate.per_second,
            burst=burst,
            backend=backend,
            detail=detail,
            key_prefix="sidecar:ratelimit:"
            f"{service}:{fingerprint((limit.call_rate.per_second, burst, limit.per))}",
        )

    def _setup(
        self,
        *,
        service: str,
        limit: RateLimit,
        rate: float,
        burst: int,
        backend: RedisBackend,
        detail: str,
        key_prefix: str,
    ) -> None:
        self.key_prefix = key_prefix
        self.rate = rate
        self.burst = burst
        self.max_wait = limit.max_wait or 0.0
        self.per_agent = limit.per == "agent"
        self.fail_open = limit.fail_open
        self.backend = backend
        self.service = service
        self.detail = detail
        self._anonymous = self.key_prefix + ":anonymous"

    def key(self, agent: str | None) -> str:
        if not self.per_agent:
            return self.key_prefix
        return self._anonymous if agent is None else f"{self.key_prefix}:agent:{agent}"

    async def take(self, agent: str | None) -> tuple[bool, float, float]:
        """(taken, seconds until the token exists, tokens left); fail_open when Redis is down."""
        try:
            return await self.backend.run(self.key(agent), self.rate, self.burst, 1, self.max_wait)
        except BackendDown:
            if self.fail_open:
                return True, 0.0, float(self.burst)
        raise ProblemError(
            Reason.rate_limited,
            f"The shared {self.kind} of service '{self.service}' (its Redis backend) is "
            "unavailable, and the policy says to refuse calls until it is back; this refusal "
            "comes from the sidecar, not the upstream. Retry after 1 second.",
            service=self.service,
            retry_after=BACKEND_RETRY_AFTER,
        )

    async def give_back(self, agent: str | None) -> None:
        with contextlib.suppress(BackendDown):
            await self.backend.run(self.key(agent), self.rate, self.burst, -1, 0.0)


# A charge is always taken, however deep it puts the bucket in debt.
_ALWAYS = 1e18


class SharedTokenLimit(SharedLimit):
    """A token limit (`rate_limit: [{tokens: ..., backend: ...}]`) kept in Redis.

    Admission takes one token (waiting up to max_wait for it, in arrival order,
    like a call limit); the answer's usage, less that token, is charged when it
    is known, into debt if need be, so the next calls of every sidecar wait.
    """

    kind = "token limiter"

    def __init__(
        self,
        *,
        service: str,
        limit: RateLimit,
        tokens: float,
        burst: int,
        backend: RedisBackend,
        detail: str,
    ) -> None:
        self._setup(
            service=service,
            limit=limit,
            rate=tokens,
            burst=burst,
            backend=backend,
            detail=detail,
            key_prefix="sidecar:tokens:"
            f"{service}:{fingerprint(('tokens', tokens, burst, limit.per))}",
        )

    async def charge(self, agent: str | None, tokens: int) -> None:
        # One token was taken at admission; an answer of 0 tokens gives it back.
        with contextlib.suppress(BackendDown):
            await self.backend.run(self.key(agent), self.rate, self.burst, tokens - 1, _ALWAYS)
