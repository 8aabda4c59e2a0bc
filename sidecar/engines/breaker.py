"""A circuit breaker's state machine: closed, open, half-open, over a sliding window.

closed -> open when, over the sliding `window`, at least `min_requests` calls
were seen and failures/total >= `failure_ratio`; open -> half-open after
`open_for`; half-open lets at most `half_open_requests` probes through at a
time: that many successes close it (with a fresh window), one failure opens it
again. What counts as a failure is the protocol's to say (the HTTP step:
steps/resilience/breaker.py); the machine is told failed, succeeded, or neither.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Final

from ..policy.models import CircuitBreaker

CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"

# The window is kept as this many buckets: recording a call is two increments,
# and old calls slide out a bucket at a time instead of one by one.
BUCKETS: Final = 10

# How long a refused caller should wait while the half-open probes are out:
# they settle the breaker within about one upstream round trip.
PROBING_RETRY_AFTER: Final = 1.0


class Circuit:
    """The state machine of one breaker: admit a call, settle it, move between states."""

    def __init__(
        self,
        *,
        service: str,
        config: CircuitBreaker,
        clock: Callable[[], float] = time.monotonic,
        on_transition: list[Callable[[str, str, str], None]] | None = None,
    ) -> None:
        self.service = service
        # Called on every state change as (service, from, to); the sidecar's
        # StateStore.hooks list, shared by its breakers, so metrics register once.
        self.on_transition = on_transition if on_transition is not None else []
        self.failure_ratio = config.failure_ratio
        self.min_requests = config.min_requests
        self.window = config.window
        self.open_for = config.open_for
        self.half_open_requests = config.half_open_requests
        # Public so tests (and only tests) can swap in a fake clock.
        self.clock = clock
        self.state = CLOSED
        self.transitions: dict[str, int] = {}
        # Bumped on every transition: a call settles only in the generation it was
        # admitted in, so a slow call from before an opening cannot close a circuit.
        self.generation = 0
        # Why the last call admit() refused could not go (see admit).
        self.wait = 0.0
        self.probing = False
        self._opened_at = 0.0
        self._probes = 0  # in flight
        self._passed = 0  # successful probes in this half-open period
        self._width = config.window / BUCKETS
        self._totals = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self._epoch = int(clock() / self._width)
        self.total = 0
        self.failed = 0

    def admit(self) -> int:
        """A call's generation, to settle it with; -1 when it may not go, with `wait`
        (seconds until it may) and `probing` (half-open, its probes all out) set.

        A value, not an exception: compiled by mypyc, a native exception class raised
        here crashed the collector later. Read at once by the caller (no await between).
        """
        now = self.clock()
        if self.state == OPEN:
            wait = self._opened_at + self.open_for - now
            if wait > 0:
                self.wait = wait
                self.probing = False
                return -1
            self._move(HALF_OPEN, now)
        if self._probes >= self.half_open_requests:
            self.wait = PROBING_RETRY_AFTER
            self.probing = True
            return -1
        self._probes += 1
        return self.generation

    def settle(self, generation: int, failed: bool | None) -> None:
        if generation != self.generation:
            return
        if self.state == CLOSED:
            if failed is None:
                return
            now = self.clock()
            self._advance(now)
            slot = self._epoch % BUCKETS
            self._totals[slot] += 1
            self.total += 1
            if failed:
                self._failures[slot] += 1
                self.failed += 1
                if (
                    self.total >= self.min_requests
                    and self.failed >= self.failure_ratio * self.total
                ):
                    self._move(OPEN, now)
            return
        # Same generation and not closed: this call was a half-open probe.
        self._probes -= 1
        if failed is None:
            return
        if failed:
            self._move(OPEN, self.clock())
        else:
            self._passed += 1
            if self._passed >= self.half_open_requests:
                self._move(CLOSED, self.clock())

    def _advance(self, now: float) -> None:
        epoch = int(now / self._width)
        gap = epoch - self._epoch
        if gap == 0:
            return
        if gap < 0 or gap >= BUCKETS:
            # A clock that went back can only be a swapped clock: start over.
            self._reset(epoch)
            return
        for e in range(self._epoch + 1, epoch + 1):
            slot = e % BUCKETS
            self.total -= self._totals[slot]
            self.failed -= self._failures[slot]
            self._totals[slot] = 0
            self._failures[slot] = 0
        self._epoch = epoch

    def _reset(self, epoch: int) -> None:
        self._totals = [0] * BUCKETS
        self._failures = [0] * BUCKETS
        self.total = 0
        self.failed = 0
        self._epoch = epoch

    def _move(self, to: str, now: float) -> None:
        frm = self.state
        self.state = to
        self.generation += 1
        if to == OPEN:
            self._opened_at = now
        elif to == HALF_OPEN:
            self._probes = 0
            self._passed = 0
        else:
            self._reset(int(now / self._width))
        key = f"{frm}->{to}"
        self.transitions[key] = self.transitions.get(key, 0) + 1
        for hook in self.on_transition:
            hook(self.service, frm, to)

    def snapshot(self) -> dict[str, Any]:
        """The breaker as the admin /services page shows it."""
        now = self.clock()
        state = self.state
        retry_in = 0.0
        if state == OPEN:
            retry_in = max(0.0, self._opened_at + self.open_for - now)
            if retry_in == 0.0:
                state = HALF_OPEN  # becomes so on the next call
        elif state == CLOSED:
            self._advance(now)
        return {
            "state": state,
            # While open: the counts that opened it.
            "failures": self.failed,
            "requests": self.total,
            "window_seconds": self.window,
            "failure_ratio": self.failure_ratio,
            "min_requests": self.min_requests,
            "half_open_in_seconds": round(retry_in, 3),
            "probes_in_flight": self._probes if self.state == HALF_OPEN else 0,
            "transitions": dict(self.transitions),
        }
