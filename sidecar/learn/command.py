"""`sidecar learn`: read the sources, learn per service, write or compare.

Writes, per service, `<service>.openapi.json` and `<service>.yaml` (a policy file
with the service, its learned document in `report` mode and the allow rules),
so `sidecar validate OUT` accepts the directory as it is. `--diff` compares with
the policy in force instead and exits 1 when agents did what it does not cover.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from .document import learn, openapi
from .rules import drift, rules, rules_yaml
from .samples import Sample, read_access_log, read_cassettes, read_observed

if TYPE_CHECKING:
    from ..policy.loaded import Policy

PLACEHOLDER_UPSTREAM = "https://api.example.invalid"
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def since_epoch(value: str, now: float | None = None) -> float:
    """`--since`: a duration back from now (`24h`, `7d`) or a date (`2026-12-01`)."""
    now = time.time() if now is None else now
    if m := _DURATION.match(value.strip()):
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    for form in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(value.strip().rstrip("Z"), form)) - time.timezone
        except ValueError:
            continue
    raise ValueError(f"--since {value!r} is neither a duration (24h, 7d) nor a date (2026-12-01)")


def samples(
    *,
    cassettes: Iterable[str] = (),
    access_logs: Iterable[str] = (),
    observed: Iterable[str] = (),
    services: Iterable[str] = (),
    since: float | None = None,
    prefixes: dict[str, str] | None = None,
) -> Iterator[Sample]:
    wanted = set(services)
    sources: list[Iterator[Sample]] = []
    for c in cassettes:
        sources.append(read_cassettes(Path(c), next(iter(wanted)) if len(wanted) == 1 else None))
    sources += [read_access_log(Path(a), prefixes) for a in access_logs]
    sources += [read_observed(Path(o)) for o in observed]
    for source in sources:
        for s in source:
            if wanted and s.service not in wanted:
                continue
            if since is not None and s.at is not None and s.at < since:
                continue
            yield s


def _q(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def policy_text(service: str, upstream: str, document_name: str, rule_lines: list[str]) -> str:
    lines = [
        f"# Learned by `sidecar learn` for service {service}: review before use.",
        "# The allow rules let exactly what each agent was seen doing; the OpenAPI document",
        "# is checked in `report` mode (counted and logged, never refused) until reviewed.",
        "version: 1",
        "services:",
        f"  {service}:",
        f"    upstream: {_q(upstream)}",
        f"    openapi: {_q(document_name)}",
        "    validate: {requests: report}",
    ]
    if rule_lines:
        lines.append("    allow:")
        lines += rule_lines
    return "\n".join(lines) + "\n"


def write_learned(
    grouped: dict[str, list[Sample]], out: Path, upstreams: dict[str, str], err: IO[str]
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for service, found in sorted(grouped.items()):
        learned = learn(service, found)
        upstream = upstreams.get(service, PLACEHOLDER_UPSTREAM)
        document = openapi(learned, upstream=None if upstream == PLACEHOLDER_UPSTREAM else upstream)
        doc_name = f"{service}.openapi.json"
        (out / doc_name).write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        rule_list = rules(learned)
        text = policy_text(service, upstream, doc_name, rules_yaml(rule_list))
        (out / f"{service}.yaml").write_text(text, encoding="utf-8")
        print(
            f"{service}: {learned.samples} calls, {len(learned.operations)} operations, "
            f"{len(rule_list)} allow rules -> {out / doc_name}, {out / (service + '.yaml')}",
            file=err,
        )


def main(
    *,
    cassettes: list[str],
    access_logs: list[str],
    observed: list[str],
    services: list[str],
    out: str | None,
    upstream: str | None,
    since: str | None,
    diff: bool,
    policies: str | None,
    stdout: IO[str] = sys.stdout,
    stderr: IO[str] = sys.stderr,
) -> int:
    if not (cassettes or access_logs or observed):
        print(
            "sidecar learn: name a source: --cassettes DIR, --access-log FILE or --observed DIR",
            file=stderr,
        )
        return 2
    try:
        since_at = since_epoch(since) if since else None
    except ValueError as e:
        print(f"sidecar learn: {e}", file=stderr)
        return 2
    policy = None
    if policies:
        from ..policy.loader import PolicyError, load_policy

        try:
            policy = load_policy(policies, resolve_secrets=False)
        except PolicyError as e:
            print(f"sidecar learn: the policy is refused:\n{e}", file=stderr)
            return 2
    elif diff:
        print("sidecar learn --diff needs --policies DIR (the policy in force)", file=stderr)
        return 2
    prefixes = {n: s.prefix for n, s in policy.services.items()} if policy else None
    grouped: dict[str, list[Sample]] = {}
    for s in samples(
        cassettes=cassettes,
        access_logs=access_logs,
        observed=observed,
        services=services,
        since=since_at,
        prefixes=prefixes,
    ):
        grouped.setdefault(s.service, []).append(s)
    if not grouped:
        print("sidecar learn: the sources hold no calls (of the services named)", file=stderr)
        return 1
    if diff and policy is not None:
        return _diff(grouped, policy, stdout, stderr)
    upstreams = {n: s.spec.upstream for n, s in policy.services.items()} if policy else {}
    if upstream:
        upstreams = {name: upstream for name in grouped}
    write_learned(grouped, Path(out or "learned"), upstreams, stderr)
    return 0


def _diff(
    grouped: dict[str, list[Sample]], policy: Policy, stdout: IO[str], stderr: IO[str]
) -> int:
    drifted = 0
    for service, found in sorted(grouped.items()):
        spec = policy.services.get(service)
        if spec is None:
            print(f"{service}: not in the policy ({len(found)} calls)", file=stdout)
            drifted += len(found)
            continue
        learned = learn(service, found)
        shapes: dict[tuple[str, str, str, str], int] = {}
        for d, count in drift(spec, found).items():
            op = learned.operation_of(d.method, d.path)
            key = (
                d.agent or "(no agent named)",
                d.method,
                op.template.path if op else d.path,
                d.why,
            )
            shapes[key] = shapes.get(key, 0) + count
        for (who, method, shape, why), count in sorted(shapes.items()):
            print(f"{service}: {who} {method} {shape}: {why} ({count} calls)", file=stdout)
            drifted += count
    if drifted:
        print(f"drift: {drifted} calls the policy does not cover", file=stderr)
        return 1
    print("no drift: the policy covers every call seen", file=stderr)
    return 0
