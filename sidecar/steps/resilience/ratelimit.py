"""Rate limits: token buckets per service or per agent, and queueing.

A call needs one token from every limit of its service. Local limits are
checked together and taken together, so a refusal by one never spends a
token of another. A token is reserved, not merely checked: with `max_wait`
the bucket may go into debt, and each waiting call sleeps until its own token
exists, so waiters are served in arrival order without a queue to manage.

Limits with a `backend` live in Redis (see `ratelimit_redis`) so several
sidecars share them. The pause an upstream asks for (429/503 with
Retry-After) is its own step, before this one (pause.py); a call queued here
looks at it again after its wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.state import StateBuild
from ...policy.loader import ServicePolicy
from ...policy.models import RateLimit
from ..protocols.operation import OPERATION
from . import pause as pause_step
from .pause import Pause

if TYPE_CHECKING:
    from .ratelimit_redis import SharedLimit

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]

# Per-agent buckets kept at most; the least recently seen agent is forgotten
# first, so a client inventing a new agent id per call cannot exhaust memory.
MAX_AGENTS = 10_000


def default_burst(limit: RateLimit) -> int:
    """One second's worth of the rate, at least one token."""
    if limit.burst is not None:
        return limit.burst
    return max(1, math.floor(limit.call_rate.per_second))


def describe(service: str, limit: RateLimit, burst: int) -> str:
    who = "each agent" if limit.per == "agent" else "all agents together"
    ops = f" on operations {', '.join(limit.operations)}" if limit.operations is not None else ""
    return (
        f"The sidecar's rate limit for service '{service}'{ops} ({limit.call_rate} with bursts of "
        f"{burst}, for {who}) is used up; this refusal comes from the sidecar, not the "
        "upstream."
    )


def limit_headers(burst: int, remaining: float, reset: float) -> dict[str, str]:
    """The IETF draft RateLimit headers; Reset is the seconds until the next token."""
    return {
        "RateLimit-Limit": str(burst),
        "RateLimit-Remaining": str(max(0, math.floor(remaining))),
        "RateLimit-Reset": str(max(1, math.ceil(reset))),
    }


def refusal(service: str, detail: str, wait: float, headers: dict[str, str] | None) -> ProblemError:
    seconds = max(1, math.ceil(wait))
    return ProblemError(
        "rate_limited",
        f"{detail} Retry after {seconds} second{'s' if seconds != 1 else ''}.",
        service=service,
        retry_after=wait,
        headers=headers,
    )


class Bucket:
    """Tokens and when they were last counted; negative while calls wait for theirs."""

    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp

    def wait(self, rate: float, burst: float, now: float) -> float:
        """Refill up to `now`; return how long until one whole token is there."""
        elapsed = now - self.stamp
        if elapsed > 0:
            tokens = self.tokens + elapsed * rate
            self.tokens = burst if tokens > burst else tokens
            self.stamp = now
        missing = 1.0 - self.tokens
        return missing / rate if missing > 0 else 0.0


class LocalLimit:
    """One `rate_limit` entry kept in this process: one bucket, or one per agent."""

    def __init__(self, *, service: str, limit: RateLimit, clock: Clock) -> None:
        self.rate = limit.call_rate.per_second
        self.burst = default_burst(limit)
        self.max_wait = limit.max_wait or 0.0
        self.per_agent = limit.per == "agent"
        self.detail = describe(service, limit, self.burst)
        # GraphQL/MCP operations (steps/protocols/operation.py): which calls count, and whether
        # each operation has its own bucket.
        self.operations = tuple(limit.operations) if limit.operations is not None else None
        self.by_operation = limit.by_operation
        self.plain = self.operations is None and not self.by_operation
        self._clock = clock
        self._bucket = Bucket(float(self.burst), clock())
        self._agents: OrderedDict[Hashable, Bucket] = OrderedDict()

    def bucket(self, agent: str | None) -> Bucket:
        if not self.per_agent:
            return self._bucket
        # Calls without an agent id share the None bucket, the "anonymous" agent.
        return self._keyed(agent)

    def _keyed(self, key: Hashable) -> Bucket:
        agents = self._agents
        found = agents.get(key)
        if found is not None:
            agents.move_to_end(key)
            return found
        found = agents[key] = Bucket(float(self.burst), self._clock())
        if len(agents) > MAX_AGENTS:
            agents.popitem(last=False)
        return found

    def find(self, agent: str | None) -> Bucket | None:
        """The bucket this call takes from; None when the limit does not count it."""
        if self.plain:
            return self.bucket(agent)
        labels = OPERATION.get()
        matched = labels[0] if labels else None
        if self.operations is not None:
            globs = self.operations
            matched = next((x for x in labels if any(fnmatchcase(x, g) for g in globs)), None)
            if matched is None:
                return None
        if not self.by_operation:
            return self.bucket(agent)
        return self._keyed((agent if self.per_agent else None, matched))

    def give_back(self, agent: str | None) -> None:
        bucket = self.find(agent)
        if bucket is not None:
            bucket.tokens = min(float(self.burst), bucket.tokens + 1.0)

    def headers(self, bucket: Bucket, wait: float) -> dict[str, str]:
        return limit_headers(self.burst, bucket.tokens, wait)


class RateLimiter:
    def __init__(
        self,
        *,
        service: str,
        local: tuple[LocalLimit, ...],
        shared: tuple[SharedLimit, ...],
        pause: Pause,
        clock: Clock,
        sleep: Sleep,
    ) -> None:
        self.service = service
        self._local = local
        # The common case, one local limit, skips the check-all-then-take-all loops.
        self._single = local[0] if len(local) == 1 else None
        self._shared = shared
        self._pause = pause
        self._clock = clock
        self._sleep = sleep
        self._refunds: set[asyncio.Task[None]] = set()

    def __call__(self, call: Call, next: Handler) -> Awaitable[Reply]:
        # Not a coroutine: a call that gets its tokens at once (nearly all) goes on as
        # the next step's awaitable, with no coroutine of this step's in the chain to
        # create and to pass every resumption through. A refusal raises here, where
        # the step before awaits it, as a `call.Before` step's does.
        agent = call.agent
        delay = self._take_local(agent, self._clock()) if self._local else 0.0
        if self._shared or delay > 0:
            return self._queued(call, next, agent, delay)
        return next(call)

    async def _queued(self, call: Call, next: Handler, agent: str | None, delay: float) -> Reply:
        if self._shared:
            delay = max(delay, await self._take_shared(agent))
        if delay > 0:
            try:
                await self._sleep(delay)
            except asyncio.CancelledError:
                # The agent gave up while queued: its reserved tokens go to the next caller.
                self._give_back(agent, len(self._shared))
                raise
            # The upstream may have asked for quiet while this call waited its turn.
            paused = self._pause.paused()
            if paused is not None:
                self._give_back(agent, len(self._shared))
                raise paused
        return await next(call)

    def _take_local(self, agent: str | None, now: float) -> float:
        single = self._single
        if single is not None:
            bucket = single.find(agent)
            if bucket is None:
                return 0.0
            wait = bucket.wait(single.rate, single.burst, now)
            if wait > single.max_wait:
                raise refusal(self.service, single.detail, wait, single.headers(bucket, wait))
            bucket.tokens -= 1.0
            return wait
        # All local buckets are checked before any is touched: one refusing
        # must not spend another's token.
        delay = 0.0
        refused: tuple[LocalLimit, Bucket, float] | None = None
        taking: list[Bucket] = []
        for limit in self._local:
            bucket = limit.find(agent)
            if bucket is None:
                continue
            taking.append(bucket)
            wait = bucket.wait(limit.rate, limit.burst, now)
            if wait > limit.max_wait and (refused is None or wait > refused[2]):
                refused = (limit, bucket, wait)
            if wait > delay:
                delay = wait
        if refused is not None:
            limit, bucket, wait = refused
            raise refusal(self.service, limit.detail, delay, limit.headers(bucket, wait))
        for bucket in taking:
            bucket.tokens -= 1.0
        return delay

    async def _take_shared(self, agent: str | None) -> float:
        delay = 0.0
        for taken, limit in enumerate(self._shared):
            try:
                ok, wait, tokens = await limit.take(agent)
            except BaseException:
                self._give_back(agent, taken)
                raise
            if not ok:
                self._give_back(agent, taken)
                headers = limit_headers(limit.burst, tokens, wait)
                raise refusal(self.service, limit.detail, max(delay, wait), headers)
            if wait > delay:
                delay = wait
        return delay

    def _give_back(self, agent: str | None, shared: int) -> None:
        for local in self._local:
            local.give_back(agent)
        for limit in self._shared[:shared]:
            # Refunding needs a round trip; the call that owed it is already gone.
            task = asyncio.get_running_loop().create_task(limit.give_back(agent))
            self._refunds.add(task)
            task.add_done_callback(self._refunds.discard)


def build(
    service: ServicePolicy,
    *,
    state: StateBuild,
    clock: Clock = time.monotonic,
    sleep: Sleep = asyncio.sleep,
) -> RateLimiter | None:
    # Token limits (`tokens:`) are the llm step's.
    limits = [x for x in service.spec.rate_limit if x.rate is not None]
    if not limits:
        return None
    name = service.name
    local: list[LocalLimit] = []
    shared: list[SharedLimit] = []
    for limit in limits:
        if limit.backend is None:
            # Keyed by the whole limit: unchanged parameters keep their bucket across
            # reloads, changed ones start full. Two identical entries are one bucket.
            bucket = state.get(
                name,
                "ratelimit",
                limit,
                lambda lim=limit: LocalLimit(service=name, limit=lim, clock=clock),  # type: ignore[misc]
            )
            if bucket not in local:
                local.append(bucket)
            continue
        url = limit.backend
        # Only a policy with a shared limit pays for the redis client's import.
        from .ratelimit_redis import RedisBackend, SharedLimit

        # One client (one connection pool) per backend URL, shared by every service.
        backend = state.get("*", "ratelimit-redis", url, lambda u=url: RedisBackend(u))  # type: ignore[misc]
        entry = SharedLimit(
            service=name,
            limit=limit,
            burst=default_burst(limit),
            backend=backend,
            detail=describe(name, limit, default_burst(limit)),
        )
        if all(entry.key_prefix != s.key_prefix for s in shared):
            shared.append(entry)
    return RateLimiter(
        service=name,
        local=tuple(local),
        shared=tuple(shared),
        pause=pause_step.shared(service, state=state, clock=clock),
        clock=clock,
        sleep=sleep,
    )
