"""`graphql.count_errors`: GraphQL errors in a 200 answer trip the breaker.

The upstream is a real GraphQL server (graphql-core executing a schema over
aiohttp) whose `status` resolver throws while the backend is "down": it then
answers 200 with an `errors` array, as GraphQL servers do. The agent gets
those answers unchanged; the breaker counts them and opens; metrics and spans
say so. Answers too large to hold are relayed unread.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web
from graphql import build_schema, graphql

from tests.conftest import RunningSidecar

SCHEMA = build_schema("type Query { status: String, big: String }")
QUERY = {"query": "query Status { status }"}
BIG = "x" * (1 << 20)  # an answer over the 1 MiB the sidecar reads


class Backend:
    def __init__(self) -> None:
        self.down = True
        self.hits = 0

    def status(self, info: Any) -> str:
        if self.down:
            raise RuntimeError("backend unavailable")
        return "ok"

    def big(self, info: Any) -> str:
        raise RuntimeError("too big to serve " + BIG)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            document = await request.json()
            result = await graphql(SCHEMA, document["query"], root_value=self)
            data = json.dumps(result.formatted).encode()
            if len(data) < (1 << 20):
                return web.Response(body=data, content_type="application/json")
            # A large answer streamed chunked: no Content-Length tells its size first.
            response = web.StreamResponse(headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            for i in range(0, len(data), 64 * 1024):
                await response.write(data[i : i + 64 * 1024])
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/graphql", handle)
        return app


def policy(base: str, count_errors: bool) -> str:
    return f"""
        version: 1
        services:
          gql:
            upstream: {base}
            graphql: {{path: /graphql, count_errors: {str(count_errors).lower()}}}
            circuit_breaker: {{failure_ratio: 0.5, min_requests: 3, window: 60s, open_for: 60s}}
        """


async def ask(
    client: aiohttp.ClientSession, sc: RunningSidecar, query: dict[str, str] = QUERY
) -> tuple[int, dict[str, str], bytes]:
    async with client.post(f"{sc.url}/gql/graphql", json=query) as r:
        return r.status, dict(r.headers), await r.read()


async def test_errors_in_200_answers_open_the_breaker(upstream, start_sidecar, client):
    backend = Backend()
    base = await upstream(backend.app())
    sc = await start_sidecar(policy(base, True))
    async with client.post(f"{base}/graphql", json=QUERY) as r:
        direct = await r.read()
    assert json.loads(direct)["errors"][0]["message"] == "backend unavailable"
    hits = backend.hits

    for _ in range(3):
        status, headers, body = await ask(client, sc)
        # The agent reads the server's own answer, byte for byte.
        assert (status, body) == (200, direct)
        assert "X-Sidecar-Error" not in headers
    status, headers, body = await ask(client, sc)
    assert status == 503
    assert headers["X-Sidecar-Error"] == "circuit_open"
    assert backend.hits == hits + 3  # the fourth call never reached the server

    async with client.get(f"{sc.admin}/metrics") as r:
        metrics = await r.text()
    assert 'sidecar_graphql_errors_total{service="gql"} 3.0' in metrics
    assert 'sidecar_circuit_breaker_transitions_total{from="closed",service="gql",to="open"}' in (
        metrics
    )


async def test_without_count_errors_a_200_is_a_success(upstream, start_sidecar, client):
    backend = Backend()
    sc = await start_sidecar(policy(await upstream(backend.app()), False))
    for _ in range(4):
        status, _, body = await ask(client, sc)
        assert status == 200 and b"backend unavailable" in body
    async with client.get(f"{sc.admin}/services") as r:
        breaker = (await r.json())["services"]["gql"]["circuit_breaker"]
    assert (breaker["state"], breaker["failures"], breaker["requests"]) == ("closed", 0, 4)
    async with client.get(f"{sc.admin}/metrics") as r:
        assert 'sidecar_graphql_errors_total{service="gql"}' not in await r.text()


async def test_answers_without_errors_and_too_large_ones_are_not_counted(
    upstream, start_sidecar, client
):
    backend = Backend()
    base = await upstream(backend.app())
    sc = await start_sidecar(policy(base, True))
    backend.down = False
    for _ in range(3):
        status, _, body = await ask(client, sc)
        assert (status, json.loads(body)) == (200, {"data": {"status": "ok"}})
    # Errors in an answer over 1 MiB are not read: it streams through, uncounted.
    for _ in range(3):
        status, _, body = await ask(client, sc, {"query": "{ big }"})
        assert status == 200
        answer = json.loads(body)
        assert answer["errors"][0]["message"] == "too big to serve " + BIG
    async with client.get(f"{sc.admin}/services") as r:
        breaker = (await r.json())["services"]["gql"]["circuit_breaker"]
    assert (breaker["state"], breaker["failures"], breaker["requests"]) == ("closed", 0, 6)
    async with client.get(f"{sc.admin}/metrics") as r:
        assert 'sidecar_graphql_errors_total{service="gql"}' not in await r.text()


async def test_the_server_span_is_an_error_with_the_error_count(upstream, start_sidecar, client):
    from tests.otlp_receiver import Receiver

    receiver = Receiver()
    collector = await upstream(receiver.app())
    backend = Backend()
    base = await upstream(backend.app())
    sc = await start_sidecar(policy(base, True), env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector})
    status, _, _ = await ask(client, sc)
    assert status == 200
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    server = next(s for s in receiver.spans if s.kind == "server")
    assert server.attributes["graphql.errors"] == 1
    assert server.attributes["error.type"] == "graphql_errors"
    assert server.attributes["http.response.status_code"] == 200
    assert server.status_code == 2  # ERROR


async def test_an_answer_broken_off_while_read_is_upstream_unreachable(
    upstream, start_sidecar, client
):
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.content_length = 1000
        await response.prepare(request)
        await response.write(b'{"errors": [{"message": "par')
        assert request.transport is not None
        request.transport.close()
        return response

    app = web.Application()
    app.router.add_post("/graphql", broken)
    sc = await start_sidecar(policy(await upstream(app), True))
    status, headers, body = await ask(client, sc)
    assert status == 502
    assert headers["X-Sidecar-Error"] == "upstream_unreachable"
    assert "closed the connection before its whole answer" in json.loads(body)["detail"]
