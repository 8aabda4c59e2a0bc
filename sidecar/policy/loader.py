"""Reads a policy directory into one validated, immutable Policy.

All `*.yaml` / `*.yml` files directly in the directory are read (hidden
files and the `..data` directories of a Kubernetes ConfigMap volume are not,
but the symlinks pointing into them are), each validated on its own, then
merged. Every problem found is reported as FILE:LINE:COL: message.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .. import openapi
from .access import AllowRule, value_regex
from .alerts import Admin, Alerts
from .base import _did_you_mean, closest
from .databases import Database
from .databases import merge as merge_databases
from .models import (
    AUTH_TYPES,
    Agents,
    HeaderAuth,
    JwtAuth,
    PolicyFile,
    QueryAuth,
    Service,
)
from .openapi import document_file
from .secrets import SecretResolver
from .templates import catalog as template_catalog
from .templates import expand as expand_templates
from .testing import CassetteOverride
from .webhooks import Webhooks
from .webhooks import merge as merge_webhooks
from .yamlpos import Document, Path, Position, Problem, YamlError, load_document


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """A service as the router needs it: its name, resolved prefix and where it was written."""

    name: str
    prefix: str
    spec: Service
    position: Position
    agents: Agents = field(default_factory=Agents)
    # The allow rules in force: the service's own, else the top-level ones; none = everyone.
    allow: tuple[AllowRule, ...] = ()
    allow_from: str = ""  # where those rules are written: "services.<name>.allow" or "allow"
    # The compiled `openapi:` document, when the service names one (and it could be read).
    openapi: openapi.Spec | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    agents: Agents
    services: Mapping[str, ServicePolicy]
    files: tuple[str, ...]
    version: str  # hash of the files' text and resolved secrets: equal means nothing changed
    secret_files: frozenset[str] = field(default_factory=frozenset)
    webhooks: Webhooks | None = None  # every file's `webhooks:` merged; None when none has one
    allow: tuple[AllowRule, ...] | None = None  # the top-level rules; None when no file has any
    admin: Admin | None = None  # `admin:`, from the one file that has it
    alerts: Alerts | None = None  # `alerts:`, from the one file that has it
    # Every file's `databases:` merged; empty when none has one.
    databases: Mapping[str, Database] = field(default_factory=dict)


class PolicyError(Exception):
    """The policy directory cannot be used; `problems` says exactly where and why."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def policy_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except OSError as exc:
        raise PolicyError(
            [Problem(Position(directory, 1, 1), f"cannot read policy directory: {exc.strerror}")]
        ) from None
    return [
        os.path.join(directory, n)
        for n in names
        if not n.startswith(".")
        and n.endswith((".yaml", ".yml"))
        and os.path.isfile(os.path.join(directory, n))
    ]


def load_policy(
    directory: str,
    *,
    env: Mapping[str, str] | None = None,
    resolve_secrets: bool = True,
    mode: str | None = None,
    cassettes: CassetteOverride | None = None,
    listeners: tuple[tuple[str, int], ...] = (),
) -> Policy:
    """Load, validate and merge; raises PolicyError listing every problem found.

    `listeners` are the sidecar's own (host, port) where known: no webhook may be
    delivered to one of them.

    With resolve_secrets=False, `${env:}` and `${file:}` references are checked
    for form only (for CI, which has no production secrets). `mode` (live, record
    or replay: `sidecar run --mode`) replaces every service's own, except mock's;
    `cassettes` (`sidecar record|replay` flags) then changes the `cassettes:` of every
    service that records or replays.
    """
    files = policy_files(directory)
    if not files:
        raise PolicyError(
            [Problem(Position(directory, 1, 1), "no *.yaml or *.yml policy files found")]
        )
    resolver = SecretResolver(env, check_only=not resolve_secrets)
    resolver.mode = mode
    resolver.passthrough = cassettes is not None and cassettes.on_missing == "passthrough"
    templates = template_catalog(directory)
    problems: list[Problem] = list(templates.problems)
    parsed: list[tuple[Document, PolicyFile]] = []
    digest = hashlib.sha256()
    # A changed template changes every service built on it: part of the version.
    for path, text in templates.texts:
        digest.update(path.encode() + b"\0" + text.encode() + b"\0")
    for path in files:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(Position(path, 1, 1), f"cannot read file: {exc}"))
            continue
        digest.update(path.encode() + b"\0" + text.encode() + b"\0")
        try:
            doc = load_document(text, path)
        except YamlError as exc:
            problems.append(exc.problem)
            continue
        if isinstance(doc.data, dict) and _is_openapi(doc.data):
            continue  # an `openapi:` document kept next to the policies, not a policy
        if not isinstance(doc.data, dict):
            problems.append(
                Problem(
                    Position(path, 1, 1), "a policy file is a mapping starting with 'version: 1'"
                )
            )
            continue
        unknown, unexpanded = expand_templates(doc, templates.templates, templates.broken)
        problems.extend(unknown)
        try:
            model = PolicyFile.model_validate(
                doc.data, context={"secrets": resolver, "listeners": listeners}
            )
        except ValidationError as exc:
            problems.extend(_problems(doc, exc, unexpanded=unexpanded))
            continue
        if unknown:
            continue
        parsed.append((doc, model))

    agents: Agents | None = None
    agents_at: Position | None = None
    allow: tuple[Document, list[AllowRule]] | None = None
    written_in: dict[str, Document] = {}
    services: dict[str, ServicePolicy] = {}
    prefixes: dict[str, ServicePolicy] = {}
    for doc, model in parsed:
        if model.agents is not None:
            here = doc.position(("agents",))
            if agents is not None:
                problems.append(Problem(here, f"'agents' is already set in {agents_at}"))
            agents, agents_at = model.agents, here
        if model.allow is not None:
            if allow is not None:
                problems.append(
                    Problem(
                        doc.position(("allow",)),
                        f"'allow' is already set in {allow[0].position(('allow',))}",
                    )
                )
            else:
                allow = (doc, model.allow)
        for name, spec in model.services.items():
            here = doc.position(("services", name))
            if name in services:
                problems.append(
                    Problem(
                        here, f"service '{name}' is already defined in {services[name].position}"
                    )
                )
                continue
            prefix = spec.prefix or f"/{name}"
            if (
                mode is not None
                and spec.mode != "mock"
                and spec.mode != mode
                and spec.files is None
            ):
                # A service mocked in its policy has no upstream worth recording, and a
                # files service has none at all.
                spec = spec.model_copy(update={"mode": mode})
            if cassettes is not None and spec.mode in ("record", "replay"):
                spec = spec.model_copy(update={"cassettes": cassettes.apply(name, spec.cassettes)})
            document, problem = _openapi(doc, name, spec, directory, resolver, digest)
            if problem is not None:
                problems.append(problem)
            sp = ServicePolicy(name=name, prefix=prefix, spec=spec, position=here, openapi=document)
            if prefix in prefixes:
                other = prefixes[prefix]
                at = doc.value_position(("services", name, "prefix")) if spec.prefix else here
                problems.append(
                    Problem(
                        at,
                        f"prefix '{prefix}' of service '{name}' is already used by service "
                        f"'{other.name}' ({other.position})",
                    )
                )
                continue
            services[name] = sp
            prefixes[prefix] = sp
            written_in[name] = doc

    agents = agents or Agents()
    problems.extend(_access_problems(agents, allow, services, written_in))
    problems.extend(_fallback_problems(services, written_in))
    for name, sp in services.items():
        if sp.spec.allow is not None:
            rules, source = tuple(sp.spec.allow), f"services.{name}.allow"
        elif allow is not None:
            rules, source = tuple(allow[1]), "allow"
        else:
            rules, source = (), ""
        services[name] = replace(sp, agents=agents, allow=rules, allow_from=source if rules else "")

    # One file holds each of these, as with `agents:`: a second is an error, not a merge.
    singles: dict[str, tuple[Position, Any]] = {}
    for doc, model in parsed:
        for key in ("admin", "alerts"):
            value = getattr(model, key)
            if value is None:
                continue
            here = doc.position((key,))
            if key in singles:
                problems.append(Problem(here, f"'{key}' is already set in {singles[key][0]}"))
            else:
                singles[key] = (here, value)

    parts = [model.webhooks for _, model in parsed if model.webhooks is not None]
    webhooks: Webhooks | None = None
    if parts:
        webhooks, clashes = merge_webhooks(parts)
        # A clash spans files: pinned to the first file that declares webhooks.
        first = next(doc for doc, model in parsed if model.webhooks is not None)
        problems.extend(Problem(first.position(("webhooks",)), c) for c in clashes)

    db_parts = [model.databases for _, model in parsed if model.databases is not None]
    databases: dict[str, Database] = {}
    if db_parts:
        databases, clashes = merge_databases(db_parts)
        first = next(doc for doc, model in parsed if model.databases is not None)
        problems.extend(Problem(first.position(("databases",)), c) for c in clashes)

    if problems:
        raise PolicyError(
            sorted(problems, key=lambda p: (p.position.file, p.position.line, p.position.col))
        )
    digest.update(resolver.digest.digest())
    return Policy(
        agents=agents,
        services=services,
        files=tuple(files),
        version=digest.hexdigest()[:16],
        secret_files=frozenset(resolver.files),
        webhooks=webhooks,
        allow=tuple(allow[1]) if allow is not None else None,
        admin=singles["admin"][1] if "admin" in singles else None,
        alerts=singles["alerts"][1] if "alerts" in singles else None,
        databases=databases,
    )


def _operation_problems(
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


def _fallback_problems(
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


def _access_problems(
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
    problems.extend(_operation_problems(allow, services, written_in))
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
            auth = spec.auth
            if isinstance(auth, HeaderAuth):
                dropped.add(auth.name.lower())
            elif isinstance(auth, JwtAuth):
                dropped.add(auth.header.lower())
            elif auth is not None and not isinstance(auth, QueryAuth):
                dropped.add("authorization")
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


def _is_openapi(data: dict[Any, Any]) -> bool:
    return "version" not in data and ("openapi" in data or "swagger" in data)


def _openapi(
    doc: Document,
    name: str,
    spec: Service,
    directory: str,
    resolver: SecretResolver,
    digest: Any,
) -> tuple[openapi.Spec | None, Problem | None]:
    """The service's compiled OpenAPI document, or the problem that stops it."""
    if spec.openapi is None:
        if spec.validation is not None:
            at = doc.position(("services", name, "validate"))
            return None, Problem(at, "validate needs an 'openapi' document to validate against")
        return None, None
    at = doc.value_position(("services", name, "openapi"))
    path = document_file(spec.openapi, doc.file)
    if resolver.check_only and spec.openapi.lstrip().startswith("${file:"):
        return None, None  # like a secret: CI need not have the file
    try:
        compiled = openapi.load(path)
    except openapi.OpenAPIError as exc:
        return None, Problem(at, str(exc))
    digest.update(path.encode() + b"\0" + compiled.digest.encode() + b"\0")
    inside = os.path.commonpath([os.path.abspath(directory), path]) == os.path.abspath(directory)
    if not inside:
        resolver.files.add(path)  # the watcher then watches its directory too
    return compiled, None


def _problems(
    doc: Document, exc: ValidationError, *, unexpanded: frozenset[Path] | set[Path] = frozenset()
) -> list[Problem]:
    errors = exc.errors(include_url=False)
    # A misspelt required key (`upstrem:`) is one mistake: its unknown-key error
    # names the key it should be, so "'upstream' is required" would only repeat it.
    misspelt = {
        (*err["loc"][:-1], closest(str(err["loc"][-1]), _keys_at(tuple(err["loc"][:-1]))))
        for err in errors
        if err["type"] == "extra_forbidden"
    }
    out = []
    for err in errors:
        loc: Path = tuple(err["loc"])
        kind = err["type"]
        if kind == "missing" and (loc in misspelt or loc[:2] in unexpanded):
            # Also a service whose template is unknown: that error says it all.
            continue
        ctx: dict[str, Any] = err.get("ctx") or {}
        message = err["msg"]
        if kind == "extra_forbidden":
            key = loc[-1]
            message = f"unknown key '{key}'"
            known_keys = _keys_at(loc[:-1])
            if known_keys:
                message += _did_you_mean(str(key), known_keys)
            # Point at the offending key itself, not at the mapping around it.
            loc = (*_known(doc, loc[:-1]), key)
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*_known(doc, loc), "type")
            tag = ctx.get("tag")
            message = (
                f"unknown auth type '{tag}'{_did_you_mean(str(tag), list(AUTH_TYPES))}"
                if kind == "union_tag_invalid"
                else f"'type' is required, one of: {', '.join(AUTH_TYPES)}"
            )
        elif kind == "missing":
            message = f"'{loc[-1]}' is required"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        known = _known(doc, loc)
        if kind in ("missing", "extra_forbidden") or known != loc:
            position = doc.position(known if kind != "extra_forbidden" else loc)
        else:
            position = doc.value_position(known)
        note = _note(doc, loc, known)
        if note:
            message = f"{message} ({note})"
        out.append(Problem(position, message))
    return out


def _note(doc: Document, loc: Path, known: Path) -> str | None:
    """Where the value in error came from when the file does not hold it (a template)."""
    if not doc.notes:
        return None
    note = doc.notes.get(loc)
    if note is not None:
        return note
    for i in range(len(known), 0, -1):
        note = doc.notes.get(known[:i])
        if note is not None:
            return note
    return None


def _known(doc: Document, loc: Path) -> Path:
    """The part of an error location that exists in the file.

    pydantic puts names in a location that are not keys of the document (the
    tag of a discriminated union, a function-validator name); drop those.
    """
    path: Path = ()
    for part in loc:
        candidate = (*path, part)
        if candidate in doc.values:
            path = candidate
    return path


def _keys_at(loc: Path) -> list[str]:
    """The keys accepted by the mapping at `loc` of a policy file, to hint at a misspelling.

    `loc` is a pydantic error location: dict keys and list indexes step into
    values, a union's tag picks the member (`auth: {type: bearer}` is at
    (..., "auth", "bearer")). Empty when `loc` does not lead to a model.
    """
    tp: Any = PolicyFile
    for part in loc:
        tp = _step(_unwrap(tp), part)
        if tp is None:
            return []
    tp = _unwrap(tp)
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return []
    return sorted(f.alias or name for name, f in tp.model_fields.items())


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional, which add no level to an error location."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        if get_origin(tp) in (Union, UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _step(tp: Any, part: str | int) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, f in tp.model_fields.items():
            if part in (name, f.alias):
                return f.annotation
        return None
    if origin is dict:
        return get_args(tp)[1]
    if origin is list:
        return get_args(tp)[0]
    if origin in (Union, UnionType):
        for member in map(_unwrap, get_args(tp)):
            tag = getattr(member, "model_fields", {}).get("type")
            if tag is not None and get_args(tag.annotation) == (part,):
                return member
    return None
