"""The database statement rules' cost per statement: issue 23 asks under 20 µs for a
statement already parsed (the sidecar caches parsed statements by text).

Measures, in CPU time of this process (`time.process_time()`, so a busy shared
machine hardly changes it), for a few statements an agent sends:
  judge   StatementRules.judge() on a parsed statement, with the rules of the
          issue's example (two rules, read_only), allowed and refused
  cached  parse() + judge() when the text is in the cache: what each query costs
  parse   parse() of a text never seen (the cache bypassed)
Bounded: about a second in all.

Run: .venv/bin/python bench/sql_rules.py [--repeat N]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from sidecar.databases.statements import StatementRules, parse
from sidecar.databases.statements.parse import _parse


@dataclass
class Rule:
    agents: Sequence[str]
    tables: Sequence[str]
    statements: Sequence[str]


RULES = [
    Rule(["research-*"], ["public.orders", "public.customers"], ["select"]),
    Rule(["etl-bot"], ["staging.*"], ["select", "insert", "update"]),
]

STATEMENTS = {
    # pgbench -S's statement.
    "pgbench -S": "SELECT abalance FROM pgbench_accounts WHERE aid = 4217;",
    "join + CTE": (
        "WITH big AS (SELECT id, cid, total FROM orders WHERE total > 100) "
        "SELECT c.name, sum(big.total) FROM big JOIN public.customers c ON c.id = big.cid "
        "WHERE c.country IN ('FR', 'DE', 'IT') GROUP BY c.name ORDER BY 2 DESC LIMIT 20"
    ),
    "read-only": "SELECT * FROM orders; UPDATE orders SET total = 0",
    "not allowed": "SELECT o.id FROM orders o JOIN secrets s ON s.id = o.id",
}


def per_call(fn: Callable[[], object], repeat: int) -> float:
    """CPU µs per call, best of three runs."""
    best = float("inf")
    for _ in range(3):
        start = time.process_time()
        for _ in range(repeat):
            fn()
        best = min(best, (time.process_time() - start) / repeat)
    return best * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20_000)
    args = parser.parse_args()
    repeat = max(100, args.repeat)
    rules = StatementRules.build(RULES, read_only=True, database="analytics")
    writable = StatementRules.build(RULES, read_only=False, database="analytics")
    pgbench = StatementRules.build(
        [Rule(["bench-*"], ["pgbench_*"], ["select"])], read_only=True, database="bench"
    )
    print(f"{'statement':<12} {'judge µs':>9} {'cached µs':>10} {'parse µs':>9}  verdict")
    for name, text in STATEMENTS.items():
        engine = {"pgbench -S": pgbench, "not allowed": writable}.get(name, rules)
        agent = "bench-1" if name == "pgbench -S" else "research-bot"
        print(row(name, text, engine, agent, repeat))


def row(name: str, text: str, engine: StatementRules, agent: str, repeat: int) -> str:
    statement = parse(text)
    verdict = engine.judge(agent, statement)
    judge = per_call(lambda: engine.judge(agent, statement), repeat)
    cached = per_call(lambda: engine.judge(agent, parse(text)), repeat)
    uncached = per_call(lambda: _parse(text), max(100, repeat // 50))
    shown = "allowed" if verdict is None else f"refused {verdict.sqlstate}"
    return f"{name:<12} {judge:>9.2f} {cached:>10.2f} {uncached:>9.1f}  {shown}"


if __name__ == "__main__":
    main()
