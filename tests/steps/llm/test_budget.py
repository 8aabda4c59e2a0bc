"""Budgets with an injected wall clock: admitted while something is left, charged after,
refused until the calendar window (UTC) resets; spend kept in a real SQLite file."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path

import pytest
from multidict import CIMultiDict

from sidecar.core.call import Call, Reply, StaticReply
from sidecar.core.problems import ProblemError, problem_parts
from sidecar.engines.ledger import LedgerDown, MemoryLedger
from sidecar.engines.ledger_sqlite import SqliteLedger
from sidecar.policy.budget import Budget, parse_allowance, parse_price
from sidecar.policy.llm import LLM
from sidecar.policy.models import Service
from sidecar.steps.llm.budget import BudgetLimit, Pricing, window_bounds
from sidecar.steps.llm.llm import LLMStep


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


class Wall:
    def __init__(self, text: str) -> None:
        self.now = at(text)

    def __call__(self) -> float:
        return self.now


def test_windows_are_calendar_aligned_in_utc() -> None:
    assert window_bounds("hour", at("2026-11-30T23:59:59")) == (
        at("2026-11-30T23:00:00"),
        at("2026-12-01T00:00:00"),
    )
    assert window_bounds("day", at("2026-11-30T12:00:00")) == (
        at("2026-11-30T00:00:00"),
        at("2026-12-01T00:00:00"),
    )
    assert window_bounds("month", at("2026-12-31T23:00:00")) == (
        at("2026-12-01T00:00:00"),
        at("2027-01-01T00:00:00"),
    )
    assert window_bounds("month", at("2028-02-10T00:00:00"))[1] == at("2028-03-01T00:00:00")


def test_amounts_and_prices_parse_and_bad_ones_say_how_to_write_them() -> None:
    assert parse_allowance("2M/day").amount == 2_000_000
    assert parse_allowance("500K/hour").window == "hour"
    assert parse_allowance("12.5/month").amount == 12.5
    assert parse_price("2.50/1M") == pytest.approx(2.5e-6)
    assert parse_price("0.15/1K") == pytest.approx(0.15e-3)
    with pytest.raises(ValueError, match="calendar window"):
        parse_allowance("2M/week")
    with pytest.raises(ValueError, match="per a number of tokens"):
        parse_price("3")
    with pytest.raises(ValueError, match="either tokens or cost"):
        Budget.model_validate({"per": "agent"})


def test_prices_match_exact_names_then_globs_then_default() -> None:
    service = Service.model_validate(
        {
            "upstream": "http://127.0.0.1:1",
            "llm": {"api": "openai"},
            "prices": {
                "gpt-4o": {"input": "2.50/1M", "output": "10/1M"},
                "gpt-4o*": {"input": "5/1M", "output": "20/1M"},
                "default": {"input": "1/1M", "output": "1/1M"},
            },
        }
    )
    pricing = Pricing(service.prices)
    assert pricing.cost("gpt-4o", 1_000_000, 100_000) == pytest.approx(3.5)
    assert pricing.cost("gpt-4o-mini", 1_000_000, 0) == pytest.approx(5.0)
    assert pricing.cost("llama3", 1_000_000, 1_000_000) == pytest.approx(2.0)
    assert pricing.cost(None, 1_000_000, 0) == pytest.approx(1.0)


def budget(wall: Wall, ledger: object = None, **keys: object) -> BudgetLimit:
    return BudgetLimit(
        service="llm",
        budget=Budget.model_validate(keys),
        ledger=ledger or MemoryLedger(),  # type: ignore[arg-type]
        clock=wall,
    )


async def test_admitted_until_spent_then_refused_until_the_window_resets() -> None:
    wall = Wall("2026-11-30T22:00:00")
    day = budget(wall, tokens="100/day", per="agent")
    await day.check("a")
    await day.charge("a", 60)
    await day.check("a")  # 40 left: admitted, whatever the call will cost
    await day.charge("a", 70)  # 130 of 100: the last call may overspend
    with pytest.raises(ProblemError) as refused:
        await day.check("a")
    err = refused.value
    assert err.reason == "budget_exhausted" and err.status == 429
    assert err.retry_after == pytest.approx(2 * 3600)
    status, headers, body = problem_parts(err)
    document = json.loads(body)
    assert status == 429
    assert ("X-Sidecar-Error", "budget_exhausted") in headers
    assert ("Retry-After", "7200") in headers
    assert document["resets_at"] == "2026-12-01T00:00:00Z"
    assert (document["budget"], document["limit"], document["spent"]) == (
        "tokens 100/day per agent",
        100,
        130,
    )
    assert "resets at 2026-12-01T00:00:00Z" in document["detail"]
    # Another agent has a budget of its own; the next day starts afresh.
    await day.check("b")
    wall.now = at("2026-12-01T00:00:00")
    await day.check("a")


async def test_a_service_budget_is_shared_by_all_agents() -> None:
    wall = Wall("2026-11-30T22:00:00")
    shared = budget(wall, cost="1.5/hour")
    await shared.charge("a", 1.0)
    await shared.charge("b", 0.5)
    with pytest.raises(ProblemError):
        await shared.check("c")
    assert shared.snapshot()["remaining"] == 0


async def test_sqlite_spend_survives_a_new_ledger_on_the_same_dir(tmp_path: Path) -> None:
    wall = Wall("2026-11-30T22:00:00")
    first = SqliteLedger(str(tmp_path))
    limit = budget(wall, first, tokens="1K/day")
    await limit.check(None)
    await limit.charge(None, 600)
    await limit.charge(None, 600)
    first.retire()
    # No memory of the first: what it acknowledged is read from the file.
    second = SqliteLedger(str(tmp_path))
    again = budget(wall, second, tokens="1K/day")
    with pytest.raises(ProblemError) as refused:
        await again.check(None)
    assert refused.value.extra is not None and refused.value.extra["spent"] == 1200
    # A different budget (another amount) is another key: it starts at nothing.
    await budget(wall, second, tokens="2K/day").check(None)
    second.retire()


async def test_a_budget_store_that_cannot_open_is_down_and_says_so_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The data dir is a file: the store cannot be created there.
    data_dir = tmp_path / "not-a-dir"
    data_dir.write_text("")
    ledger = SqliteLedger(str(data_dir))
    with caplog.at_level(logging.ERROR, logger="sidecar.budgets"):
        with pytest.raises(LedgerDown):
            await ledger.spent("k", 0, 86400)
        with pytest.raises(LedgerDown):
            await ledger.add("k", 0, 86400, 10)
    ledger.retire()
    path = data_dir / "budgets.db"
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [
        f"cannot open the budget store {path}",
        f"budget store {path}",
    ]
    assert (
        caplog.records[1]
        .getMessage()
        .endswith(f"a charge could not be written: the budget store {path} could not be opened")
    )


def usage_reply(prompt: int, completion: int) -> StaticReply:
    document = {
        "model": "gpt-4o",
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
    }
    headers = CIMultiDict({"Content-Type": "application/json"})
    return StaticReply(200, headers, json.dumps(document).encode())


async def test_the_llm_step_charges_the_answer_before_its_body_ends() -> None:
    wall = Wall("2026-11-30T22:00:00")
    ledger = MemoryLedger()
    limit = budget(wall, ledger, tokens="20/day", per="agent")
    step = LLMStep(service="llm", llm=LLM(api="openai"), budgets=[limit])
    sent: list[int] = []

    async def upstream(call: Call) -> Reply:
        sent.append(1)
        return usage_reply(12, 5)

    def call() -> Call:
        body = b'{"model": "gpt-4o", "messages": []}'
        return Call(
            service="llm",
            method="POST",
            target="/v1/chat/completions",
            headers=CIMultiDict({"Content-Type": "application/json"}),
            body=body,
            agent="a",
        )

    for _ in range(2):
        reply = await step(call(), upstream)
        assert reply.body is not None
        data = b"".join([chunk async for chunk in reply.body])
        assert json.loads(data)["usage"]["prompt_tokens"] == 12  # unchanged for the agent
    # Charged by the time the body ended: 34 of 20, the third call is refused unsent.
    assert ledger.cached(limit.key("a"), int(at("2026-11-30T00:00:00"))) == 34
    with pytest.raises(ProblemError) as refused:
        await step(call(), upstream)
    assert refused.value.reason == "budget_exhausted"
    assert len(sent) == 2
