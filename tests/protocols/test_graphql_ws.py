"""GraphQL rules and limits over WebSocket, through the real `sidecar run` process: a
strawberry server speaking graphql-transport-ws and graphql-ws, gql's WebSocket
transport as the agent.

An operation the policy refuses over HTTP is refused over a WebSocket too, as
that subprotocol's `error` for its id, before the server runs anything; the
same connection then runs the next operation.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import strawberry
from aiohttp import WSMsgType, web
from gql import Client, gql
from gql.transport.aiohttp_websockets import AIOHTTPWebsocketsTransport
from gql.transport.exceptions import TransportQueryError
from strawberry.aiohttp.views import GraphQLView
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL

from tests.helpers import sidecar_process

pytestmark = pytest.mark.process

PROTOCOLS = [GRAPHQL_TRANSPORT_WS_PROTOCOL, GRAPHQL_WS_PROTOCOL]
SECRET = "canary-graphql-ws-secret"


@strawberry.type
class Issue:
    title: str


@strawberry.type
class Repo:
    name: str

    @strawberry.field
    def issues(self) -> list[Issue]:
        return [Issue(title="one")]


def schema(executed: list[str]) -> strawberry.Schema:
    @strawberry.type
    class Query:
        @strawberry.field
        def hello(self) -> str:
            executed.append("hello")
            return "hello"

        @strawberry.field
        def repos(self) -> list[Repo]:
            executed.append("repos")
            return [Repo(name="r")]

    @strawberry.type
    class Mutation:
        @strawberry.mutation
        def delete_repo(self, name: str) -> bool:
            executed.append("deleteRepo")
            return True

    @strawberry.type
    class Subscription:
        @strawberry.subscription
        async def count(self, to: int = 2) -> AsyncGenerator[int, None]:
            executed.append("count")
            for i in range(to):
                yield i

    return strawberry.Schema(query=Query, mutation=Mutation, subscription=Subscription)


@pytest.fixture
async def sidecar(upstream, tmp_path: Path) -> AsyncIterator[tuple[str, list[str]]]:
    executed: list[str] = []
    app = web.Application()
    view = GraphQLView(schema=schema(executed), subscription_protocols=PROTOCOLS)
    app.router.add_route("*", "/graphql", view)
    app.router.add_route("GET", "/subscriptions", view)  # where many servers take them
    base = await upstream(app)
    (tmp_path / "p.yaml").write_text(
        f"""version: 1
services:
  gh:
    upstream: {base}
    auth: {{type: bearer, token: {SECRET}}}
    graphql:
      max_depth: 2
      allow:
        - {{agents: [research-*], types: [query, subscription]}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    async with sidecar_process(tmp_path, env=env) as proc:
        yield proc.url.replace("http://", "ws://") + "/gh/graphql", executed


def _agent(url: str, protocol: str) -> Client:
    transport = AIOHTTPWebsocketsTransport(
        url=url, subprotocols=[protocol], headers={"X-Agent-Id": "research-bot"}
    )
    return Client(transport=transport)


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_refused_operations_get_the_subprotocols_error_and_the_socket_goes_on(
    sidecar, protocol
):
    url, executed = sidecar
    count = gql("subscription { count(to: 3) }")
    async with asyncio.timeout(20), _agent(url, protocol) as session:
        counted = [r async for r in session.subscribe(count)]
        assert counted == [{"count": 0}, {"count": 1}, {"count": 2}]
        # A mutation no rule allows: the subprotocol's error, with the sidecar's sentence.
        with pytest.raises(TransportQueryError) as refused:
            await session.execute(gql('mutation Drop { deleteRepo(name: "prod") }'))
        error = refused.value.errors[0]  # type: ignore[index]
        assert "may not run the GraphQL mutation 'Drop'" in error["message"]
        assert error["extensions"] == {"reason": "forbidden", "service": "gh"}
        assert SECRET not in json.dumps(refused.value.errors)
        # Deeper than max_depth: refused the same way.
        with pytest.raises(TransportQueryError) as deep:
            await session.execute(gql("query Deep { repos { issues { title } } }"))
        assert "fields deep" in deep.value.errors[0]["message"]  # type: ignore[index]
        assert deep.value.errors[0]["extensions"]["reason"] == "graphql_limit"  # type: ignore[index]
        # The connection is still usable.
        counted = [r async for r in session.subscribe(count)]
        assert counted == [{"count": 0}, {"count": 1}, {"count": 2}]
        if protocol == GRAPHQL_TRANSPORT_WS_PROTOCOL:  # strawberry's graphql-ws: no queries
            assert await session.execute(gql("query Hi { hello }")) == {"hello": "hello"}
    assert executed == ["count", "count"] + (["hello"] if protocol == PROTOCOLS[0] else [])


async def test_a_graphql_socket_on_another_path_is_judged_too(sidecar):
    url, executed = sidecar
    other = url.removesuffix("/graphql") + "/subscriptions"
    async with asyncio.timeout(20), _agent(other, GRAPHQL_TRANSPORT_WS_PROTOCOL) as session:
        with pytest.raises(TransportQueryError) as refused:
            await session.execute(gql('mutation Drop { deleteRepo(name: "prod") }'))
        assert refused.value.errors[0]["extensions"]["reason"] == "forbidden"  # type: ignore[index]
        assert await session.execute(gql("query Hi { hello }")) == {"hello": "hello"}
    assert executed == ["hello"]


async def test_a_message_read_two_ways_closes_the_socket(sidecar):
    """A subscribe with `query` twice: servers differ on which one they run."""
    url, executed = sidecar
    twice = (
        '{"id": "1", "type": "subscribe", "payload": '
        '{"query": "{ hello }", "query": "mutation { deleteRepo(name: \\"x\\") }"}}'
    )
    async with (
        aiohttp.ClientSession() as client,
        client.ws_connect(
            url, protocols=[GRAPHQL_TRANSPORT_WS_PROTOCOL], headers={"X-Agent-Id": "research-bot"}
        ) as ws,
    ):
        await ws.send_str(json.dumps({"type": "connection_init"}))
        ack: Any = await ws.receive_json(timeout=10)
        assert ack["type"] == "connection_ack"
        await ws.send_str(twice)
        closing = await ws.receive(timeout=10)
        assert closing.type in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING)
        assert ws.close_code == 4400 or closing.data == 4400
    assert executed == []
