"""Token buckets with an injected clock: admitted while positive, charged after, debt waits."""

from __future__ import annotations

import pytest

from sidecar.core.problems import ProblemError
from sidecar.policy.models import RateLimit
from sidecar.steps.llm.llm_limits import TokenLimit, admit, settle


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def limit(text: str, clock: Clock, **keys: object) -> TokenLimit:
    config = RateLimit.model_validate({"tokens": text, **keys})
    assert config.tokens is not None
    return TokenLimit(service="s", limit=config, tokens=config.tokens.per_second, clock=clock)


async def test_debt_makes_the_next_call_wait_within_max_wait() -> None:
    clock = Clock()
    tokens = limit("60/min", clock, max_wait="30s")  # 1 token/s, burst: a minute's worth
    assert tokens.burst == 60
    charge = await admit([tokens], "a", service="s", clock=clock, sleep=clock.sleep)
    settle(charge, 70)  # 60 - 70 = -10: in debt
    charge = await admit([tokens], "a", service="s", clock=clock, sleep=clock.sleep)
    assert clock.slept == [pytest.approx(11.0)]  # until one whole token is back
    settle(charge, 100)
    with pytest.raises(ProblemError) as refused:
        await admit([tokens], "a", service="s", clock=clock, sleep=clock.sleep)
    assert refused.value.reason == "rate_limited"
    # Per agent: one agent's debt leaves the others' buckets full.
    per_agent = limit("60/min", clock, per="agent")
    settle(await admit([per_agent], "a", service="s", clock=clock, sleep=clock.sleep), 500)
    await admit([per_agent], "b", service="s", clock=clock, sleep=clock.sleep)


def test_token_limits_refuse_keys_of_call_limits() -> None:
    for bad in (
        {"tokens": "1/s", "rate": "1/s"},
        {"burst": 3},
        {"tokens": "1/s", "operations": ["a"]},
        {"tokens": "1/s", "by_operation": True},
    ):
        with pytest.raises(ValueError):
            RateLimit.model_validate(bad)
    # A token limit may be shared through Redis, like a call limit.
    RateLimit.model_validate({"tokens": "1/s", "backend": "redis://127.0.0.1:6379/0"})
