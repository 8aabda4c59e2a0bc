"""Token buckets: one per service, or one per agent (and per operation), in this process.

The decision only: how long until a token is there, and whose bucket a call takes
from. The HTTP rate-limit step (steps/resilience/ratelimit.py) and the database
connector's guard (databases/guard.py) are adapters over it; limits_redis.py is the
same limit kept in Redis, shared by several sidecars.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Hashable
from fnmatch import fnmatchcase

from ..policy.models import RateLimit

Clock = Callable[[], float]
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
        # Operations (GraphQL/MCP over HTTP: steps/operation.py): which calls
        # count, and whether each operation has its own bucket: `find` is given the
        # operations of the call being counted (read by the caller only when not plain).
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

    def find(self, agent: str | None, labels: tuple[str, ...] = ()) -> Bucket | None:
        """The bucket this call takes from; None when the limit does not count it."""
        if self.plain:
            return self.bucket(agent)
        matched = labels[0] if labels else None
        if self.operations is not None:
            globs = self.operations
            matched = next((x for x in labels if any(fnmatchcase(x, g) for g in globs)), None)
            if matched is None:
                return None
        if not self.by_operation:
            return self.bucket(agent)
        return self._keyed((agent if self.per_agent else None, matched))

    def give_back(self, agent: str | None, labels: tuple[str, ...] = ()) -> None:
        bucket = self.find(agent, labels)
        if bucket is not None:
            bucket.tokens = min(float(self.burst), bucket.tokens + 1.0)

    def headers(self, bucket: Bucket, wait: float) -> dict[str, str]:
        return limit_headers(self.burst, bucket.tokens, wait)
