"""Adaptive pause: obey an upstream that answered 429 or 503 with Retry-After.

Every service has one, with or without a `rate_limit`. Until the time the
upstream named (at most MAX_PAUSE away), the sidecar refuses every call to the
service itself instead of sending it to an upstream that asked for quiet. The
refusal keeps the upstream's status: after a 429 it is `429 rate_limited`,
after a 503 `503 upstream_paused`; `Retry-After` always says when the pause
ends. The upstream's own 429/503 that started the pause passes through unchanged.

The pause sits before the rate limiter, so a refused call spends no token; the
limiter also looks at it after a queued call's wait (see ratelimit.py). Its
state lives in the store keyed by the service's upstream: a reload keeps a
running pause unless the service now points elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping

from ..call import Call, Handler, Reply
from ..headers import retry_after_seconds
from ..policy.loader import ServicePolicy
from ..problems import ProblemError
from ..state import StateBuild

Clock = Callable[[], float]

# An upstream's Retry-After is obeyed up to this long; a longer (or broken)
# value would otherwise silence a service for hours.
MAX_PAUSE = 600.0

# The upstream status that started a pause -> the reason the sidecar refuses with.
REASON_AFTER = {429: "rate_limited", 503: "upstream_paused"}


class Pause:
    """A service-wide quiet period asked for by the upstream; also the step that keeps it."""

    def __init__(self, *, service: str, clock: Clock, wall: Clock = time.time) -> None:
        self.service = service
        self.until = 0.0
        self.status = 429
        self._clock = clock
        # An HTTP-date Retry-After is wall-clock time; injectable for tests.
        self._wall = wall

    async def __call__(self, call: Call, next: Handler) -> Reply:
        now = self._clock()
        if now < self.until:
            raise self.refusal(now)
        reply = await next(call)
        status = reply.status
        if status == 429 or status == 503:
            self.observe(status, reply.headers)
        return reply

    def paused(self) -> ProblemError | None:
        """The refusal to answer with right now, or None outside a pause."""
        now = self._clock()
        return self.refusal(now) if now < self.until else None

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        value = headers.get("Retry-After")
        if value is None:
            return
        delay = retry_after_seconds(value, self._wall())
        if delay is None or delay <= 0:
            return
        until = self._clock() + min(delay, MAX_PAUSE)
        if until > self.until:
            self.until = until
            self.status = status

    def refusal(self, now: float) -> ProblemError:
        wait = self.until - now
        seconds = max(1, math.ceil(wait))
        return ProblemError(
            REASON_AFTER[self.status],
            f"The upstream of service '{self.service}' answered {self.status} and asked for "
            "no calls until later (Retry-After); this refusal comes from the sidecar, which "
            f"holds every call to it until then. Retry after {seconds} "
            f"second{'s' if seconds != 1 else ''}.",
            service=self.service,
            retry_after=wait,
        )


def shared(service: ServicePolicy, *, state: StateBuild, clock: Clock) -> Pause:
    """The service's one Pause, whichever step asks for it first in a compile."""
    return state.get(
        service.name,
        "pause",
        service.spec.upstream,
        lambda: Pause(service=service.name, clock=clock),
    )


def build(service: ServicePolicy, *, state: StateBuild, clock: Clock = time.monotonic) -> Pause:
    return shared(service, state=state, clock=clock)
