"""`mode: mock`: the service's `mock:` rules answer every call; the upstream is never called.

The step never calls `next`, so nothing after it runs: no credential is
fetched or injected, no token spent, no connection opened. It sits after the
refusals (identity, allow, validate, GraphQL and MCP rules), so an agent
developed against mocks is refused exactly as it will be in production.
Every answer carries `X-Sidecar-Mock: true`; a call no rule matches gets
501 `no_mock`, never the upstream.
"""

from __future__ import annotations

import asyncio
import json
from fnmatch import fnmatchcase
from typing import Any

from multidict import CIMultiDict

from ...core.call import Call, Handler, Reply, StaticReply
from ...core.headers import SERVER
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...openapi.document import METHODS, OpenAPIError, deref
from ...openapi.spec import Spec
from ...policy.loaded import ServicePolicy
from ...policy.testing import MockAnswer
from ..operation import annotate

MOCK_HEADER = "X-Sidecar-Mock"


class _Answer:
    __slots__ = ("data", "delay", "headers", "method", "path", "status")

    def __init__(
        self,
        *,
        status: int,
        headers: dict[str, str],
        body: Any,
        method: str = "*",
        path: str = "*",
        delay: float | None = None,
        media: str | None = None,
    ) -> None:
        self.method = method
        self.path = path
        self.status = status
        self.delay = delay
        answer: CIMultiDict[str] = CIMultiDict(headers)
        if body is None:
            self.data = b""
        elif isinstance(body, str) and not (media and _is_json(media)):
            self.data = body.encode()
            answer.setdefault("Content-Type", media or "text/plain; charset=utf-8")
        else:
            self.data = json.dumps(body).encode()
            answer.setdefault("Content-Type", media or "application/json")
        answer.setdefault("Server", SERVER)
        answer[MOCK_HEADER] = "true"
        self.headers = answer

    @classmethod
    def of(cls, rule: MockAnswer) -> _Answer:
        return cls(
            status=rule.status,
            headers=rule.headers,
            body=rule.body,
            method=rule.match.method,
            path=rule.match.path,
            delay=rule.delay,
        )

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and fnmatchcase(path, self.path)

    def reply(self) -> StaticReply:
        return StaticReply(self.status, self.headers, self.data)


def _is_json(media: str) -> bool:
    media = media.partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


class Mock:
    def __init__(
        self,
        *,
        service: str,
        answers: list[_Answer],
        spec: Spec | None = None,
        examples: dict[tuple[str, str], _Answer] | None = None,
    ) -> None:
        self.service = service
        self.answers = answers
        self.spec = spec
        self.examples = examples or {}

    async def __call__(self, call: Call, next: Handler) -> Reply:
        path = call.target.partition("?")[0]
        # A HEAD is answered by the GET rule, as a server would.
        method = call.method
        for answer in self.answers:
            if answer.matches(method, path) or (method == "HEAD" and answer.matches("GET", path)):
                annotate(call, {"sidecar.mock": True})
                if answer.delay:
                    await asyncio.sleep(answer.delay)
                return answer.reply()
        if self.examples and self.spec is not None:
            found = self.spec.match(method, path)
            if found is not None and found.operation is not None:
                key = (found.template, found.operation.method.lower())
                example = self.examples.get(key)
                if example is not None:
                    annotate(call, {"sidecar.mock": True})
                    return example.reply()
        raise ProblemError(
            Reason.no_mock,
            f"Service '{self.service}' is in mock mode and none of its mock answers matches "
            f"{method} {path}; the upstream is never called in mock mode. Add a mock answer "
            "for it to the policy"
            + (", or an example to its OpenAPI document." if self.spec is not None else "."),
            service=self.service,
            headers={MOCK_HEADER: "true"},
        )


def _examples(spec: Spec) -> dict[tuple[str, str], _Answer]:
    """(path template, method) -> the answer its OpenAPI operation gives as an example."""
    doc = spec.document.data
    out: dict[tuple[str, str], _Answer] = {}
    for template, item in (doc.get("paths") or {}).items():
        try:
            item = deref(doc, item)
        except OpenAPIError:
            continue
        if not isinstance(item, dict):
            continue
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            try:
                answer = _example(doc, op)
            except (OpenAPIError, ValueError, KeyError, TypeError):
                answer = None  # a broken example is no example: the call gets no_mock
            if answer is not None:
                out[(template, method)] = answer
    return out


_NONE = object()


def _example(doc: dict[str, Any], op: dict[str, Any]) -> _Answer | None:
    # The first success the operation documents, with the first example it shows:
    # a media type's `example`, its first `examples` entry, or its schema's `example`.
    responses = op.get("responses")
    if not isinstance(responses, dict):
        return None
    codes = sorted(str(c) for c in responses if str(c).isdigit() and 200 <= int(c) < 300)
    for code in codes:
        response = deref(doc, responses.get(code, responses.get(int(code))))
        if not isinstance(response, dict):
            continue
        content = response.get("content")
        if not isinstance(content, dict) or not content:
            return _Answer(status=int(code), headers={}, body=None)
        medias = sorted(content, key=lambda m: not _is_json(m))  # JSON first
        for media in medias:
            entry = deref(doc, content[media])
            if not isinstance(entry, dict):
                continue
            value = entry.get("example", _NONE)
            if value is _NONE and isinstance(entry.get("examples"), dict) and entry["examples"]:
                first = deref(doc, next(iter(entry["examples"].values())))
                if isinstance(first, dict):
                    value = first.get("value", _NONE)
            if value is _NONE:
                schema = deref(doc, entry.get("schema"))
                if isinstance(schema, dict):
                    value = schema.get("example", _NONE)
            if value is not _NONE:
                return _Answer(status=int(code), headers={}, body=value, media=media)
    return None


def build(service: ServicePolicy, *, state: StateBuild) -> Mock | None:
    spec = service.spec
    if spec.mode != "mock":
        return None
    answers = [_Answer.of(rule) for rule in spec.mock]
    document = service.openapi
    if document is None:
        return Mock(service=service.name, answers=answers)
    return Mock(service=service.name, answers=answers, spec=document, examples=_examples(document))
