"""Budgets (`budget: {tokens: 2M/day, per: agent}` or `{cost: 50/month}`) of an LLM service.

Like a token limit, a budget cannot know a call's cost before its answer: a
call is admitted while the budget's window has something left, and charged
the answer's usage (tokens, or their price from `prices:`) once the answer is
over, so the last call of a window may overspend it. Over budget, the sidecar
answers 429 `budget_exhausted` with when the window resets, until it does.

Windows are calendar-aligned in UTC (policy/budget.py). The spend lives in a
ledger: the data dir's SQLite file, or Redis with `backend` (steps/llm/llm.py
awaits the charge before the answer ends, so it survives `kill -9`).
"""

from __future__ import annotations

import fnmatch
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import fingerprint
from ...engines.ledger import Ledger, LedgerDown
from ...policy.budget import Budget, Price

log = logging.getLogger("sidecar.budgets")

Clock = Callable[[], float]

_SECONDS = {"hour": 3600, "day": 86400}


def window_bounds(window: str, now: float) -> tuple[int, int]:
    """Start and end (UTC epoch seconds) of the calendar window holding `now`."""
    t = int(now)
    span = _SECONDS.get(window)
    if span is not None:
        start = t - t % span
        return start, start + span
    day = datetime.fromtimestamp(t, UTC)
    first = datetime(day.year, day.month, 1, tzinfo=UTC)
    after = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
    return int(first.timestamp()), int(after.timestamp())


def iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _amount(value: float) -> float | int:
    return int(value) if value == int(value) else round(value, 6)


class Pricing:
    """The `prices:` table: exact names first, then globs in the policy's order, then default."""

    def __init__(self, prices: dict[str, Price]) -> None:
        self._exact = {name: p for name, p in prices.items() if name != "default"}
        self._globs = [(n, p) for n, p in self._exact.items() if any(c in n for c in "*?[")]
        self._default = prices.get("default")

    def cost(self, model: str | None, input: int, output: int) -> float:
        price = self._exact.get(model) if model is not None else None
        if price is None and model is not None:
            price = next((p for n, p in self._globs if fnmatch.fnmatchcase(model, n)), None)
        if price is None:
            price = self._default
        if price is None:  # the policy refuses a cost budget without a default
            return 0.0
        return input * price.input + output * price.output


class BudgetLimit:
    """One `budget` entry: its spend per window, for the service or for each agent."""

    def __init__(self, *, service: str, budget: Budget, ledger: Ledger, clock: Clock) -> None:
        allowance = budget.allowance
        self.service = service
        self.unit = budget.unit
        self.amount = allowance.amount
        self.window = allowance.window
        self.per_agent = budget.per == "agent"
        self.fail_open = budget.fail_open
        self.name = budget.describe()
        self.ledger = ledger
        self._clock = clock
        digest = fingerprint((self.unit, self.amount, self.window, budget.per))
        self.key_prefix = f"{service}:{digest}"
        self._anonymous = self.key_prefix + ":anonymous"
        who = "each agent" if self.per_agent else "all agents together"
        what = "tokens" if self.unit == "tokens" else "cost (from the policy's prices)"
        self._what = f"{what} {allowance} for {who}"

    def key(self, agent: str | None) -> str:
        if not self.per_agent:
            return self.key_prefix
        return self._anonymous if agent is None else f"{self.key_prefix}:agent:{agent}"

    async def check(self, agent: str | None) -> None:
        """Return when the budget has something left; else raise 429 budget_exhausted."""
        now = self._clock()
        start, end = window_bounds(self.window, now)
        key = self.key(agent)
        spent = self.ledger.cached(key, start)
        if spent is None:
            try:
                spent = await self.ledger.spent(key, start, end)
            except LedgerDown:
                if self.fail_open:
                    return
                raise self._unavailable() from None
        if spent >= self.amount:
            raise self._exhausted(spent, now, end)

    async def charge(self, agent: str | None, amount: float) -> None:
        if amount <= 0:
            return
        start, end = window_bounds(self.window, self._clock())
        try:
            await self.ledger.add(self.key(agent), start, end, amount)
        except LedgerDown:
            # The answer was served; its charge is lost, and the next admission says so.
            log.warning(
                "budget of service %s: a charge was lost (its store is unavailable)", self.service
            )

    def snapshot(self) -> dict[str, object]:
        """For /services: the budget, its window, and (per service) what is left."""
        start, end = window_bounds(self.window, self._clock())
        out: dict[str, object] = {
            "budget": self.name,
            "limit": _amount(self.amount),
            "window_start": iso(start),
            "resets_at": iso(end),
        }
        if not self.per_agent:
            spent = self.ledger.cached(self.key(None), start)
            if spent is not None:
                out["spent"] = _amount(spent)
                out["remaining"] = _amount(max(0.0, self.amount - spent))
        return out

    def _exhausted(self, spent: float, now: float, end: int) -> ProblemError:
        wait = max(1.0, end - now)
        seconds = math.ceil(wait)
        return ProblemError(
            Reason.budget_exhausted,
            f"The sidecar's budget for service '{self.service}' ({self._what}, per calendar "
            f"{self.window} in UTC) is spent; it resets at {iso(end)}, in {seconds} seconds. "
            "Retry then, or use another service; this refusal comes from the sidecar, not "
            "the upstream.",
            service=self.service,
            retry_after=wait,
            extra={
                "budget": self.name,
                "unit": self.unit,
                "limit": _amount(self.amount),
                "spent": _amount(spent),
                "window": self.window,
                "resets_at": iso(end),
            },
        )

    def _unavailable(self) -> ProblemError:
        return ProblemError(
            Reason.rate_limited,
            f"The store that keeps the budget of service '{self.service}' is unavailable, and "
            "the policy says to refuse calls until it is back; this refusal comes from the "
            "sidecar, not the upstream. Retry after 1 second.",
            service=self.service,
            retry_after=1.0,
        )
