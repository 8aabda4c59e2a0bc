"""Allow rules compiled: may this agent make this call, judged on who, what and where.

Every glob is compiled once per load; a call costs a few regex matches. A rule
holds when every condition it gives holds (agent, method, path, operation, query,
fields). The HTTP allow step (steps/access/allow.py) decides which method and path a
call really has and how a refusal reads; the learn command judges samples with the
same compiled rules.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Protocol
from urllib.parse import unquote_plus

from ..policy.access import AllowRule, path_regex, value_regex


class Fields(Protocol):
    def getall(self, key: str, default: list[str], /) -> list[str]: ...


class Subject(Protocol):
    """Who makes the call and the fields it carries (read only by rules that name some)."""

    @property
    def agent(self) -> str | None: ...

    @property
    def headers(self) -> Fields: ...


def _alternation(regexes: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{r})" for r in regexes), re.DOTALL)


# Query parameters split on ';' as well as '&', as older CGI stacks and some Java
# servers do.
_SEMICOLON_SPLIT = re.compile(r"[&;]")

Pairs = list[tuple[str, str]]


def query_pairs(raw: str, *, semicolons: bool = False) -> Pairs:
    """Every (name, value) of a query, percent- and '+'-decoded, split on '&' (and ';')."""
    pairs = []
    for part in _SEMICOLON_SPLIT.split(raw) if semicolons else raw.split("&"):
        if part:
            name, _, value = part.partition("=")
            pairs.append((unquote_plus(name), unquote_plus(value)))
    return pairs


def query_readings(raw: str) -> list[Pairs]:
    """The ways common servers split a query: on '&', and, when it has one, on ';' too."""
    readings = [query_pairs(raw)]
    if ";" in raw:
        readings.append(query_pairs(raw, semicolons=True))
    return readings


def server_name(name: str) -> str:
    """The parameter a lenient server could read `name` as: any case, without a
    PHP/Rails array suffix (`a[]`, `a[x]`), with PHP's '.' and ' ' turned into '_'
    and its leading spaces and anything after a NUL dropped."""
    name = name.partition("\x00")[0].lstrip(" ").partition("[")[0]
    return name.replace(".", "_").replace(" ", "_").lower()


# What one rule's query conditions make of a call.
HOLDS = 0
FAILS = 1
AMBIGUOUS = 2


def dot_segment(path: str) -> bool:
    decoded = path.replace("%2F", "/").replace("\\", "/")
    return any(s.split(";", 1)[0] in (".", "..") for s in decoded.split("/"))


class CompiledRule:
    __slots__ = ("agents", "headers", "methods", "operations", "paths", "query")

    query: tuple[tuple[str, str, re.Pattern[str]], ...]

    def __init__(self, rule: AllowRule) -> None:
        self.agents = None if rule.agents is None else _alternation(map(value_regex, rule.agents))
        self.methods = None if rule.methods is None else frozenset(rule.methods)
        self.paths = None if rule.paths is None else _alternation(map(path_regex, rule.paths))
        self.operations = (
            None if rule.operations is None else _alternation(map(value_regex, rule.operations))
        )
        self.query = tuple(
            (k, server_name(k), re.compile(value_regex(v), re.DOTALL))
            for k, v in rule.query.items()
        )
        self.headers = tuple(
            (k, re.compile(value_regex(v), re.DOTALL)) for k, v in rule.headers.items()
        )

    def allows(
        self,
        who: Subject,
        method: str,
        path: str,
        query: list[Pairs] | None,
        operation: str | None = None,
    ) -> int:
        if self.methods is not None and method not in self.methods:
            return FAILS
        if self.operations is not None and (
            operation is None or self.operations.fullmatch(operation) is None
        ):
            return FAILS
        if self.agents is not None and (
            who.agent is None or self.agents.fullmatch(who.agent) is None
        ):
            return FAILS
        if self.paths is not None and self.paths.fullmatch(path) is None:
            return FAILS
        for name, pattern in self.headers:
            values = who.headers.getall(name, [])
            if not values or not all(pattern.fullmatch(v) for v in values):
                return FAILS
        if not self.query or query is None:
            return HOLDS
        # The rule must hold for every reading a server could make of the query.
        return max(self._query(pairs) for pairs in query)

    def _query(self, query: Pairs) -> int:
        verdict = HOLDS
        for name, read_as, pattern in self.query:
            found = [(k, v) for k, v in query if k == name or server_name(k) == read_as]
            if not found:
                return FAILS
            # Servers differ on which of several they read (first, last, an array, all
            # joined): only one, spelled as the rule spells it, reads the same everywhere.
            if len(found) > 1 or found[0][0] != name:
                verdict = AMBIGUOUS
            elif pattern.fullmatch(found[0][1]) is None:
                return FAILS
        return verdict
