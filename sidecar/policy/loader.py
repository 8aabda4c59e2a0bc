"""Reads a policy directory into one validated, immutable Policy.

All `*.yaml` / `*.yml` files directly in the directory are read (hidden
files and the `..data` directories of a Kubernetes ConfigMap volume are not,
but the symlinks pointing into them are), each validated on its own, then
merged. Every problem found is reported as FILE:LINE:COL: message.

Loading only: what a load makes is in loaded.py, the cross-checks over a whole
policy in checks.py, and a validation error turned into FILE:LINE:COL in
diagnostics.py.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from pydantic import ValidationError

from .. import openapi
from .access import AllowRule
from .checks import access_problems, fallback_problems
from .databases import Database
from .databases import merge as merge_databases
from .described import describe
from .diagnostics import validation_problems
from .loaded import Policy, PolicyError, ServicePolicy
from .models import (
    Agents,
    PolicyFile,
    Service,
)
from .openapi import document_file
from .positions import Position, Problem
from .secrets import SecretResolver
from .templates import catalog as template_catalog
from .templates import expand as expand_templates
from .testing import CassetteOverride
from .webhooks import Webhooks
from .webhooks import merge as merge_webhooks
from .yamlpos import Document, YamlError, load_document

__all__ = ["Policy", "PolicyError", "ServicePolicy", "load_policy", "policy_files"]

# The names each model's fields refer to are resolved here, where policies validate
# (defer_build, base.py): the did-you-mean of an unknown key (diagnostics.py) walks
# the resolved fields, whichever model validates first.
for _model in (Agents, Service, PolicyFile):
    _model.model_rebuild()


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
            problems.extend(validation_problems(doc, exc, unexpanded=unexpanded))
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
    problems.extend(access_problems(agents, allow, services, written_in))
    problems.extend(fallback_problems(services, written_in))
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
    top = tuple(allow[1]) if allow is not None else None
    return Policy(
        agents=agents,
        services=services,
        files=tuple(files),
        version=digest.hexdigest()[:16],
        secret_files=frozenset(resolver.files),
        webhooks=webhooks,
        allow=top,
        admin=singles["admin"][1] if "admin" in singles else None,
        alerts=singles["alerts"][1] if "alerts" in singles else None,
        databases=databases,
        described=describe(agents, top, services),
    )


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
