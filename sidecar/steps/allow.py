"""Allow rules: which agent may make which call to a service.

A service's rules are its own `allow:`, else the top-level `allow:`; none at all
lets every call through (no step is built). A call passes when one rule allows
it: every condition that rule gives holds (agent, method, path, query, headers).
Every glob is compiled here, once per load; a call costs a few regex matches.

Paths are compared percent-decoded once, except that an encoded slash (%2F)
stays inside its segment, so `*` never stretches across what an upstream might
read as two segments. A path that could spell a dot segment once decoded is
never allowed (the listener already refuses those; this step does not rely on it).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from ..call import Call, Handler, Reply
from ..policy.access import AllowRule, match_form, path_regex, value_regex
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


def _dot_segment(path: str) -> bool:
    decoded = path.replace("%2F", "/").replace("\\", "/")
    return any(s.split(";", 1)[0] in (".", "..") for s in decoded.split("/"))


if TYPE_CHECKING:
    from .. import openapi


class CompiledRule:
    __slots__ = ("agents", "headers", "methods", "operations", "paths", "query")

    def __init__(self, rule: AllowRule) -> None:
        self.agents = None if rule.agents is None else _alternation(map(value_regex, rule.agents))
        self.methods = None if rule.methods is None else frozenset(rule.methods)
        self.paths = None if rule.paths is None else _alternation(map(path_regex, rule.paths))
        self.operations = (
            None if rule.operations is None else _alternation(map(value_regex, rule.operations))
        )
        self.query = tuple(
            (k, re.compile(value_regex(v), re.DOTALL)) for k, v in rule.query.items()
        )
        self.headers = tuple(
            (k, re.compile(value_regex(v), re.DOTALL)) for k, v in rule.headers.items()
        )

    def allows(
        self,
        call: Call,
        path: str,
        query: list[tuple[str, str]] | None,
        operation: str | None = None,
    ) -> bool:
        if self.methods is not None and call.method.upper() not in self.methods:
            return False
        if self.operations is not None and (
            operation is None or self.operations.fullmatch(operation) is None
        ):
            return False
        if self.agents is not None and (
            call.agent is None or self.agents.fullmatch(call.agent) is None
        ):
            return False
        if self.paths is not None and self.paths.fullmatch(path) is None:
            return False
        for name, pattern in self.query:
            values = [v for k, v in query or () if k == name]
            # Every value must match: upstreams differ on which of several they read.
            if not values or not all(pattern.fullmatch(v) for v in values):
                return False
        for name, pattern in self.headers:
            values = call.headers.getall(name, [])
            if not values or not all(pattern.fullmatch(v) for v in values):
                return False
        return True


class Allow:
    def __init__(
        self,
        *,
        service: str,
        rules: Iterable[AllowRule],
        source: str,
        spec: openapi.Spec | None = None,
    ) -> None:
        self.service = service
        self.rules = tuple(CompiledRule(r) for r in rules)
        self.source = source
        self._needs_query = any(r.query for r in self.rules)
        # The OpenAPI document that names operations, matched only when a rule asks.
        self._spec = spec if any(r.operations is not None for r in self.rules) else None
        # Without query or header conditions a decision depends on the method, the
        # agent and the path alone (an operation too: the document matches the path).
        self._decisions: dict[tuple[str, str | None, str], bool] | None = (
            {} if not self._needs_query and not any(r.headers for r in self.rules) else None
        )

    def allows(self, call: Call) -> bool:
        decisions = self._decisions
        if decisions is None:
            return self._decide(call)
        key = (call.method, call.agent, call.target.partition("?")[0])
        found = decisions.get(key)
        if found is None:
            if len(decisions) >= DECISIONS:
                decisions.clear()
            found = decisions[key] = self._decide(call)
        return found

    def _decide(self, call: Call) -> bool:
        raw_path, _, raw_query = call.target.partition("?")
        path = match_form(raw_path)
        if ("." in path or "\\" in path) and _dot_segment(path):
            return False
        query = parse_qsl(raw_query, keep_blank_values=True) if self._needs_query else None
        spec = self._spec
        operation = spec.operation_id(call.method, call.target) if spec is not None else None
        return any(rule.allows(call, path, query, operation) for rule in self.rules)

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
            f"No rule of {where} lets {who} call {call.method} {path[:256]}; "
            "ask the platform team to allow it.",
            service=self.service,
        )


def build(service: ServicePolicy, *, state: StateBuild) -> Step | None:
    if not service.allow:
        return None
    return Allow(
        service=service.name, rules=service.allow, source=service.allow_from, spec=service.openapi
    )
