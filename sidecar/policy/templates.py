"""Service templates: `template: NAME` on a service starts it from a template's keys.

A template is a YAML file: the built-in ones ship in the package
(sidecar/templates/*.yaml), a platform team's own sit in `templates/` beside
the policy files and win over a built-in of the same name. The file holds a
one-line `description`, an optional `docs` link, optional `needs` (hints for
keys the template leaves to the policy, like Azure's resource URL) and the
`service` mapping itself.

Expansion happens on the parsed document, before validation, so every error
still points at FILE:LINE:COL of the policy: a key the policy writes keeps
its own position; a key only the template sets points at the `template:`
line, and its message names the template and where the key stands in it.

The merge is a JSON Merge Patch (RFC 7396) of the policy's service over the
template's: mappings merge key by key, the policy's value wins, lists are
replaced whole, and `null` removes a template's key. A mapping whose `type`
differs from the template's (`auth: {type: header, ...}` over a bearer
template) replaces it whole, since keys of one kind mean nothing to another.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from .base import _did_you_mean
from .positions import Position, Problem
from .yamlpos import Document, Path, YamlError, load_document

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "templates")
USER_DIR = "templates"  # inside the policy directory
BUILTIN = "built-in"

_FILE_KEYS = ("description", "docs", "needs", "service")


@dataclass(frozen=True, slots=True)
class Template:
    name: str
    description: str
    file: str
    source: str  # "built-in", or the user template's file
    service: Mapping[str, Any]
    doc: Document = field(compare=False, repr=False)
    docs: str | None = None
    needs: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class Catalog:
    """The templates a policy directory can use, and what was wrong with its own."""

    templates: dict[str, Template]
    problems: list[Problem]
    texts: list[tuple[str, str]]  # (file, text) of user templates: part of the policy version
    broken: dict[str, str] = field(default_factory=dict)  # name -> file, of unusable templates


def template_files(directory: str) -> list[str]:
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return []
    return [
        os.path.join(directory, n)
        for n in names
        if not n.startswith(".")
        and n.endswith((".yaml", ".yml"))
        and os.path.isfile(os.path.join(directory, n))
    ]


def catalog(policy_dir: str | None) -> Catalog:
    """Built-in templates, overridden by those in `<policy_dir>/templates/`."""
    builtin = _builtin()
    templates = dict(builtin.templates)
    problems = list(builtin.problems)
    texts: list[tuple[str, str]] = []
    broken: dict[str, str] = {}
    if policy_dir is not None:
        for path in template_files(os.path.join(policy_dir, USER_DIR)):
            try:
                with open(path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError) as exc:
                problems.append(Problem(Position(path, 1, 1), f"cannot read template: {exc}"))
                continue
            texts.append((path, text))
            template = _parse(path, text, source=path, problems=problems)
            if template is not None:
                templates[template.name] = template
            else:
                name = os.path.splitext(os.path.basename(path))[0]
                templates.pop(name, None)  # never silently the built-in instead
                broken[name] = path
    return Catalog(templates=templates, problems=problems, texts=texts, broken=broken)


@functools.cache
def _builtin() -> Catalog:
    """Read once per process: package data does not change under a running sidecar."""
    problems: list[Problem] = []
    templates: dict[str, Template] = {}
    for path in template_files(BUILTIN_DIR):
        with open(path, encoding="utf-8") as f:
            template = _parse(path, f.read(), source=BUILTIN, problems=problems)
        if template is not None:
            templates[template.name] = template
    return Catalog(templates=templates, problems=problems, texts=[])


def _parse(path: str, text: str, *, source: str, problems: list[Problem]) -> Template | None:
    name = os.path.splitext(os.path.basename(path))[0]
    try:
        doc = load_document(text, path)
    except YamlError as exc:
        problems.append(exc.problem)
        return None
    data = doc.data
    if not isinstance(data, dict):
        problems.append(
            Problem(Position(path, 1, 1), "a template is a mapping of description and service")
        )
        return None
    found = len(problems)
    for key in data:
        if key not in _FILE_KEYS:
            problems.append(
                Problem(
                    doc.position((key,)),
                    f"unknown key '{key}'{_did_you_mean(str(key), list(_FILE_KEYS))}",
                )
            )
    for key in ("description", "service"):
        if key not in data:
            problems.append(Problem(Position(path, 1, 1), f"'{key}' is required in a template"))
    description, docs = data.get("description"), data.get("docs")
    service, needs = data.get("service"), data.get("needs", {})
    if "description" in data and not isinstance(description, str):
        problems.append(Problem(doc.value_position(("description",)), "expected one line of text"))
    if docs is not None and not isinstance(docs, str):
        problems.append(Problem(doc.value_position(("docs",)), "expected a URL"))
    if "service" in data and not isinstance(service, dict):
        problems.append(Problem(doc.value_position(("service",)), "expected a service mapping"))
    elif isinstance(service, dict) and "template" in service:
        # One level only: a template built on another would hide where a key came from.
        problems.append(
            Problem(doc.position(("service", "template")), "a template cannot use a template")
        )
    if not isinstance(needs, dict) or not all(isinstance(v, str) for v in needs.values()):
        problems.append(Problem(doc.value_position(("needs",)), "expected key: hint pairs"))
    if len(problems) > found or not (isinstance(description, str) and isinstance(service, dict)):
        return None
    return Template(
        name=name,
        description=description.strip(),
        file=path,
        source=source,
        service=service,
        doc=doc,
        docs=docs,
        needs=needs,
    )


def expand(
    doc: Document, templates: Mapping[str, Template], broken: Mapping[str, str] | None = None
) -> tuple[list[Problem], set[Path]]:
    """Replace each service that names a template by the merge, in place.

    Returns the problems (unknown template names) and the paths of the
    services left unexpanded, whose "required" errors would only repeat them.
    """
    problems: list[Problem] = []
    unexpanded: set[Path] = set()
    services = doc.data.get("services") if isinstance(doc.data, dict) else None
    if not isinstance(services, dict):
        return problems, unexpanded
    for service_name, service in list(services.items()):
        if not isinstance(service, dict) or "template" not in service:
            continue
        at: Path = ("services", service_name)
        name = service["template"]
        where = doc.value_position((*at, "template"))
        if not isinstance(name, str):
            unexpanded.add(at)  # validation says it must be a string
            continue
        template = templates.get(name)
        if template is None and broken and name in broken:
            problems.append(Problem(where, f"template '{name}' has errors (see {broken[name]})"))
            unexpanded.add(at)
            continue
        if template is None:
            problems.append(
                Problem(where, f"unknown template '{name}'{_did_you_mean(name, list(templates))}")
            )
            unexpanded.add(at)
            continue
        services[service_name] = _merge(
            template.service, service, (), _Origin(doc, at, template, where)
        )
        for key, hint in template.needs.items():
            if key not in service:
                doc.notes[(*at, key)] = f"template '{name}' leaves it to the policy: {hint}"
    return problems, unexpanded


@dataclass(frozen=True, slots=True)
class _Origin:
    doc: Document
    service: Path
    template: Template
    anchor: Position  # the policy's `template:` value, where template-only keys point

    def adopt(self, rel: Path) -> None:
        """Give the template's subtree at `rel` positions and notes in the policy."""
        tdoc = self.template.doc
        base: Path = ("service", *rel)
        for path in tdoc.values:
            if path[: len(base)] != base:
                continue
            sub = path[1:]
            target = (*self.service, *sub)
            self.doc.keys.setdefault(target, self.anchor)
            self.doc.values.setdefault(target, self.anchor)
            dotted = ".".join(str(p) for p in sub)
            self.doc.notes[target] = (
                f"{dotted} from template '{self.template.name}' at {tdoc.value_position(path)}"
            )


def _merge(base: Any, over: Any, rel: Path, origin: _Origin) -> Any:
    if not (isinstance(base, dict) and isinstance(over, dict)):
        return over  # scalars and lists: the policy's value, as written
    if "type" in over and over.get("type") != base.get("type"):
        return over
    out: dict[str, Any] = {}
    for key, value in base.items():
        if key not in over:
            out[key] = value
            origin.adopt((*rel, key))
        elif over[key] is not None:
            out[key] = _merge(value, over[key], (*rel, key), origin)
    for key, value in over.items():
        if key not in base and value is not None:
            out[key] = value
    return out


def expanded_policy(template: Template) -> str:
    """The template as a policy file with one service named after it: what
    `template: NAME` and nothing else would give (keys it leaves open as comments)."""
    with open(template.file, encoding="utf-8") as f:
        text = f.read()
    # The template's own leading comments say how agents call the service.
    lead = re.match(r"(?:[ \t]*(?:#[^\n]*)?\n)*", text)
    comments = [line for line in (lead.group(0) if lead else "").splitlines() if line.strip()]
    head = [
        f"# template '{template.name}': {template.description}",
        f"# source: {template.source}"
        + (f" ({template.file})" if template.source != template.file else ""),
    ]
    if template.docs:
        head.append(f"# provider docs: {template.docs}")
    head.extend(comments)
    for key, hint in template.needs.items():
        head.append(f"# the policy must set {key}, e.g. {key}: {hint}")
    body = yaml.safe_dump(
        {"version": 1, "services": {template.name: dict(template.service)}},
        sort_keys=False,
        default_flow_style=False,
        allow_unicode=True,
        width=100,
    )
    return "\n".join(head) + "\n" + body
