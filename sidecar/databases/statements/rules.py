"""Which agent may run which statement on which tables: a database's `allow:` rules.

A statement (a whole string: every statement in it) is allowed when
- nothing in it is refused whatever the rules (the guards, worked out by `parse`);
- on a `read_only` database, nothing in it writes or asks for a read-write transaction;
- with rules: each kind it runs is allowed by a rule naming the agent, and each table
  it touches is allowed, for what it does there, by such a rule. Different rules may
  cover different tables of one statement. Housekeeping kinds (BEGIN, SHOW, SET, ...)
  need only some rule naming the agent; catalog reads need a rule that allows SELECT.

Agent globs are the HTTP allow rules' (`value_regex` of sidecar/policy/access.py: `*`
is any text). A table glob is `schema.table` or `table` (schema public), each part
an identifier as PostgreSQL reads it (folded to lower case unless double-quoted)
where `*` is any text within that part; `*` alone is every table of every schema.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Protocol

from ...policy.access import value_regex
from .names import glob_shown, table_glob
from .parse import Access, Statement
from .verdict import FORBIDDEN, INSUFFICIENT_PRIVILEGE, READ_ONLY_TRANSACTION, Verdict

# An agent-chosen name ends up in the refusal: bound its size (as steps/access/allow.py does).
_MAX_NAME: Final = 128
# Agents seen, with the rules that name them; cleared when full (names are agent-chosen).
_MAX_AGENTS: Final = 4096


class RuleLike(Protocol):
    """One allow rule, as the policy model holds it. An empty list is "any"."""

    @property
    def agents(self) -> Sequence[str] | None: ...
    @property
    def tables(self) -> Sequence[str] | None: ...
    @property
    def statements(self) -> Sequence[str] | None: ...


def _matcher(glob: str) -> re.Pattern[str] | None:
    """None matches anything; else a compiled glob (the HTTP rules' `value_regex`)."""
    if glob == "*":
        return None
    return re.compile(value_regex(glob), re.DOTALL)


class _Rule:
    __slots__ = ("agents", "every_table", "kinds", "shown", "tables")

    def __init__(self, rule: RuleLike) -> None:
        agents = list(rule.agents or ())
        self.agents = (
            None
            if not agents or "*" in agents
            else re.compile("|".join(f"(?:{value_regex(a)})" for a in agents), re.DOTALL)
        )
        statements = [s.lower() for s in rule.statements or ()]
        self.kinds: frozenset[str] | None = frozenset(statements) if statements else None
        globs = [table_glob(t) for t in rule.tables or ()]
        self.every_table = not globs or ("*", "*") in globs
        self.tables = tuple((_matcher(s), _matcher(n)) for s, n in globs)
        kinds = ", ".join(s.upper() for s in statements) if statements else "any statement"
        where = (
            "every table"
            if self.every_table
            else ", ".join(f"{glob_shown(s)}.{glob_shown(n)}" for s, n in globs)
        )
        self.shown = f"{kinds} on {where}"

    def names(self, agent: str) -> bool:
        return self.agents is None or self.agents.fullmatch(agent) is not None

    def allows_kind(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def allows(self, access: Access) -> bool:
        if self.kinds is not None and access.action not in self.kinds:
            return False
        if self.every_table:
            return True
        if access.schema is None:
            return False
        for schema, name in self.tables:
            if (schema is None or schema.fullmatch(access.schema) is not None) and (
                name is None or name.fullmatch(access.name) is not None
            ):
                return True
        return False


class StatementRules:
    """A database's statement policy, built once per policy load."""

    __slots__ = ("_agents", "_database", "_read_only", "_restores_guards", "_rules")

    def __init__(
        self,
        rules: tuple[_Rule, ...] | None,
        *,
        read_only: bool,
        database: str,
        restores_guards: bool = False,
    ) -> None:
        self._rules = rules
        self._read_only = read_only
        self._database = database
        self._restores_guards = restores_guards
        self._agents: dict[str, tuple[_Rule, ...]] = {}

    @classmethod
    def build(
        cls,
        rules: Sequence[RuleLike] | None,
        *,
        read_only: bool,
        database: str,
        restores_guards: bool = False,
    ) -> StatementRules:
        """`rules` None: no allow rules (only the guards); an empty list allows nothing.
        `restores_guards`: the connector sets the session's guards again after a RESET
        ALL or DISCARD ALL (asyncpg's pool sends RESET ALL on every release), so those
        two may run; otherwise they are refused. ValueError for a table glob that
        cannot be meant."""
        compiled = None if rules is None else tuple(_Rule(r) for r in rules)
        return cls(
            compiled, read_only=read_only, database=database, restores_guards=restores_guards
        )

    def judge(self, agent: str, statement: Statement) -> Verdict | None:
        """None when `agent` may run `statement` (the whole string), else the refusal."""
        if statement.refusal is not None:
            return statement.refusal
        if statement.resets_all is not None and not self._restores_guards:
            return Verdict(
                INSUFFICIENT_PRIVILEGE,
                FORBIDDEN,
                f"statement refused: {statement.resets_all} would undo the guards the sidecar "
                "sets on every session (read-only, statement timeout, search_path); it is "
                "refused for every agent",
                "nothing in this string ran; reset single settings (RESET TimeZone) instead",
            )
        if self._read_only and (statement.read_write or statement.write_kind is not None):
            return self._read_only_verdict(statement)
        if self._rules is None or statement.count == 0:
            return None
        rules = self._agents.get(agent)
        if rules is None:
            rules = self._for(agent)
        if not rules:
            return self._refuse(agent, rules, "", no_rule=True)
        # Tables first: "writes public.orders (UPDATE)" says more than "runs UPDATE".
        for access in statement.accesses:
            if access.catalog:
                if any(r.allows_kind("select") for r in rules):
                    continue
            elif any(r.allows(access) for r in rules):
                continue
            return self._refuse(agent, rules, _doing(access))
        for kind in statement.needs:
            if not any(r.allows_kind(kind) for r in rules):
                return self._refuse(agent, rules, f"runs {kind.upper()}")
        return None

    def allowed_summary(self, agent: str) -> str:
        """What `agent` may run here, e.g. "SELECT on public.orders, public.customers"."""
        if self._rules is None:
            return "any statement the guards allow"
        rules = self._for(agent)
        if not rules:
            return "nothing"
        return "; ".join(r.shown for r in rules)

    def _for(self, agent: str) -> tuple[_Rule, ...]:
        rules = tuple(r for r in self._rules or () if r.names(agent))
        if len(self._agents) >= _MAX_AGENTS:
            self._agents.clear()
        self._agents[agent] = rules
        return rules

    def _refuse(
        self, agent: str, rules: tuple[_Rule, ...], doing: str, *, no_rule: bool = False
    ) -> Verdict:
        who = f"agent '{agent[:_MAX_NAME]}'" if agent else "an unnamed agent"
        where = f"the allow rules of database '{self._database}'"
        if no_rule:
            return Verdict(
                INSUFFICIENT_PRIVILEGE,
                FORBIDDEN,
                f"statement refused: {where} name no rule for {who}, so it may run nothing here",
                f"ask for an allow rule naming {who} under databases.{self._database}.allow",
            )
        allowed = "; ".join(r.shown for r in rules)
        return Verdict(
            INSUFFICIENT_PRIVILEGE,
            FORBIDDEN,
            f"statement refused by {where}: {who} may run {allowed}; this statement {doing}",
            f"allowed here: {allowed}",
        )

    def _read_only_verdict(self, statement: Statement) -> Verdict:
        if statement.read_write:
            doing = "asks for a read-write transaction"
        elif statement.write is not None:
            doing = _doing(statement.write)
        else:
            doing = f"runs {str(statement.write_kind).upper()}"
        return Verdict(
            READ_ONLY_TRANSACTION,
            FORBIDDEN,
            f"statement refused: database '{self._database}' is read-only; this statement {doing}",
            "only statements that read (SELECT, SHOW, ...) run on this database",
        )


def _doing(access: Access) -> str:
    if access.schema is None:
        return (
            f"runs {access.action.upper()} on {access.name}, which needs a rule with "
            f'{access.action} on every table ("*")'
        )
    verb = "writes" if access.write else "reads"
    return f"{verb} {access.table} ({access.action.upper()})"
