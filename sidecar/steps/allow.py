"""Allow rules: which agent may make which call to a service.

A service's rules are its own `allow:`, else the top-level `allow:`; none at all
lets every call through (no step is built). A call passes when one rule allows
it: every condition that rule gives holds (agent, method, path, query, headers).
Every glob is compiled here, once per load; a call costs a few regex matches.

Rules judge the call the upstream will run, not just the one on the wire:
- a method-override header (X-HTTP-Method-Override and kin) reaches the upstream
  only on a service that names the methods it may carry (`method_override`), and
  the rules then judge that method; elsewhere the router drops those headers;
- an encoded `/` or `\\` (%2F, %5C) in the path is refused with 400: upstreams
  differ on whether it separates segments (Envoy's path_with_escaped_slashes_action);
- a query condition holds only for a parameter written once, exactly as the rule
  names it: a repeat, another case (`State`), a PHP/Rails array (`state[]`) or a
  `;`-separated one that some server could read as the same parameter is
  ambiguous, and refused with 400 unless another rule allows the call.
Paths are compared percent-decoded once. A path that could spell a dot segment
once decoded is never allowed (the listener already refuses those; this step
does not rely on it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

from ..call import Call, Handler, Reply
from ..policy.access import (
    METHOD_OVERRIDE_HEADERS,
    AllowRule,
    match_form,
    path_regex,
    value_regex,
)
from ..policy.loader import ServicePolicy
from ..problems import ProblemError
from ..state import StateBuild
from . import Step

# An agent-chosen name ends up in the refusal: bound its size.
_MAX_NAME = 128
# Decisions kept per (method, agent, path) when no rule reads the query or headers:
# agents repeat the same calls, and ten rules of globs cost more than the proxying.
# Cleared when full, so calls never seen again cannot grow it.
DECISIONS = 4096


def _alternation(regexes: Iterable[str]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{r})" for r in regexes), re.DOTALL)


# An encoded '/' or '\\' in any case, or a bare '\\' (some servers read it as '/').
_ESCAPED_SEPARATOR = re.compile(r"%2[fF]|%5[cC]|\\")
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
_HOLDS = 0
_FAILS = 1
_AMBIGUOUS = 2


def _dot_segment(path: str) -> bool:
    decoded = path.replace("%2F", "/").replace("\\", "/")
    return any(s.split(";", 1)[0] in (".", "..") for s in decoded.split("/"))


if TYPE_CHECKING:
    from .. import openapi


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
        call: Call,
        method: str,
        path: str,
        query: list[Pairs] | None,
        operation: str | None = None,
    ) -> int:
        if self.methods is not None and method not in self.methods:
            return _FAILS
        if self.operations is not None and (
            operation is None or self.operations.fullmatch(operation) is None
        ):
            return _FAILS
        if self.agents is not None and (
            call.agent is None or self.agents.fullmatch(call.agent) is None
        ):
            return _FAILS
        if self.paths is not None and self.paths.fullmatch(path) is None:
            return _FAILS
        for name, pattern in self.headers:
            values = call.headers.getall(name, [])
            if not values or not all(pattern.fullmatch(v) for v in values):
                return _FAILS
        if not self.query or query is None:
            return _HOLDS
        # The rule must hold for every reading a server could make of the query.
        return max(self._query(pairs) for pairs in query)

    def _query(self, query: Pairs) -> int:
        verdict = _HOLDS
        for name, read_as, pattern in self.query:
            found = [(k, v) for k, v in query if k == name or server_name(k) == read_as]
            if not found:
                return _FAILS
            # Servers differ on which of several they read (first, last, an array, all
            # joined): only one, spelled as the rule spells it, reads the same everywhere.
            if len(found) > 1 or found[0][0] != name:
                verdict = _AMBIGUOUS
            elif pattern.fullmatch(found[0][1]) is None:
                return _FAILS
        return verdict


class Allow:
    def __init__(
        self,
        *,
        service: str,
        rules: Iterable[AllowRule],
        source: str,
        spec: openapi.Spec | None = None,
        method_override: Iterable[str] = (),
        escaped_slashes: str = "refuse",
    ) -> None:
        self.service = service
        self.rules = tuple(CompiledRule(r) for r in rules)
        self.source = source
        self.method_override = frozenset(method_override)
        self._refuse_escaped = escaped_slashes == "refuse"
        self._needs_query = any(r.query for r in self.rules)
        # The OpenAPI document that names operations, matched only when a rule asks.
        self._spec = spec if any(r.operations is not None for r in self.rules) else None
        # Without query or header conditions a decision depends on the method, the
        # agent and the path alone (an operation too: the document matches the path).
        self._decisions: dict[tuple[str, str | None, str], bool] | None = (
            {} if not self._needs_query and not any(r.headers for r in self.rules) else None
        )

    def allows(self, call: Call) -> bool:
        """True when a rule allows the call; a 400 ProblemError when the call could be
        read two ways and no rule allows it whichever way."""
        # The method the upstream will run (an override included): part of the decision.
        method = self._method(call)
        if not self.rules:
            return True
        decisions = self._decisions
        if decisions is None:
            return self._decide(call, method)
        key = (method, call.agent, call.target.partition("?")[0])
        found = decisions.get(key)
        if found is None:
            if len(decisions) >= DECISIONS:
                decisions.clear()
            found = decisions[key] = self._decide(call, method)
        return found

    def _decide(self, call: Call, method: str) -> bool:
        raw_path, _, raw_query = call.target.partition("?")
        if (
            self._refuse_escaped
            and ("%" in raw_path or "\\" in raw_path)
            and _ESCAPED_SEPARATOR.search(raw_path)
        ):
            raise ProblemError(
                "bad_request",
                f"The path holds an encoded '/' or '\\' (%2F, %5C); service '{self.service}' "
                "has allow rules, and upstreams differ on whether it separates segments. "
                "Send the path without encoded separators.",
                service=self.service,
            )
        path = match_form(raw_path)
        if ("." in path or "\\" in path) and _dot_segment(path):
            return False
        query = query_readings(raw_query) if self._needs_query else None
        spec = self._spec
        operation = spec.operation_id(method, call.target) if spec is not None else None
        ambiguous = False
        for rule in self.rules:
            verdict = rule.allows(call, method, path, query, operation)
            if verdict == _HOLDS:
                return True
            ambiguous = ambiguous or verdict == _AMBIGUOUS
        if ambiguous:
            raise ProblemError(
                "bad_request",
                f"A query parameter that an allow rule of service '{self.service}' checks is "
                "given more than once, or in another spelling (another case, a `name[]` "
                "array, after a ';'), which servers read differently. Send it once, "
                "spelled as the rule names it.",
                service=self.service,
            )
        return False

    def _method(self, call: Call) -> str:
        """The method the upstream will run: the request line's, or the one an override
        (a header, or the `_method` query parameter of Express's method-override and
        Laravel) names on a service that takes them."""
        method = call.method.upper()
        query = call.target.partition("?")[2]
        named = set()
        if "method" in query.lower():
            named = {
                v.strip().upper()
                for k, v in query_pairs(query, semicolons=True)
                if server_name(k) == "_method"
            }
        if not self.method_override:
            if named:
                raise ProblemError(
                    "bad_request",
                    f"The query names a method (`_method`) that some servers run instead of "
                    f"{method}; service '{self.service}' takes no method override. Send the "
                    "request with the method itself.",
                    service=self.service,
                )
            return method
        named.update(
            value.strip().upper()
            for header in METHOD_OVERRIDE_HEADERS
            for value in call.headers.getall(header, ())
        )
        if not named:
            return method
        if len(named) > 1 or not named <= self.method_override:
            raise ProblemError(
                "bad_request",
                f"The method overrides name {', '.join(sorted(named))[:64]}; service "
                f"'{self.service}' takes one of {', '.join(sorted(self.method_override))} "
                "there (a method-override header or `_method`), and one only.",
                service=self.service,
            )
        return named.pop()

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if not self.allows(call):
            raise self._refusal(call)
        return await next(call)

    def _refusal(self, call: Call) -> ProblemError:
        who = f"agent '{call.agent[:_MAX_NAME]}'" if call.agent else "an unnamed agent"
        where = (
            f"the allow rules of service '{self.service}' ({self.source})"
            if self.source != "allow"
            else "the default allow rules (top-level allow)"
        )
        path = call.target.partition("?")[0]
        return ProblemError(
            "forbidden",
            f"No rule of {where} lets {who} call {self._method(call)} {path[:256]}; "
            "ask the platform team to allow it.",
            service=self.service,
        )


def build(service: ServicePolicy, *, state: StateBuild) -> Step | None:
    overrides = service.spec.method_override
    if not service.allow and not overrides:
        return None
    return Allow(
        service=service.name,
        rules=service.allow or (),
        source=service.allow_from,
        spec=service.openapi,
        method_override=overrides,
        escaped_slashes=service.spec.escaped_slashes,
    )
