"""GraphQL policy as agents meet it: a strawberry server, the `gql` client, the real sidecar.

The other GraphQL tests speak raw HTTP to a graphql-core endpoint; here both
ends are the libraries agents and APIs actually use, so the sidecar's answers
are read the way a `gql` agent reads them: an allowed query returns data, a
refused mutation or an over-deep query fails with the sidecar's status and
reaches nothing, and GraphQL errors in 200 answers open the breaker.
"""

from __future__ import annotations

import json
from typing import Any
from unittest.mock import ANY

import pytest
import strawberry
from aiohttp import web
from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError
from strawberry.aiohttp.views import GraphQLView

SECRET = "canary-strawberry-secret"


@strawberry.type
class Issue:
    title: str


@strawberry.type
class Repo:
    name: str

    @strawberry.field
    def issues(self, first: int = 2) -> list[Issue]:
        return [Issue(title=f"issue {i}") for i in range(first)]


class Backend:
    """What the server saw: operations executed and the Authorization of each."""

    def __init__(self) -> None:
        self.executed: list[str] = []
        self.authorizations: list[str | None] = []
        self.down = False


def schema(backend: Backend) -> strawberry.Schema:
    @strawberry.type
    class Query:
        @strawberry.field
        def hello(self, name: str = "world") -> str:
            backend.executed.append("hello")
            return f"hello {name}"

        @strawberry.field
        def repos(self, first: int = 1) -> list[Repo]:
            backend.executed.append("repos")
            return [Repo(name=f"repo{i}") for i in range(first)]

        @strawberry.field
        def status(self) -> str:
            backend.executed.append("status")
            if backend.down:
                raise RuntimeError("backend unavailable")
            return "ok"

    @strawberry.type
    class Mutation:
        @strawberry.mutation
        def delete_repo(self, name: str) -> bool:
            backend.executed.append("deleteRepo")
            return True

    return strawberry.Schema(query=Query, mutation=Mutation)


def server(backend: Backend) -> web.Application:
    @web.middleware
    async def seen(request: web.Request, handler: Any) -> web.StreamResponse:
        backend.authorizations.append(request.headers.get("Authorization"))
        return await handler(request)

    app = web.Application(middlewares=[seen])
    app.router.add_route("*", "/graphql", GraphQLView(schema=schema(backend)))
    return app


async def start(upstream, start_sidecar, backend: Backend) -> str:
    base = await upstream(server(backend))
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          gh:
            upstream: {base}
            auth: {{type: bearer, token: {SECRET}}}
            graphql:
              path: /graphql
              max_depth: 2
              count_errors: true
              allow:
                - {{agents: [research-*], types: [query]}}
            circuit_breaker: {{failure_ratio: 0.5, min_requests: 3, window: 60s, open_for: 60s}}
        """
    )
    return sc.url


def agent(url: str, name: str = "research-bot") -> Client:
    transport = AIOHTTPTransport(url=f"{url}/gh/graphql", headers={"X-Agent-Id": name})
    return Client(transport=transport)


async def test_a_gql_agent_queries_and_its_mutation_is_refused_before_the_server(
    upstream, start_sidecar
):
    backend = Backend()
    url = await start(upstream, start_sidecar, backend)
    async with agent(url) as session:
        result = await session.execute(gql('query Greet { hello(name: "agent") }'))
        assert result == {"hello": "hello agent"}
        # The sidecar's refusals carry GraphQL `errors`: gql shows their sentence.
        with pytest.raises(TransportQueryError) as refused:
            await session.execute(gql('mutation Drop { deleteRepo(name: "prod") }'))
        assert "may not run the GraphQL mutation 'Drop'" in str(refused.value)
        assert refused.value.errors == [
            {"message": ANY, "extensions": {"code": "forbidden"}},
        ]
        with pytest.raises(TransportQueryError) as deep:
            await session.execute(gql("{ repos { issues { title } } }"))
        assert deep.value.errors is not None
        assert deep.value.errors[0]["extensions"] == {"code": "graphql_limit"}
    assert backend.executed == ["hello"]
    assert backend.authorizations == [f"Bearer {SECRET}"]


async def test_the_refusals_explain_themselves_in_problem_json(upstream, start_sidecar, client):
    backend = Backend()
    url = await start(upstream, start_sidecar, backend)
    headers = {"X-Agent-Id": "research-bot"}
    mutation = {"query": 'mutation Drop { deleteRepo(name: "prod") }'}
    async with client.post(f"{url}/gh/graphql", json=mutation, headers=headers) as r:
        body = await r.json(content_type=None)
        assert r.headers["Content-Type"] == "application/problem+json"
    assert body["reason"] == "forbidden"
    assert "mutation 'Drop'" in body["detail"]
    deep = {"query": "{ repos { issues { title } } }"}
    async with client.post(f"{url}/gh/graphql", json=deep, headers=headers) as r:
        body = await r.json(content_type=None)
    assert body["reason"] == "graphql_limit"
    assert SECRET not in json.dumps(body)
    assert backend.executed == []


async def test_graphql_errors_in_200_answers_open_the_breaker_for_a_gql_agent(
    upstream, start_sidecar
):
    backend = Backend()
    url = await start(upstream, start_sidecar, backend)
    backend.down = True
    async with agent(url) as session:
        for _ in range(3):
            # The agent still gets the server's own GraphQL error, unchanged.
            with pytest.raises(TransportQueryError) as failed:
                await session.execute(gql("{ status }"))
            assert "backend unavailable" in str(failed.value)
        backend.down = False
        with pytest.raises(TransportQueryError) as open_circuit:
            await session.execute(gql("{ status }"))
        assert open_circuit.value.errors is not None
        assert open_circuit.value.errors[0]["extensions"] == {"code": "circuit_open"}
    assert backend.executed == ["status"] * 3
