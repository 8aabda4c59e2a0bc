"""Token limits (`rate_limit: [{tokens: 100000/min, per: agent}]`) of an LLM service.

A call's cost is known only once its answer reported its usage, so a token
bucket cannot reserve it up front: a call is let through while its bucket
holds at least one token, and charged the answer's input and output tokens
when the answer is over. The bucket may go into debt, and then later calls
wait (`max_wait`) or are refused with 429 `rate_limited` until it refills.

These buckets are this sidecar's own; a limit with a `backend` is kept in
Redis instead (engines/limits_redis.py, SharedTokenLimit), shared by every sidecar.
They live in the state store keyed by the limit, so a reload that keeps a
limit keeps its bucket.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from ...engines.limits import MAX_AGENTS, Bucket
from ...policy.models import RateLimit
from ..resilience.ratelimit import refusal

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]


def describe_tokens(service: str, limit: RateLimit) -> str:
    who = "each agent" if limit.per == "agent" else "all agents together"
    return (
        f"The sidecar's token limit for service '{service}' ({limit.tokens} for {who}) is "
        "used up by the tokens of earlier answers; this refusal comes from the sidecar, "
        "not the upstream."
    )


class TokenLimit:
    """One `tokens` entry: one bucket, or one per agent."""

    def __init__(self, *, service: str, limit: RateLimit, tokens: float, clock: Clock) -> None:
        self.rate = tokens
        self.burst = limit.burst or max(1, math.floor(tokens * 60))
        self.max_wait = limit.max_wait or 0.0
        self.per_agent = limit.per == "agent"
        self.detail = describe_tokens(service, limit)
        self._clock = clock
        self._bucket = Bucket(float(self.burst), clock())
        self._agents: OrderedDict[str | None, Bucket] = OrderedDict()

    def bucket(self, agent: str | None) -> Bucket:
        if not self.per_agent:
            return self._bucket
        agents = self._agents
        found = agents.get(agent)
        if found is not None:
            agents.move_to_end(agent)
            return found
        found = agents[agent] = Bucket(float(self.burst), self._clock())
        if len(agents) > MAX_AGENTS:
            agents.popitem(last=False)
        return found

    def charge(self, bucket: Bucket, tokens: int) -> None:
        bucket.wait(self.rate, self.burst, self._clock())  # refill up to now first
        bucket.tokens -= tokens


Charge = list[tuple[TokenLimit, Bucket]]


async def admit(
    limits: list[TokenLimit], agent: str | None, *, service: str, clock: Clock, sleep: Sleep
) -> Charge:
    """Wait (up to each limit's max_wait) until every bucket holds a token; the
    buckets to charge, or a 429 when a wait would be longer."""
    start = clock()
    while True:
        now = clock()
        charge = [(limit, limit.bucket(agent)) for limit in limits]
        longest, worst = 0.0, None
        for limit, bucket in charge:
            wait = bucket.wait(limit.rate, limit.burst, now)
            if wait > 0 and (now - start) + wait > limit.max_wait:
                raise refusal(service, limit.detail, wait, None)
            if wait > longest:
                longest, worst = wait, limit
        if worst is None:
            return charge
        await sleep(longest)


def settle(charge: Charge, tokens: int) -> None:
    for limit, bucket in charge:
        limit.charge(bucket, tokens)
