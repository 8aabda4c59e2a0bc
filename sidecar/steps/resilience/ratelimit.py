"""Rate limits: token buckets per service or per agent, and queueing.

A call needs one token from every limit of its service. Local limits are
checked together and taken together, so a refusal by one never spends a
token of another. A token is reserved, not merely checked: with `max_wait`
the bucket may go into debt, and each waiting call sleeps until its own token
exists, so waiters are served in arrival order without a queue to manage.

Limits with a `backend` live in Redis (see engines/limits_redis.py) so several
sidecars share them. The pause an upstream asks for (429/503 with
Retry-After) is its own step, before this one (pause.py); a call queued here
looks at it again after its wait.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...engines.limits import (
    Bucket,
    Clock,
    LocalLimit,
    default_burst,
    describe,
    limit_headers,
)
from ...policy.loaded import ServicePolicy
from ..operation import OPERATION
from . import pause as pause_step
from .pause import Pause

if TYPE_CHECKING:
    from ...engines.limits_redis import SharedLimit

Sleep = Callable[[float], Awaitable[None]]


def refusal(service: str, detail: str, wait: float, headers: dict[str, str] | None) -> ProblemError:
    seconds = max(1, math.ceil(wait))
    return ProblemError(
        Reason.rate_limited,
        f"{detail} Retry after {seconds} second{'s' if seconds != 1 else ''}.",
        service=service,
        retry_after=wait,
        headers=headers,
    )


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
            bucket = single.find(agent) if single.plain else single.find(agent, OPERATION.get())
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
            bucket = limit.find(agent) if limit.plain else limit.find(agent, OPERATION.get())
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
            local.give_back(agent, OPERATION.get())
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
                lambda lim=limit: LocalLimit(  # type: ignore[misc]
                    service=name, limit=lim, clock=clock
                ),
            )
            if bucket not in local:
                local.append(bucket)
            continue
        url = limit.backend
        # Only a policy with a shared limit pays for the redis client's import.
        from ...engines.limits_redis import RedisBackend, SharedLimit

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
