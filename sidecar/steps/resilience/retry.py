"""Retries: try a failed call again, when that is safe and the service can take it.

- `attempts` counts every try, the first included.
- Retried: wire errors (`connect-error`, `timeout`, `reset`) and upstream
  statuses (`5xx`, `gateway-error` = 502/503/504, or codes) listed in `on`.
  Never the sidecar's own refusals: an open breaker (`circuit_open`) ends the
  retries at once.
- Only idempotent methods, unless the agent sent an `Idempotency-Key`; only
  bodies that can be sent again (buffered up to call.REPLAY_LIMIT), else one try.
- Backoff is exponential with full jitter, capped at `backoff.max`. An
  upstream `Retry-After` on a retried status wins; one longer than
  `backoff.max` is not waited for: the upstream's answer goes to the agent.
- Retry budget: retries in flight stay below max(min_concurrency,
  ratio * requests in flight), so retries cannot multiply an overload.
- The reply is returned before a byte of it reaches the agent, so a call is
  never retried after the agent has seen part of an answer. Out of attempts,
  the upstream's last answer goes back unchanged, or the last error is raised.

The step object is also its state (the budget counters): it lives in the
state store keyed by its Retry parameters.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ...core.call import Call, Handler, Reply, make_replayable
from ...core.headers import IDEMPOTENT, retry_after_seconds
from ...core.problems import ProblemError
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ...policy.models import Retry as RetryConfig
from .outcomes import Outcomes


class Retry:
    def __init__(
        self,
        *,
        service: str,
        config: RetryConfig,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        uniform: Callable[[float, float], float] = random.uniform,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.attempts = config.attempts
        self.initial = config.backoff.initial
        self.max = config.backoff.max
        self.ratio = config.budget.ratio
        self.min_concurrency = config.budget.min_concurrency
        self.on = list(config.on)
        outcomes = Outcomes.of(config.on)
        self._causes = outcomes.causes
        self._statuses = outcomes.statuses
        # Public so tests can replace them: no real waiting, no chance.
        self.sleep = sleep
        self.uniform = uniform
        self.wall = wall
        self.active = 0  # calls in flight through this step
        self.retrying = 0  # of those, calls past their first attempt
        self.retries = 0  # retries made, ever
        self.denied = 0  # retries the budget refused, ever

    async def __call__(self, call: Call, next: Handler) -> Reply:
        # Every call counts towards the budget's base, retried or not.
        self.active += 1
        retrying = False
        try:
            if self.attempts < 2 or (
                call.method not in IDEMPOTENT and call.header("Idempotency-Key") is None
            ):
                return await next(call)
            body = call.body
            # make_replayable's first test, inline: most calls have no body or a whole one.
            if not (body is None or isinstance(body, bytes)) and not await make_replayable(call):
                return await next(call)
            # The tries, in this coroutine: one frame fewer on every call's path.
            attempt = 1
            while True:
                call.attempt = attempt
                try:
                    reply = await next(call)
                except ProblemError as err:
                    if attempt >= self.attempts or err.cause not in self._causes:
                        raise
                    if not retrying and not self._within_budget():
                        raise
                    delay = self._backoff(attempt)
                else:
                    if attempt >= self.attempts or reply.status not in self._statuses:
                        return reply
                    delay = self._backoff(attempt)
                    header = reply.headers.get("Retry-After")
                    if header is not None:
                        wait = retry_after_seconds(header, self.wall())
                        if wait is not None:
                            if wait > self.max:
                                return reply
                            delay = wait
                    if not retrying and not self._within_budget():
                        return reply
                    reply.release()
                if not retrying:
                    retrying = True
                    self.retrying += 1
                self.retries += 1
                await self.sleep(delay)
                attempt += 1
        finally:
            self.active -= 1
            if retrying:
                self.retrying -= 1

    def _within_budget(self) -> bool:
        if self.retrying < max(self.min_concurrency, self.ratio * self.active):
            return True
        self.denied += 1
        return False

    def _backoff(self, attempt: int) -> float:
        # Full jitter: spreads the retries of many agents instead of syncing them.
        return self.uniform(0.0, min(self.max, self.initial * 2 ** (attempt - 1)))

    def snapshot(self) -> dict[str, Any]:
        """The retry policy and its budget as the admin /services page shows them."""
        return {
            "attempts": self.attempts,
            "on": self.on,
            "backoff": {"initial_seconds": self.initial, "max_seconds": self.max},
            "budget": {
                "ratio": self.ratio,
                "min_concurrency": self.min_concurrency,
                "requests_in_flight": self.active,
                "retries_in_flight": self.retrying,
            },
            "retries": self.retries,
            "retries_denied_by_budget": self.denied,
        }


def build(service: ServicePolicy, *, state: StateBuild) -> Retry | None:
    config = service.spec.retry
    if config is None:
        return None
    return state.get(
        service.name, "retry", config, lambda: Retry(service=service.name, config=config)
    )
