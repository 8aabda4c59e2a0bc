"""gql's `fetch_schema_from_transport=True` works through the README's limits, and
introspection can be denied per agent (issue 21, item 4)."""

from __future__ import annotations

import pytest
import strawberry
from aiohttp import web
from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError
from strawberry.aiohttp.views import GraphQLView


@strawberry.type
class Query:
    @strawberry.field
    def hello(self) -> str:
        return "hello"


def server() -> web.Application:
    app = web.Application()
    app.router.add_route("*", "/graphql", GraphQLView(schema=strawberry.Schema(query=Query)))
    return app


async def start(upstream, start_sidecar, introspection: str | None = None) -> str:  # type: ignore[no-untyped-def]
    base = await upstream(server())
    extra = f"\n              introspection: {introspection}" if introspection else ""
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          shop:
            upstream: {base}
            graphql:
              path: /graphql
              max_depth: 8
              max_cost: 5000{extra}
        """
    )
    return str(sc.url)


def agent(url: str, name: str) -> Client:
    transport = AIOHTTPTransport(url=f"{url}/shop/graphql", headers={"X-Agent-Id": name})
    return Client(transport=transport, fetch_schema_from_transport=True)


async def test_gql_fetches_the_schema_through_the_readmes_max_depth(upstream, start_sidecar):  # type: ignore[no-untyped-def]
    url = await start(upstream, start_sidecar)
    async with agent(url, "research-bot") as session:
        assert await session.execute(gql("{ hello }")) == {"hello": "hello"}
    assert session.client.schema is not None
    assert session.client.schema.query_type is not None


async def test_introspection_is_denied_to_the_agents_not_named(upstream, start_sidecar):  # type: ignore[no-untyped-def]
    url = await start(upstream, start_sidecar, "[codegen-*]")
    async with agent(url, "codegen-ci") as session:
        assert await session.execute(gql("{ hello }")) == {"hello": "hello"}
    with pytest.raises(TransportQueryError) as refused:
        async with agent(url, "research-bot") as session:
            pass
    assert "may not introspect the schema of service 'shop'" in str(refused.value)
    # What is not introspection still passes for that agent.
    plain = Client(
        transport=AIOHTTPTransport(
            url=f"{url}/shop/graphql", headers={"X-Agent-Id": "research-bot"}
        )
    )
    async with plain as session:
        assert await session.execute(gql("{ hello }")) == {"hello": "hello"}


async def test_introspection_deny_for_everyone(upstream, start_sidecar, client):  # type: ignore[no-untyped-def]
    url = await start(upstream, start_sidecar, "deny")
    query = {"query": '{ __type(name: "Query") { name } }'}
    async with client.post(f"{url}/shop/graphql", json=query) as r:
        assert r.status == 403
        body = await r.json(content_type=None)
    assert body["reason"] == "forbidden"
    assert body["errors"][0]["extensions"] == {"code": "forbidden"}
