"""Bad budgets and prices are reported at their place, FILE:LINE:COL, by the loader."""

from __future__ import annotations

from pathlib import Path

from tests.policy.test_loader import errors, write


def test_budget_errors_point_at_their_values(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          a:
            upstream: http://x
            llm: {api: openai}
            budget: {tokens: 2M/week, per: agent}
          b:
            upstream: http://x
            llm: {api: openai}
            prices:
              gpt-4o: {input: 2.50, output: 10/1M}
            budget:
              - {tokens: 1M/day, cost: 5/day}
              - {cost: 5/dya}
          c:
            upstream: http://x
            llm: {api: openai}
            prices: {gpt-4o: {input: 2.50/1M, output: 10/1M}}
            budget: {cost: 50/month}
          d:
            upstream: http://x
            budget: {tokens: 1M/day, per: team}
        """,
    )
    f = f"{tmp_path}/p.yaml"
    assert errors(tmp_path) == [
        f"{f}:6:14: '2M/week' is not a budget; write an amount per calendar window (UTC) like "
        "'2M/day', '500K/hour' or '50/month'",
        f"{f}:11:23: 2.5 is not a price; write it per a number of tokens, like '2.50/1M' or "
        "'0.15/1K'",
        f"{f}:13:9: set either tokens or cost",
        f"{f}:14:16: '5/dya' is not a budget; write an amount per calendar window (UTC) like "
        "'2M/day', '500K/hour' or '50/month'",
        f"{f}:19:13: a cost budget needs prices: with a `default` entry, the price of every "
        "model the table does not name (else those calls would cost nothing)",
        f"{f}:22:30: Input should be 'service' or 'agent'",
    ]
