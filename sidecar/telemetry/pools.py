"""Connection pools of connectors (databases, ...), as the console and alerts see them.

A connector that keeps a pool registers a callable with `Pools.register`; the
console calls it when it is read (every few seconds at most, never on the
request path) and the `pool_saturated` alert rule when it evaluates. Nothing
here imports a connector: the hook points up, the connector registers down.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

log = logging.getLogger("sidecar.telemetry")


@dataclass(frozen=True, slots=True)
class PoolSnapshot:
    """One pool right now. `name` is what the policy calls it (a database's name)."""

    kind: str  # "postgres", ...
    name: str
    size: int  # connections open
    in_use: int  # of those, lent out
    max: int  # the most it may open
    waiting: int = 0  # callers queued for a connection

    @property
    def saturation(self) -> float:
        """In use over the most allowed, 0..1; 1 with callers waiting is a saturated pool."""
        return self.in_use / self.max if self.max > 0 else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "name": self.name,
            "size": self.size,
            "in_use": self.in_use,
            "idle": max(0, self.size - self.in_use),
            "max": self.max,
            "waiting": self.waiting,
            "saturation": round(self.saturation, 4),
        }


PoolSource = Callable[[], Iterable[PoolSnapshot]]


class Pools:
    """The registered sources; `register` returns the function that unregisters."""

    def __init__(self) -> None:
        self._sources: list[PoolSource] = []

    def register(self, source: PoolSource) -> Callable[[], None]:
        self._sources.append(source)

        def unregister() -> None:
            if source in self._sources:
                self._sources.remove(source)

        return unregister

    def snapshot(self) -> list[PoolSnapshot]:
        out: list[PoolSnapshot] = []
        for source in list(self._sources):
            try:
                out.extend(source())
            except Exception:
                # One broken connector must not take the console down with it.
                log.exception("a pool snapshot failed")
        return out
