"""What the GraphQL and MCP steps hand to the rest of the chain and to telemetry.

A fake `next` records the operation labels a later step (the rate limiter)
sees; a stand-in exchange with an `attributes` dict is what telemetry will
read once the data plane carries one.
"""

from __future__ import annotations

import json
from typing import Any

from multidict import CIMultiDict

from sidecar.call import Call, Reply
from sidecar.policy.loader import load_policy
from sidecar.state import StateStore
from sidecar.steps import graphql, mcp
from sidecar.steps.operation import OPERATION


class Exchange:
    def __init__(self) -> None:
        self.attributes: dict[str, Any] = {}


def make_call(service: str, target: str, body: Any, agent: str = "a") -> Call:
    call = Call(
        service=service,
        method="POST",
        target=target,
        headers=CIMultiDict({"Content-Type": "application/json"}),
        body=json.dumps(body).encode(),
        agent=agent,
    )
    call.exchange = Exchange()
    return call


async def run(tmp_path, builder, service: str, call: Call) -> tuple[str, ...]:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nservices:\n"
        "  gq: {upstream: 'http://127.0.0.1:1', graphql: {}}\n"
        "  tools: {upstream: 'http://127.0.0.1:1', mcp: true}\n"
    )
    policy = load_policy(str(tmp_path))
    step = builder(policy.services[service], state=StateStore().begin())
    seen: list[tuple[str, ...]] = []

    async def next(c: Call) -> Reply:
        seen.append(OPERATION.get())
        return None  # type: ignore[return-value]

    await step(call, next)
    assert OPERATION.get() == ()  # reset once the step is done
    return seen[0]


async def test_graphql_labels_and_attributes(tmp_path) -> None:
    call = make_call("gq", "/graphql", {"query": "mutation Make { a { b } }"})
    assert await run(tmp_path, graphql.build, "gq", call) == ("mutation:Make",)
    assert call.exchange.attributes == {
        "graphql.operation.label": "mutation:Make",
        "graphql.operation.type": "mutation",
        "graphql.operation.name": "Make",
    }
    batch = [{"query": "{ a }"}, {"operationName": "P", "extensions": {"persistedQuery": {}}}]
    call = make_call("gq", "/graphql", batch)
    assert await run(tmp_path, graphql.build, "gq", call) == ("query:", "persisted:P")
    assert call.exchange.attributes == {
        "graphql.operation.label": "query:,persisted:P",
        "graphql.batch.size": 2,
        "graphql.persisted_query": True,
    }


async def test_mcp_labels_and_attributes(tmp_path) -> None:
    message = {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "grep"}}
    call = make_call("tools", "/mcp", message)
    assert await run(tmp_path, mcp.build, "tools", call) == ("tools/call:grep",)
    assert call.exchange.attributes == {
        "mcp.operation.label": "tools/call:grep",
        "mcp.method.name": "tools/call",
        "gen_ai.tool.name": "grep",
        "jsonrpc.request.id": "3",
    }
    batch = [message, {"jsonrpc": "2.0", "method": "notifications/initialized"}]
    call = make_call("tools", "/mcp", batch)
    labels = await run(tmp_path, mcp.build, "tools", call)
    assert labels == ("tools/call:grep", "notifications/initialized")
    assert call.exchange.attributes == {
        "mcp.operation.label": "tools/call:grep,notifications/initialized",
        "jsonrpc.batch.size": 2,
    }
