"""Allow rules: which agent may make which call to a service.

A service's rules are its own `allow:`, else the top-level `allow:`; none at all
lets every call through (no step is built). A call passes when one rule allows
it: every condition that rule gives holds (agent, method, path, query, headers).

The rules are compiled and matched by the allow engine (engines/allow.py); this step
decides what the call really is. Rules judge the call the upstream will run, not
just the one on the wire:
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

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...engines.allow import (
    AMBIGUOUS,
    HOLDS,
    CompiledRule,
    dot_segment,
    query_pairs,
    query_readings,
    server_name,
)
from ...policy.access import METHOD_OVERRIDE_HEADERS, AllowRule, match_form
from ...policy.loaded import ServicePolicy
from .. import Step

# An agent-chosen name ends up in the refusal: bound its size.
_MAX_NAME = 128
# Decisions kept per (method, agent, path) when no rule reads the query or headers:
# agents repeat the same calls, and ten rules of globs cost more than the proxying.
# Cleared when full, so calls never seen again cannot grow it.
DECISIONS = 4096


# An encoded '/' or '\\' in any case, or a bare '\\' (some servers read it as '/').
_ESCAPED_SEPARATOR = re.compile(r"%2[fF]|%5[cC]|\\")

if TYPE_CHECKING:
    from ... import openapi


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
        target = call.target
        end = target.find("?")
        key = (method, call.agent, target if end < 0 else target[:end])
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
                Reason.bad_request,
                f"The path holds an encoded '/' or '\\' (%2F, %5C); service '{self.service}' "
                "has allow rules, and upstreams differ on whether it separates segments. "
                "Send the path without encoded separators.",
                service=self.service,
            )
        path = match_form(raw_path)
        if ("." in path or "\\" in path) and dot_segment(path):
            return False
        query = query_readings(raw_query) if self._needs_query else None
        spec = self._spec
        operation = spec.operation_id(method, call.target) if spec is not None else None
        ambiguous = False
        for rule in self.rules:
            verdict = rule.allows(call, method, path, query, operation)
            if verdict == HOLDS:
                return True
            ambiguous = ambiguous or verdict == AMBIGUOUS
        if ambiguous:
            raise ProblemError(
                Reason.bad_request,
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
        method = call.method
        if not method.isupper():
            method = method.upper()
        target = call.target
        start = target.find("?")
        query = "" if start < 0 else target[start + 1 :]
        if not query and not self.method_override:
            return method  # nothing could name another method
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
                    Reason.bad_request,
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
                Reason.bad_request,
                f"The method overrides name {', '.join(sorted(named))[:64]}; service "
                f"'{self.service}' takes one of {', '.join(sorted(self.method_override))} "
                "there (a method-override header or `_method`), and one only.",
                service=self.service,
            )
        return named.pop()

    def before(self, call: Call) -> None:
        """The whole step, run before the next (a `core.call.Before` step): the chain
        links the next step directly, with no coroutine of this one's per call."""
        if not self.allows(call):
            raise self._refusal(call)

    async def __call__(self, call: Call, next: Handler) -> Reply:
        self.before(call)
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
            Reason.forbidden,
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
