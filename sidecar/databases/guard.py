"""What decides about one statement of one agent: the rules (db-rules' engine) and the limits.

A thin adapter: the statement engine (statements/) parses and judges, the
token buckets of the rate-limit engine (engines/limits.py) count, as for HTTP. Both the
wire relay and the HTTP face ask the same Guard, so they refuse alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from ..core.reasons import Reason
from ..engines.limits import LocalLimit
from ..policy.databases import Database
from ..policy.models import RateLimit
from .statements import Statement, StatementError, StatementRules, parse


@dataclass(frozen=True, slots=True)
class Refusal:
    """A refusal in both forms: SQLSTATE for the wire, reason for problem+json."""

    sqlstate: str
    reason: str  # a core.reasons.Reason
    message: str
    hint: str | None = None
    retry_after: float | None = None


class Guard:
    def __init__(self, name: str, db: Database) -> None:
        self.name = name
        self.rules = StatementRules.build(db.allow, read_only=db.read_only, database=name)
        self.limits = [
            LocalLimit(
                service=name,
                limit=RateLimit.model_validate(
                    {
                        "rate": str(limit.rate),
                        "burst": limit.burst,
                        "per": "agent" if limit.per == "agent" else "service",
                    }
                ),
                clock=time.monotonic,
            )
            for limit in db.rate_limit
        ]

    def judge(self, agent: str, sql: str) -> tuple[Statement | None, Refusal | None]:
        try:
            statement = parse(sql)
        except StatementError as exc:
            return None, Refusal("42601", Reason.bad_request, exc.message)
        verdict = self.rules.judge(agent, statement)
        if verdict is None:
            return statement, None
        return statement, Refusal(verdict.sqlstate, verdict.reason, verdict.message, verdict.hint)

    def take(self, agent: str) -> Refusal | None:
        """One token of every rate limit, all or none."""
        if not self.limits:
            return None
        now = time.monotonic()
        longest = 0.0
        buckets = []
        for limit in self.limits:
            bucket = limit.bucket(agent)
            wait = bucket.wait(limit.rate, limit.burst, now)
            buckets.append(bucket)
            longest = max(longest, wait)
        if longest > 0:
            seconds = max(1, math.ceil(longest))
            return Refusal(
                "53400",
                Reason.rate_limited,
                f"The sidecar's rate limit for database '{self.name}' is used up for agent "
                f"'{agent}'; this refusal comes from the sidecar, not the database.",
                f"Retry after {seconds} second{'s' if seconds != 1 else ''}.",
                longest,
            )
        for bucket in buckets:
            bucket.tokens -= 1.0
        return None
