"""Adaptive pause: obey an upstream that answered 429 or 503 with Retry-After.

Every service has one, with or without a `rate_limit`. Until the time the
upstream named (at most MAX_PAUSE away), the sidecar refuses every call to the
service itself instead of sending it to an upstream that asked for quiet. The
refusal keeps the upstream's status: after a 429 it is `429 rate_limited`,
after a 503 `503 upstream_paused`; `Retry-After` always says when the pause
ends. The upstream's own 429/503 that started the pause passes through unchanged.

Which headers say how long to wait is the service's `limits:` (usually from
its template): `retry_after` lists them in order (OpenAI's `retry-after-ms`
before `Retry-After`); `quota` pairs a provider's remaining/reset headers
(`x-ratelimit-remaining-tokens` / `x-ratelimit-reset-tokens`), so a refusal
that only says "0 left" still pauses until the reset it names.

The pause sits before the rate limiter, so a refused call spends no token; the
limiter also looks at it after a queued call's wait (see ratelimit.py). Its
state lives in the store keyed by the service's upstream: a reload keeps a
running pause unless the service now points elsewhere.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from ...core.call import Call, Handler, Reply
from ...core.headers import reset_seconds, retry_after_seconds
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ...policy.upstream_limits import UpstreamLimits

Clock = Callable[[], float]

# An upstream's Retry-After is obeyed up to this long; a longer (or broken)
# value would otherwise silence a service for hours.
MAX_PAUSE: Final = 600.0

# The upstream status that started a pause -> the reason the sidecar refuses with.
REASON_AFTER: Final = {429: Reason.rate_limited, 503: Reason.upstream_paused}

# The statuses an API refuses with when one of its limits is used up (GitHub: 403).
_QUOTA_REFUSALS: Final = frozenset({403, 429})

_ASKED: Final = "asked for no calls until later ({header})"


class Pause:
    """A service-wide quiet period asked for by the upstream; also the step that keeps it."""

    def __init__(
        self,
        *,
        service: str,
        clock: Clock,
        wall: Clock = time.time,
        retry_after: Sequence[str] = ("Retry-After",),
        quota: Sequence[tuple[str, str]] = (),
        early: bool = False,
    ) -> None:
        self.service = service
        self.until = 0.0
        self.status = 429  # the refusal's: REASON_AFTER
        self.answered = 429  # the upstream's, for the message
        self.why = _ASKED.format(header="Retry-After")
        self._clock = clock
        # An HTTP-date Retry-After is wall-clock time; injectable for tests.
        self._wall = wall
        # (header, seconds per unit): a `-ms` header counts milliseconds.
        self._retry_after = tuple(
            (name, 0.001 if name.lower().endswith("-ms") else 1.0) for name in retry_after
        )
        self._quota = tuple(quota)
        self._early = early and bool(quota)

    async def __call__(self, call: Call, next: Handler) -> Reply:
        now = self._clock()
        if now < self.until:
            raise self.refusal(now)
        reply = await next(call)
        status = reply.status
        if status == 429 or status == 503 or (self._quota and status == 403) or self._early:
            self.observe(status, reply.headers)
        return reply

    def paused(self) -> ProblemError | None:
        """The refusal to answer with right now, or None outside a pause."""
        now = self._clock()
        return self.refusal(now) if now < self.until else None

    def observe(self, status: int, headers: Mapping[str, str]) -> None:
        if status == 429 or status == 503:
            for name, unit in self._retry_after:
                value = headers.get(name)
                if value is None:
                    continue
                delay = (
                    retry_after_seconds(value, self._wall())
                    if unit == 1.0
                    else _number(value, unit)
                )
                if delay is not None:
                    # The first header present decides, even when it says "now".
                    self._hold(delay, status, status, _ASKED.format(header=name))
                    return
        if self._quota and (status in _QUOTA_REFUSALS or self._early):
            self._observe_quota(status, headers)

    def _observe_quota(self, status: int, headers: Mapping[str, str]) -> None:
        for remaining, reset in self._quota:
            left = headers.get(remaining)
            if left is None or _number(left, 1.0) != 0:
                continue  # also -1, which some providers send for "unknown"
            value = headers.get(reset)
            delay = None if value is None else reset_seconds(value, self._wall())
            if delay is not None:
                # Whatever the refusal's status (GitHub: 403), it is a rate limit.
                self._hold(delay, 429, status, f"reported a limit used up ({remaining}: 0)")

    def _hold(self, delay: float, status: int, answered: int, why: str) -> None:
        if delay <= 0:
            return
        until = self._clock() + min(delay, MAX_PAUSE)
        if until > self.until:
            self.until = until
            self.status = status
            self.answered = answered
            self.why = why

    def refusal(self, now: float) -> ProblemError:
        wait = self.until - now
        seconds = max(1, math.ceil(wait))
        return ProblemError(
            REASON_AFTER[self.status],
            f"The upstream of service '{self.service}' answered {self.answered} and {self.why}; "
            "this refusal comes from the sidecar, which "
            f"holds every call to it until then. Retry after {seconds} "
            f"second{'s' if seconds != 1 else ''}.",
            service=self.service,
            retry_after=wait,
        )


def _number(value: str, unit: float) -> float | None:
    try:
        number = float(value.strip())
    except ValueError:
        return None
    return number * unit if math.isfinite(number) else None


def shared(service: ServicePolicy, *, state: StateBuild, clock: Clock) -> Pause:
    """The service's one Pause, whichever step asks for it first in a compile."""
    limits: UpstreamLimits = service.spec.limits
    retry_after = tuple(limits.retry_after)
    quota = tuple((q.remaining, q.reset) for q in limits.quota)
    # The default limits keep the key a running pause was stored under before they existed.
    # model_construct: the defaults without building the model's validator here.
    default = limits == UpstreamLimits.model_construct()
    key = (
        service.spec.upstream
        if default
        else (service.spec.upstream, retry_after, quota, limits.early)
    )
    return state.get(
        service.name,
        "pause",
        key,
        lambda: Pause(
            service=service.name,
            clock=clock,
            retry_after=retry_after,
            quota=quota,
            early=limits.early,
        ),
    )


def build(service: ServicePolicy, *, state: StateBuild, clock: Clock = time.monotonic) -> Pause:
    return shared(service, state=state, clock=clock)
