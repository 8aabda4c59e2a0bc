"""The OpenAPI 3.1 document of one service, from its samples.

Operations are (method, template); each names its path parameters (typed by
what their values looked like), its query parameters (required when every call
had them), its request body schema and, per status seen, its answer's schema.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .paths import Template, Templater, _split
from .samples import NO_JSON, Sample
from .shapes import Shape

_KIND_SCHEMA: dict[str | None, dict[str, Any]] = {
    "integer": {"type": "integer"},
    "number": {"type": "number"},
    "uuid": {"type": "string", "format": "uuid"},
    "date": {"type": "string", "format": "date"},
    "date-time": {"type": "string", "format": "date-time"},
    "email": {"type": "string", "format": "email"},
}
_WORD = re.compile(r"[^A-Za-z0-9]+")


@dataclass
class Operation:
    method: str
    template: Template
    calls: int = 0
    agents: dict[str, int] = field(default_factory=dict)
    query: dict[str, int] = field(default_factory=dict)
    request_types: dict[str, Shape] = field(default_factory=dict)
    responses: dict[int, dict[str | None, Shape]] = field(default_factory=dict)
    operation_id: str = ""

    def add(self, sample: Sample) -> None:
        self.calls += 1
        if sample.agent:
            self.agents[sample.agent] = self.agents.get(sample.agent, 0) + 1
        for name in sample.query:
            self.query[name] = self.query.get(name, 0) + 1
        if sample.request_json is not NO_JSON:
            media = sample.request_type or "application/json"
            self.request_types.setdefault(media, Shape()).add(sample.request_json)
        if sample.status is not None:
            by_type = self.responses.setdefault(int(sample.status), {})
            shape = by_type.setdefault(sample.response_type, Shape())
            if sample.response_json is not NO_JSON:
                shape.add(sample.response_json)


@dataclass
class Learned:
    service: str
    operations: dict[tuple[str, str], Operation]  # (METHOD, template path) -> operation
    templater: Templater
    templates: dict[tuple[str, ...], Template]
    samples: int = 0

    def operation_of(self, method: str, path: str) -> Operation | None:
        template = self.templates.get(tuple(_split(path)))
        if template is None:
            return None
        return self.operations.get((method.upper(), template.path))


def learn(service: str, samples: Iterable[Sample]) -> Learned:
    listed = list(samples)
    templater = Templater()
    for s in listed:
        templater.add(s.path)
    templates = templater.templates()
    operations: dict[tuple[str, str], Operation] = {}
    for s in listed:
        template = templates[tuple(_split(s.path))]
        key = (s.method, template.path)
        op = operations.get(key)
        if op is None:
            op = operations[key] = Operation(s.method, template)
        op.add(s)
    _name_operations(operations.values())
    return Learned(service, operations, templater, templates, len(listed))


def _name_operations(operations: Iterable[Operation]) -> None:
    """operationIds: the method and the path's words, `by_<param>` for a trailing one
    (`get_repos_issues_by_issue_id`); a counter keeps them unique."""
    used: set[str] = set()
    for op in sorted(operations, key=lambda o: (o.template.path, o.method)):
        words = [s.text for s in op.template.segments if not s.param]
        last = op.template.segments[-1] if op.template.segments else None
        parts = [op.method.lower(), *words]
        if last is not None and last.param:
            parts += ["by", last.text]
        base = "_".join(p for p in (_WORD.sub("_", w).strip("_").lower() for w in parts) if p)
        name, n = base or op.method.lower(), 2
        while name in used:
            name = f"{base}_{n}"
            n += 1
        used.add(name)
        op.operation_id = name


def _media_content(by_type: dict[str | None, Shape]) -> dict[str, Any]:
    content: dict[str, Any] = {}
    for media, shape in sorted(by_type.items(), key=lambda kv: kv[0] or ""):
        if media is None and not shape.seen:
            continue
        content[media or "application/json"] = {"schema": shape.schema() if shape.seen else {}}
    return content


def openapi(learned: Learned, *, upstream: str | None = None) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for (method, path), op in sorted(learned.operations.items(), key=lambda kv: kv[0][::-1]):
        parameters: list[dict[str, Any]] = [
            {
                "name": seg.text,
                "in": "path",
                "required": True,
                "schema": dict(_KIND_SCHEMA.get(seg.kind, {"type": "string"})),
            }
            for seg in op.template.segments
            if seg.param
        ]
        for name, count in sorted(op.query.items()):
            parameters.append(
                {
                    "name": name,
                    "in": "query",
                    "required": count == op.calls,
                    "schema": {"type": "string"},
                }
            )
        operation: dict[str, Any] = {
            "operationId": op.operation_id,
            "summary": f"learned from {op.calls} call{'s' if op.calls != 1 else ''}",
        }
        if parameters:
            operation["parameters"] = parameters
        if op.request_types:
            operation["requestBody"] = {
                "required": True,
                "content": {
                    media: {"schema": shape.schema()}
                    for media, shape in sorted(op.request_types.items())
                },
            }
        responses: dict[str, Any] = {}
        for status, by_type in sorted(op.responses.items()):
            answer: dict[str, Any] = {"description": f"seen with status {status}"}
            if content := _media_content(by_type):
                answer["content"] = content
            responses[str(status)] = answer
        operation["responses"] = responses or {"default": {"description": "not observed"}}
        paths.setdefault(path, {})[method.lower()] = operation
    document: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": f"{learned.service} (learned from traffic)",
            "version": "learned",
            "description": f"Learned by `sidecar learn` from {learned.samples} calls.",
        },
        "paths": paths,
    }
    if upstream:
        document["servers"] = [{"url": upstream}]
    return document
