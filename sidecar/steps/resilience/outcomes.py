"""What an `on:` list (retry, circuit_breaker) matches: wire errors and statuses; and an
answer that counts as failed whatever its status."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from multidict import CIMultiDict

from ...core.call import StaticReply

WIRE_CAUSES: Final = ("connect-error", "timeout", "reset")


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


class CountedFailure(StaticReply):
    """An answer whose good status hides a failure the policy counts (a GraphQL 200 with
    `errors`): the agent gets it as it came, held in memory; the breaker counts it failed."""

    __slots__ = ("failure",)

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str],
        data: bytes,
        *,
        reason: str | None,
        failure: str,
    ) -> None:
        super().__init__(status, headers, data, reason=reason)
        self.failure = failure
