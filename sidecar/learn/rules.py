"""Least-privilege allow rules per agent from what each did, and the drift between what
agents do and the policy in force.

A rule lists one agent, the methods and the path globs it used (a parameter of the
learned template is one `*` segment), so enforcing the rules lets exactly the
observed calls through, up to the values of the parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .document import Learned, Operation
from .samples import Sample

if TYPE_CHECKING:
    from ..policy.loaded import ServicePolicy


@dataclass(frozen=True, slots=True)
class Rule:
    agent: str | None  # None: calls that named no agent
    methods: tuple[str, ...]
    paths: tuple[str, ...]
    calls: int
    operations: tuple[tuple[str, int], ...]  # operationId, calls


def rules(learned: Learned) -> list[Rule]:
    """Per agent: the paths grouped by the set of methods used on them."""
    per_agent: dict[str | None, dict[str, dict[str, int]]] = {}
    ops: dict[tuple[str | None, str, str], tuple[Operation, int]] = {}
    for op in learned.operations.values():
        callers: dict[str | None, int] = {name: n for name, n in op.agents.items()}
        unnamed = op.calls - sum(op.agents.values())
        if unnamed:
            callers[None] = unnamed
        for agent, count in callers.items():
            paths = per_agent.setdefault(agent, {})
            paths.setdefault(op.template.glob, {})[op.method] = count
            ops[(agent, op.template.glob, op.method)] = (op, count)
    out: list[Rule] = []
    for agent in sorted(per_agent, key=lambda a: (a is None, a or "")):
        by_methods: dict[tuple[str, ...], list[str]] = {}
        for glob, used in per_agent[agent].items():
            by_methods.setdefault(tuple(sorted(used)), []).append(glob)
        for method_set, globs in sorted(by_methods.items()):
            globs.sort()
            covered = [ops[(agent, g, m)] for g in globs for m in method_set]
            out.append(
                Rule(
                    agent=agent,
                    methods=method_set,
                    paths=tuple(globs),
                    calls=sum(count for _, count in covered),
                    operations=tuple(
                        sorted(((op.operation_id, c) for op, c in covered), key=lambda x: -x[1])
                    ),
                )
            )
    return out


def _flow(items: Iterable[str]) -> str:
    return "[" + ", ".join(items) + "]"


def rules_yaml(rule_list: list[Rule], indent: str = "      ") -> list[str]:
    """The rules as YAML list items, each with a comment of what it covers."""
    lines: list[str] = []
    for rule in rule_list:
        shown = ", ".join(f"{name} ({count})" for name, count in rule.operations[:6])
        more = len(rule.operations) - 6
        if more > 0:
            shown += f", and {more} more"
        who = rule.agent or "calls that named no agent (any agent may make them)"
        lines.append(f"{indent}# {who}: {rule.calls} call{'s' if rule.calls != 1 else ''}: {shown}")
        head = f"{indent}- "
        if rule.agent is not None:
            lines.append(f"{head}agents: [{rule.agent}]")
            head = f"{indent}  "
        lines.append(f"{head}methods: {_flow(rule.methods)}")
        lines.append(f"{indent}  paths: {_flow(rule.paths)}")
    return lines


# -- drift --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drift:
    agent: str | None
    method: str
    path: str
    why: str  # "no allow rule" or "not in the OpenAPI document"


class _Judge:
    """The allow engine's compiled rules (engines/allow.py), judging a sample as it would a
    call: the path in its match form (percent-decoded once), conditions on query and
    headers aside (no source keeps their values)."""

    def __init__(self, service: ServicePolicy) -> None:
        from ..engines.allow import CompiledRule

        self.rules = [CompiledRule(r) for r in service.allow]
        self.spec = service.openapi

    def allowed(self, sample: Sample) -> bool:
        from ..policy.access import match_form

        if not self.rules:
            return True
        operation = None
        if self.spec is not None:
            operation = self.spec.operation_id(sample.method, sample.path)
        path = match_form(sample.path)
        for rule in self.rules:
            if rule.methods is not None and sample.method not in rule.methods:
                continue
            if rule.operations is not None and (
                operation is None or not rule.operations.fullmatch(operation)
            ):
                continue
            if rule.agents is not None and (
                sample.agent is None or not rule.agents.fullmatch(sample.agent)
            ):
                continue
            if rule.paths is not None and not rule.paths.fullmatch(path):
                continue
            return True
        return False

    def documented(self, sample: Sample) -> bool:
        if self.spec is None:
            return True
        found = self.spec.match(sample.method, sample.path)
        return found is not None and found.operation is not None


def drift(service: ServicePolicy, samples: Iterable[Sample]) -> dict[Drift, int]:
    """Each call the policy's allow rules or OpenAPI document do not cover, counted.
    Query and header conditions of rules are not judged: the sources keep no values."""
    judge = _Judge(service)
    found: dict[Drift, int] = {}
    for s in samples:
        whys = []
        if not judge.allowed(s):
            whys.append("no allow rule lets it")
        if not judge.documented(s):
            whys.append("not in the OpenAPI document")
        for why in whys:
            key = Drift(s.agent, s.method, s.path, why)
            found[key] = found.get(key, 0) + 1
    return found
