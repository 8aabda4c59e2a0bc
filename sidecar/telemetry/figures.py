"""Per-service figures read from the Prometheus children metrics.py already keeps.

The console shows them and the alert rules judge them (both above the runtime, which
takes the readings on its timer); here, next to the metrics whose children it walks,
both read them downwards. Nothing here runs on the request path. `read_services` walks the bound
histogram children of `sidecar_request_duration_seconds` (a few dozen per
service) and adds them up; `Samples` keeps one such reading every 10 s for
30 minutes, which gives rates, windowed percentiles and the sparklines as
differences between two readings.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from .metrics import BUCKETS, Metrics

# One reading every SAMPLE_EVERY seconds, kept for KEEP_SECONDS: 180 readings at most.
SAMPLE_EVERY: Final = 10.0
KEEP_SECONDS: Final = 1800.0
# Calls per minute over the last minute; success rate and percentiles over the last five.
RATE_WINDOW: Final = 60.0
SLOW_WINDOW: Final = 300.0

_BOUNDS: Final = (*(float(b) for b in BUCKETS), math.inf)


@dataclass(slots=True)
class ServiceCounts:
    """Totals since start of one service's agent requests (as /metrics counts them)."""

    calls: float = 0.0
    ok: float = 0.0  # answered below 400
    refusals: dict[str, float] = field(default_factory=dict)  # the sidecar's, by reason
    upstream_errors: dict[str, float] = field(default_factory=dict)  # the upstream's, by code
    buckets: list[float] = field(default_factory=lambda: [0.0] * len(_BOUNDS))

    def minus(self, older: ServiceCounts | None) -> ServiceCounts:
        if older is None:
            return self
        return ServiceCounts(
            calls=self.calls - older.calls,
            ok=self.ok - older.ok,
            refusals={k: v - older.refusals.get(k, 0.0) for k, v in self.refusals.items()},
            upstream_errors={
                k: v - older.upstream_errors.get(k, 0.0) for k, v in self.upstream_errors.items()
            },
            buckets=[a - b for a, b in zip(self.buckets, older.buckets, strict=True)],
        )

    @property
    def errors(self) -> float:
        return self.calls - self.ok

    def quantile(self, q: float) -> float | None:
        """histogram_quantile's estimate, in seconds: linear within the bucket it falls in."""
        total = sum(self.buckets)
        if total <= 0:
            return None
        rank = q * total
        seen = 0.0
        lower = 0.0
        for bound, count in zip(_BOUNDS, self.buckets, strict=True):
            if count > 0 and seen + count >= rank:
                if math.isinf(bound):
                    return lower  # beyond the last bound: the last bound is all we know
                return lower + (bound - lower) * (rank - seen) / count
            seen += count
            if not math.isinf(bound):
                lower = bound
        return lower


def read_services(metrics: Metrics) -> dict[str, ServiceCounts]:
    """Every service's totals right now ("" holds the unrouted requests)."""
    out: dict[str, ServiceCounts] = {}
    for name, service in list(metrics._services.items()):
        counts = ServiceCounts()
        for (_method, status, reason), timings in list(service._requests.items()):
            values = [b._value for b in timings._buckets]
            n = float(sum(values))
            if n == 0:
                continue
            counts.calls += n
            for i, v in enumerate(values):
                counts.buckets[i] += v
            if status < 400:
                counts.ok += n
            elif reason:
                counts.refusals[reason] = counts.refusals.get(reason, 0.0) + n
            else:
                code = str(status)
                counts.upstream_errors[code] = counts.upstream_errors.get(code, 0.0) + n
        out[name] = counts
    return out


Reading = tuple[float, dict[str, ServiceCounts]]


class Samples:
    """A ring of readings, one per SAMPLE_EVERY seconds, KEEP_SECONDS long."""

    def __init__(
        self,
        metrics: Metrics,
        *,
        every: float = SAMPLE_EVERY,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.metrics = metrics
        self.every = every
        self._clock = clock
        self.ring: deque[Reading] = deque(maxlen=int(KEEP_SECONDS / every))

    def take(self) -> Reading:
        reading = (self._clock(), read_services(self.metrics))
        self.ring.append(reading)
        return reading

    def now(self) -> Reading:
        """A reading of this instant, not kept."""
        return (self._clock(), read_services(self.metrics))

    def before(self, at: float) -> Reading | None:
        """The newest kept reading not after `at`, else the oldest kept one."""
        found: Reading | None = None
        for reading in self.ring:
            if reading[0] <= at:
                found = reading
            else:
                break
        if found is None and self.ring:
            found = self.ring[0]
        return found

    def series(self, service: str) -> dict[str, list[float | None]]:
        """Per interval between kept readings: calls, errors, p99 (ms). Oldest first."""
        calls: list[float | None] = []
        errors: list[float | None] = []
        p99: list[float | None] = []
        previous: ServiceCounts | None = None
        first = True
        for _, services in self.ring:
            current = services.get(service)
            if not first:
                if current is None:
                    calls.append(0.0)
                    errors.append(0.0)
                    p99.append(None)
                else:
                    delta = current.minus(previous)
                    calls.append(delta.calls)
                    errors.append(delta.errors)
                    q = delta.quantile(0.99)
                    p99.append(None if q is None else round(q * 1000, 3))
            previous = current
            first = False
        return {"calls": calls, "errors": errors, "p99_ms": p99}
