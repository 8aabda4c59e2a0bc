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

from multidict import CIMultiDict

from ..call import Call, Handler, Reply, StaticReply
from ..headers import SERVER
from ..policy.loader import ServicePolicy
from ..policy.testing import MockAnswer
from ..problems import ProblemError
from ..state import StateBuild
from .operation import annotate

MOCK_HEADER = "X-Sidecar-Mock"


class _Answer:
    __slots__ = ("data", "delay", "headers", "method", "path", "status")

    def __init__(self, rule: MockAnswer) -> None:
        self.method = rule.match.method
        self.path = rule.match.path
        self.status = rule.status
        self.delay = rule.delay
        headers: CIMultiDict[str] = CIMultiDict(rule.headers)
        body = rule.body
        if body is None:
            self.data = b""
        elif isinstance(body, str):
            self.data = body.encode()
            headers.setdefault("Content-Type", "text/plain; charset=utf-8")
        else:
            self.data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        headers.setdefault("Server", SERVER)
        headers[MOCK_HEADER] = "true"
        self.headers = headers

    def matches(self, method: str, path: str) -> bool:
        return (self.method == "*" or self.method == method) and fnmatchcase(path, self.path)


class Mock:
    def __init__(self, *, service: str, answers: list[_Answer]) -> None:
        self.service = service
        self.answers = answers

    async def __call__(self, call: Call, next: Handler) -> Reply:
        path = call.target.partition("?")[0]
        # A HEAD is answered by the GET rule, as a server would.
        method = call.method
        for answer in self.answers:
            if answer.matches(method, path) or (method == "HEAD" and answer.matches("GET", path)):
                annotate(call, {"sidecar.mock": True})
                if answer.delay:
                    await asyncio.sleep(answer.delay)
                return StaticReply(answer.status, answer.headers, answer.data)
        raise ProblemError(
            "no_mock",
            f"Service '{self.service}' is in mock mode and none of its mock answers matches "
            f"{method} {path}; the upstream is never called in mock mode. Add a mock answer "
            "for it to the policy.",
            service=self.service,
            headers={MOCK_HEADER: "true"},
        )


def build(service: ServicePolicy, *, state: StateBuild) -> Mock | None:
    spec = service.spec
    if spec.mode != "mock":
        return None
    return Mock(service=service.name, answers=[_Answer(rule) for rule in spec.mock])
