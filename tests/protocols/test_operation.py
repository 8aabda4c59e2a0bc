"""What the GraphQL and MCP steps hand to the rest of the chain and to telemetry.

A fake `next` records the operation labels a later step (the rate limiter)
sees; a stand-in exchange with an `attributes` dict is what telemetry will
read once the data plane carries one. Generated bodies show that whatever an
agent sends, a step either passes it on or refuses it with a problem.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from sidecar.core.call import Call, Reply, StaticReply
from sidecar.core.problems import ProblemError
from sidecar.core.state import StateStore
from sidecar.policy.loader import ServicePolicy, load_policy
from sidecar.policy.models import Service
from sidecar.policy.positions import Position
from sidecar.steps.operation import OPERATION
from sidecar.steps.protocols import graphql, mcp


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
        return StaticReply(200)

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


@settings(max_examples=300, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=200),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: (
                st.lists(inner, max_size=4)
                | st.dictionaries(
                    st.sampled_from(["query", "operationName", "variables", "extensions", "x"]),
                    inner,
                    max_size=4,
                )
            ),
            max_leaves=12,
        ).map(lambda v: json.dumps(v).encode()),
        st.text(alphabet='{}()[]:$.@ !querymutationfragmentonab_123"', max_size=80).map(
            lambda q: json.dumps({"query": q}).encode()
        ),
    )
)
async def test_any_graphql_body_is_passed_or_refused_with_a_problem(body: bytes) -> None:
    await _any_body(graphql.build, "gq", "/graphql", body)


@settings(max_examples=200, deadline=None)
@given(
    body=st.recursive(
        st.none() | st.integers() | st.text(max_size=10) | st.just("tools/call"),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(["jsonrpc", "id", "method", "params", "name", "result"]),
                inner,
                max_size=4,
            )
        ),
        max_leaves=10,
    ).map(lambda v: json.dumps(v).encode())
)
async def test_any_json_rpc_body_is_passed_or_refused_with_a_problem(body: bytes) -> None:
    await _any_body(mcp.build, "tools", "/mcp", body)


RULES: dict[str, dict[str, Any]] = {
    "gq": {"graphql": {"max_depth": 3, "max_cost": 50, "allow": [{"types": ["query"]}]}},
    "tools": {"mcp": {"tools": ["search_*"]}},
}


async def _any_body(builder: Any, service: str, target: str, body: bytes) -> None:
    spec = Service(upstream="http://127.0.0.1:1", **RULES[service])
    policy = ServicePolicy(
        name=service, prefix=f"/{service}", spec=spec, position=Position("p", 1, 1)
    )
    step = builder(policy, state=StateStore().begin())

    async def next(c: Call) -> Reply:
        return StaticReply(200)

    call = Call(
        service=service,
        method="POST",
        target=target,
        headers=CIMultiDict(),
        body=body,
        agent="a",
    )
    try:
        await step(call, next)
    except ProblemError as err:
        # 200: a refused JSON-RPC request, answered with its JSON-RPC error.
        assert err.status in (200, 400, 403, 413)
        assert "Traceback" not in err.detail
