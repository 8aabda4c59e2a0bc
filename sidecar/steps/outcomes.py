"""What an `on:` list (retry, circuit_breaker) matches: wire errors and statuses."""

from __future__ import annotations

from dataclasses import dataclass

WIRE_CAUSES = ("connect-error", "timeout", "reset")


@dataclass(frozen=True, slots=True)
class Outcomes:
    causes: frozenset[str]  # matched against ProblemError.cause
    statuses: frozenset[int]

    @classmethod
    def of(cls, on: list[str | int]) -> Outcomes:
        statuses: set[int] = set()
        for item in on:
            if item == "5xx":
                statuses.update(range(500, 600))
            elif item == "gateway-error":
                statuses.update((502, 503, 504))
            elif isinstance(item, int):
                statuses.add(item)
        return cls(
            causes=frozenset(c for c in on if isinstance(c, str) and c in WIRE_CAUSES),
            statuses=frozenset(statuses),
        )
