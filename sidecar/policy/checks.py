"""Cross-checks over a whole policy, once every file is read and merged: what no one
model can see alone (operations and agents allow rules name, fallback services, the
header agents prove who they are with). Each problem at its FILE:LINE:COL."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .access import AllowRule, value_regex
from .base import _did_you_mean, closest
from .loaded import ServicePolicy
from .models import (
    Agents,
)
from .positions import Problem
from .yamlpos import Document, Path


def operation_problems(
    allow: tuple[Document, list[AllowRule]] | None,
    services: Mapping[str, ServicePolicy],
    written_in: Mapping[str, Document],
) -> list[Problem]:
    """`operations` in allow rules name operationIds of the service's OpenAPI document."""
    problems: list[Problem] = []
    if allow is not None:
        for i, rule in enumerate(allow[1]):
            if rule.operations is not None:
                problems.append(
                    Problem(
                        allow[0].position(("allow", i, "operations")),
                        "operations name a service's OpenAPI operations: write this rule "
                        "under services.<name>.allow",
                    )
                )
    for name, sp in services.items():
        for i, rule in enumerate(sp.spec.allow or ()):
            if rule.operations is None:
                continue
            doc = written_in[name]
            at: Path = ("services", name, "allow", i, "operations")
            if sp.openapi is None:
                if sp.spec.openapi is None:
                    problems.append(
                        Problem(
                            doc.position(at),
                            f"operations need an 'openapi' document on service '{name}'",
                        )
                    )
                continue
            known = sorted(sp.openapi.operations)
            for j, glob in enumerate(rule.operations):
                if "*" in glob:
                    if any(re.fullmatch(value_regex(glob), k) for k in known):
                        continue
                    message = f"operation glob '{glob}' matches no operationId of the document"
                elif glob in sp.openapi.operations:
                    continue
                else:
                    close = closest(glob, known)
                    hint = f" (did you mean '{close}'?)" if close else ""
                    message = f"unknown operation '{glob}' in the service's OpenAPI document{hint}"
                problems.append(Problem(doc.value_position((*at, j)), message))
    return problems


def fallback_problems(
    services: Mapping[str, ServicePolicy], written_in: Mapping[str, Document]
) -> list[Problem]:
    """`fallback` names known services, never this one, and never loops back to it."""
    problems: list[Problem] = []
    known = sorted(services)
    for name, sp in services.items():
        for j, other in enumerate(sp.spec.fallback):
            if other == name:
                message = f"service '{name}' cannot fall back to itself"
            elif other not in services:
                message = f"unknown service '{other}' in fallback{_did_you_mean(other, known)}"
            else:
                continue
            at = written_in[name].value_position(("services", name, "fallback", j))
            problems.append(Problem(at, message))
    # A cycle (a -> b -> a) would bounce a failing call between the two.
    edges = {n: [o for o in sp.spec.fallback if o in services] for n, sp in services.items()}
    for name in services:
        seen: set[str] = set()
        todo = list(edges[name])
        while todo:
            current = todo.pop()
            if current == name:
                problems.append(
                    Problem(
                        written_in[name].position(("services", name, "fallback")),
                        f"fallback of service '{name}' leads back to it (a cycle)",
                    )
                )
                break
            if current not in seen:
                seen.add(current)
                todo.extend(edges[current])
    return problems


def access_problems(
    agents: Agents,
    allow: tuple[Document, list[AllowRule]] | None,
    services: Mapping[str, ServicePolicy],
    written_in: Mapping[str, Document],
) -> list[Problem]:
    """What only the whole policy shows: agents the rules name that `agents.keys` lacks,
    and services that would drop the agents' credential before it is verified."""
    problems: list[Problem] = []
    rule_sets: list[tuple[Document, Path, list[AllowRule]]] = []
    if allow is not None:
        rule_sets.append((allow[0], ("allow",), allow[1]))
    for name, sp in services.items():
        if sp.spec.allow is not None:
            rule_sets.append((written_in[name], ("services", name, "allow"), sp.spec.allow))
    problems.extend(operation_problems(allow, services, written_in))
    # With JWTs, any subject the issuer signs is an agent: only a closed list can be checked.
    if agents.keys and agents.verify is None:
        known = sorted(agents.keys)
        for doc, at, rules in rule_sets:
            for i, rule in enumerate(rules):
                for j, glob in enumerate(rule.agents or ()):
                    if "*" in glob:
                        pattern = re.compile(value_regex(glob))
                        if any(pattern.fullmatch(k) for k in known):
                            continue
                        message = f"agent glob '{glob}' matches no agent in agents.keys"
                    elif glob in agents.keys:
                        continue
                    else:
                        message = f"unknown agent '{glob}'{_did_you_mean(glob, known)}"
                        message = message.replace("expected one of", "agents.keys has")
                    problems.append(Problem(doc.value_position((*at, i, "agents", j)), message))
    if agents.verify is not None or agents.keys:
        header = agents.credential_header.lower()
        for name, sp in services.items():
            spec = sp.spec
            dropped = {h.lower() for h in (*spec.headers.remove, *spec.headers.set)}
            written = spec.auth.credential_header if spec.auth is not None else None
            if written is not None:
                dropped.add(written.lower())
            if header in dropped:
                problems.append(
                    Problem(
                        sp.position,
                        f"service '{name}' replaces or removes {agents.credential_header}, "
                        "the header agents prove who they are with (agents.credential_header); "
                        "choose another credential_header",
                    )
                )
    return problems
