"""GraphQL-aware services through the real sidecar, against a real GraphQL server.

The upstream executes a small schema with graphql-core and counts what
reaches it, so a test sees both the sidecar's refusal and that nothing was sent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web
from graphql import build_schema, graphql
from yarl import URL

from tests.conftest import RunningSidecar

SCHEMA = build_schema(
    """
    type Query {
      hello(name: String): String
      repos(first: Int): [Repo]
    }
    type Repo { name: String, issues(first: Int): [Issue] }
    type Issue { title: String }
    type Mutation { createIssue(title: String): Issue, deleteRepo(name: String): Boolean }
    """
)


class Root:
    def hello(self, info: Any, name: str = "world") -> str:
        return f"hello {name}"

    def repos(self, info: Any, first: int = 2) -> list[dict[str, Any]]:
        issues = [{"title": f"issue {i}"} for i in range(3)]
        return [{"name": f"repo{i}", "issues": issues} for i in range(first)]

    def createIssue(self, info: Any, title: str) -> dict[str, str]:
        return {"title": title}

    def deleteRepo(self, info: Any, name: str) -> bool:
        return True


class GraphQLServer:
    """A real GraphQL-over-HTTP endpoint at /graphql (POST JSON, GET params, batches)."""

    def __init__(self) -> None:
        self.hits = 0
        self.bodies: list[bytes] = []

    def app(self) -> web.Application:
        async def execute(request: dict[str, Any]) -> dict[str, Any]:
            if "query" not in request:
                return {"errors": [{"message": "PersistedQueryNotFound"}]}
            result = await graphql(
                SCHEMA,
                request["query"],
                root_value=Root(),
                variable_values=request.get("variables"),
                operation_name=request.get("operationName"),
            )
            return result.formatted

        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            if request.method == "GET":
                params = dict(request.query)
                if "variables" in params:
                    params["variables"] = json.loads(params["variables"])
                return web.json_response(await execute(params))
            body = await request.read()
            self.bodies.append(body)
            document = json.loads(body)
            if isinstance(document, list):
                return web.json_response([await execute(d) for d in document])
            return web.json_response(await execute(document))

        async def other(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(text=f"other {request.method} {await request.text()}")

        app = web.Application()
        app.router.add_route("*", "/graphql", handle)
        app.router.add_route("*", "/{tail:.*}", other)
        return app


GRAPHQL = """
                path: /graphql
                max_depth: 4
                max_aliases: 2
                max_cost: 100
                allow:
                  - {agents: [research-*], types: [query]}
                  - {agents: [writer], types: [query, mutation], operations: [Create*, Hello]}
"""


async def start(upstream, start_sidecar, graphql_policy: str = GRAPHQL, extra: str = ""):
    server = GraphQLServer()
    base = await upstream(server.app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          gh:
            upstream: {base}
            auth: {{type: bearer, token: canary-graphql-secret}}
            graphql:
        {graphql_policy}
        {extra}
        """
    )
    return server, sc


async def post(
    client: aiohttp.ClientSession,
    sc: RunningSidecar,
    body: Any,
    agent: str | None = "research-bot",
    *,
    raw: bytes | None = None,
    path: str = "/gh/graphql",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], Any]:
    sent = dict(headers or {})
    if agent:
        sent["X-Agent-Id"] = agent
    data = raw if raw is not None else json.dumps(body).encode()
    sent.setdefault("Content-Type", "application/json")
    # encoded=True: the path goes out as written, percent-escapes included.
    url = URL(f"{sc.url}{path}", encoded=True)
    async with client.post(url, data=data, headers=sent) as resp:
        text = await resp.read()
        try:
            parsed: Any = json.loads(text)
        except ValueError:
            parsed = text.decode()
        return resp.status, dict(resp.headers), parsed


def assert_problem(status: int, headers: dict[str, str], body: Any, reason: str, code: int) -> None:
    assert status == code, body
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["X-Sidecar-Error"] == reason
    assert body["reason"] == reason
    assert body["status"] == code
    assert body["service"] == "gh"
    assert "canary-graphql-secret" not in json.dumps(body)


async def test_an_allowed_query_reaches_the_server_unchanged(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    request = {"query": "query Hello($n: String) { hello(name: $n) }", "variables": {"n": "ada"}}
    status, _, body = await post(client, sc, request)
    assert status == 200
    assert body == {"data": {"hello": "hello ada"}}
    assert server.bodies == [json.dumps(request).encode()]


async def test_depth_alias_and_cost_limits_refuse_with_graphql_limit(
    upstream, start_sidecar, client
):
    server, sc = await start(upstream, start_sidecar)
    # Fragments and inline fragments count where they are spread: depth 3, one alias.
    spread = {
        "query": "query Deep { repos { ...R } } fragment R on Repo "
        "{ issues { ... on Issue { title } } a: name } ",
    }
    status, _, body = await post(client, sc, spread)
    assert status == 200, body

    nested = "{ repos { issues { title } } }".replace("title", "t { u { v } }")
    status, headers, body = await post(client, sc, {"query": nested})
    assert_problem(status, headers, body, "graphql_limit", 400)
    assert "5 fields deep" in body["detail"] and "at most 4" in body["detail"]

    aliases = {"query": "query Many { a: hello b: hello c: hello }"}
    status, headers, body = await post(client, sc, aliases)
    assert_problem(status, headers, body, "graphql_limit", 400)
    assert "query 'Many' uses 3 aliases" in body["detail"]

    # 1 + 10 * (1 + 20 * 1) = 211 > 100, whether the page size is written or a variable.
    costly = "query Pages($n: Int) { repos(first: 10) { issues(first: $n) { title } } }"
    status, headers, body = await post(client, sc, {"query": costly, "variables": {"n": 20}})
    assert_problem(status, headers, body, "graphql_limit", 400)
    assert "estimated cost of 211" in body["detail"]
    status, _, body = await post(client, sc, {"query": costly, "variables": {"n": 2}})
    assert status == 200, body  # 1 + 10 * (1 + 2) = 31
    assert len(body["data"]["repos"]) == 10

    assert server.hits == 2


async def test_allow_rules_by_agent_operation_type_and_name(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    create = {"query": 'mutation CreateOne { createIssue(title: "x") { title } }'}
    delete = {"query": 'mutation DeleteOne { deleteRepo(name: "x") }'}

    status, headers, body = await post(client, sc, create, "research-bot")
    assert_problem(status, headers, body, "forbidden", 403)
    assert body["detail"] == (
        "Agent 'research-bot' may not run the GraphQL mutation 'CreateOne' on service 'gh': "
        "no graphql.allow rule of the policy lets it."
    )
    status, _, body = await post(client, sc, create, "writer")
    assert status == 200
    assert body == {"data": {"createIssue": {"title": "x"}}}
    status, headers, body = await post(client, sc, delete, "writer")
    assert_problem(status, headers, body, "forbidden", 403)
    # An anonymous query matches only a `*` name glob: the writer's rule names operations.
    status, headers, body = await post(client, sc, {"query": "{ hello }"}, "writer")
    assert_problem(status, headers, body, "forbidden", 403)
    assert "anonymous query" in body["detail"]
    status, headers, body = await post(client, sc, {"query": "{ hello }"}, None)
    assert_problem(status, headers, body, "forbidden", 403)
    assert body["detail"].startswith("A caller without an agent id may not run")
    assert server.hits == 1


async def test_operation_name_picks_the_operation_that_is_checked(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    document = 'query Hello { hello } mutation CreateOne { createIssue(title: "y") { title } }'
    status, _, body = await post(client, sc, {"query": document, "operationName": "Hello"})
    assert status == 200
    assert body == {"data": {"hello": "hello world"}}
    status, headers, body = await post(
        client, sc, {"query": document, "operationName": "CreateOne"}
    )
    assert_problem(status, headers, body, "forbidden", 403)
    status, headers, body = await post(client, sc, {"query": document})
    assert_problem(status, headers, body, "bad_request", 400)
    assert "2 operations: name one in operationName" in body["detail"]
    status, headers, body = await post(client, sc, {"query": document, "operationName": "Nope"})
    assert_problem(status, headers, body, "bad_request", 400)
    assert "no operation named 'Nope'" in body["detail"]
    assert server.hits == 1


async def test_get_requests_are_checked_like_posts(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    headers = {"X-Agent-Id": "research-bot"}
    params = {"query": "query Hello($n: String) { hello(name: $n) }", "variables": '{"n": "q"}'}
    async with client.get(f"{sc.url}/gh/graphql", params=params, headers=headers) as resp:
        assert resp.status == 200
        assert await resp.json() == {"data": {"hello": "hello q"}}
    params = {"query": 'mutation { createIssue(title: "z") { title } }'}
    async with client.get(f"{sc.url}/gh/graphql", params=params, headers=headers) as resp:
        assert resp.status == 403
        assert resp.headers["X-Sidecar-Error"] == "forbidden"
    # A GET without an operation (a GraphiQL page) and other paths pass as they are.
    async with client.get(f"{sc.url}/gh/graphql", headers=headers) as resp:
        assert resp.status == 200
    status, _, body = await post(client, sc, None, raw=b"not json", path="/gh/upload")
    assert status == 200
    assert body == "other POST not json"
    assert server.hits == 3


async def test_persisted_query_ids_pass_unless_refused_by_policy(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    persisted = {
        "operationName": "Hello",
        "extensions": {"persistedQuery": {"version": 1, "sha256Hash": "ab" * 32}},
    }
    status, _, body = await post(client, sc, persisted)
    assert status == 200
    assert body == {"errors": [{"message": "PersistedQueryNotFound"}]}
    # The client's second try carries the text too: that one is checked.
    retry = {**persisted, "query": 'mutation Hello { createIssue(title: "p") { title } }'}
    status, headers, body = await post(client, sc, retry)
    assert_problem(status, headers, body, "forbidden", 403)
    assert server.hits == 1

    refusing = GRAPHQL + "                persisted_queries: false"
    server, sc = await start(upstream, start_sidecar, refusing)
    status, headers, body = await post(client, sc, persisted)
    assert_problem(status, headers, body, "forbidden", 403)
    assert "persisted-query ids" in body["detail"]
    assert server.hits == 0


async def test_batches_check_every_operation_and_add_up_their_cost(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    batch = [{"query": "query Hello { hello }"}, {"query": "{ repos(first: 3) { name } }"}]
    status, _, body = await post(client, sc, batch)
    assert status == 200
    assert body[0] == {"data": {"hello": "hello world"}}
    assert len(body[1]["data"]["repos"]) == 3

    with_mutation = [*batch, {"query": 'mutation { createIssue(title: "b") { title } }'}]
    status, headers, body = await post(client, sc, with_mutation)
    assert_problem(status, headers, body, "forbidden", 403)

    # Each costs 1 + 30 = 31, within 100 alone; four together cost 124.
    pages = {"query": "{ repos(first: 30) { name } }"}
    status, headers, body = await post(client, sc, [pages] * 4)
    assert_problem(status, headers, body, "graphql_limit", 400)
    assert "batch of 4 GraphQL operations has an estimated cost of 124" in body["detail"]
    assert server.hits == 1


async def test_malformed_requests_get_a_clear_400_not_a_traceback(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    cases: list[tuple[bytes, str]] = [
        (b'{"query": ', "is not valid JSON (Expecting value at line 1 column 11)"),
        (b"\xff\xfe\x00garbage", "is not"),
        (b"", "is not valid JSON"),
        (b"42", "must be a JSON object with a `query`"),
        (b"[]", "must be a JSON object with a `query`"),
        (b'{"variables": {}}', "the request has no `query`"),
        (b'{"query": 7}', "`query` must be a string"),
        (b'{"query": "{ hello }", "variables": [1]}', "`variables` must be a JSON object"),
        (b'{"query": "{ hello "}', "not valid GraphQL: Syntax Error"),
        (b'{"query": "fragment F on Query { hello }"}', "holds no operation"),
        (
            b'{"query": "{ ...A } fragment A on Query { ...B } fragment B on Query { ...A }"}',
            "spreads itself",
        ),
        (b'{"query": "{ ...Missing }"}', "no fragment named 'Missing'"),
    ]
    for raw, expected in cases:
        status, headers, body = await post(client, sc, None, raw=raw)
        assert_problem(status, headers, body, "bad_request", 400)
        assert expected in body["detail"], (raw, body["detail"])
        assert "Traceback" not in body["detail"]
    # A document built to exhaust the parser is refused as over a limit.
    huge = {"query": "{" + " hello" * 30_000 + " }"}
    status, headers, body = await post(client, sc, huge)
    assert_problem(status, headers, body, "graphql_limit", 400)
    deep = {"query": "{" + " repos {" * 2_000 + " name" + " }" * 2_001}
    status, headers, body = await post(client, sc, deep)
    assert_problem(status, headers, body, "graphql_limit", 400)
    assert server.hits == 0


async def test_application_graphql_bodies_are_checked(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    status, headers, body = await post(
        client,
        sc,
        None,
        raw=b'mutation { deleteRepo(name: "x") }',
        headers={"Content-Type": "application/graphql"},
    )
    assert_problem(status, headers, body, "forbidden", 403)
    assert server.hits == 0


async def test_without_allow_rules_every_operation_passes(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar, "                max_depth: 10")
    status, _, body = await post(
        client, sc, {"query": 'mutation { deleteRepo(name: "x") }'}, agent=None
    )
    assert status == 200
    assert body == {"data": {"deleteRepo": True}}
    assert server.hits == 1


async def test_rate_limits_can_count_only_some_operations(upstream, start_sidecar, client):
    limits = """
            rate_limit:
              - {rate: 1/h, burst: 2, per: agent, operations: ["mutation:*"]}
"""
    server, sc = await start(upstream, start_sidecar, "                max_depth: 10", limits)
    mutation = {"query": 'mutation M { createIssue(title: "r") { title } }'}
    query = {"query": "query Hello { hello }"}
    assert [(await post(client, sc, mutation, "a"))[0] for _ in range(3)] == [200, 200, 429]
    # Queries are not counted, and another agent has its own mutations.
    assert [(await post(client, sc, query, "a"))[0] for _ in range(3)] == [200] * 3
    assert (await post(client, sc, mutation, "b"))[0] == 200
    status, headers, body = await post(client, sc, mutation, "a")
    assert_problem(status, headers, body, "rate_limited", 429)
    assert "rate limit for service 'gh' on operations mutation:* (1/h" in body["detail"]
    assert server.hits == 6


async def test_requests_that_could_be_read_two_ways_are_checked_or_refused(
    upstream, start_sidecar, client
):
    server, sc = await start(upstream, start_sidecar)
    mutation = {"query": 'mutation { deleteRepo(name: "x") }'}
    # An encoded or doubled path reaches the same endpoint upstream: it is checked the same.
    for path in ("/gh/%67raphql", "/gh//graphql/", "/gh/graphql?x=1"):
        status, headers, body = await post(client, sc, mutation, path=path)
        assert_problem(status, headers, body, "forbidden", 403)
    # Two `query` keys: parsers differ on which one wins, so neither is trusted.
    twice = b'{"query": "{ hello }", "query": "mutation { deleteRepo(name: \\"x\\") }"}'
    status, headers, body = await post(client, sc, None, raw=twice)
    assert_problem(status, headers, body, "bad_request", 400)
    assert "holds the key 'query' twice in one object" in body["detail"]
    params = [("query", "{ hello }"), ("query", 'mutation { deleteRepo(name: "x") }')]
    async with client.get(
        f"{sc.url}/gh/graphql", params=params, headers={"X-Agent-Id": "research-bot"}
    ) as resp:
        assert resp.status == 400
        assert "`query` parameter is given 2 times" in (await resp.json())["detail"]
    # A POST with the operation in the URL too: some servers run the URL's.
    status, headers, body = await post(
        client, sc, {"query": "{ hello }"}, path="/gh/graphql?query=mutation%7BdeleteRepo%7D"
    )
    assert_problem(status, headers, body, "bad_request", 400)
    assert "`query` is in the URL of a POST" in body["detail"]
    # A method other than GET or POST is read all the same.
    async with client.put(
        f"{sc.url}/gh/graphql", json=mutation, headers={"X-Agent-Id": "research-bot"}
    ) as resp:
        assert resp.status == 403
    # Numbers too long for Python to read are refused (a variable) or over the limit.
    status, headers, body = await post(client, sc, None, raw=b'{"n": ' + b"9" * 5000 + b"}")
    assert_problem(status, headers, body, "bad_request", 400)
    assert "a number too long" in body["detail"]
    huge = {"query": "{ repos(first: " + "9" * 5000 + ") { name } }"}
    status, headers, body = await post(client, sc, huge)
    assert_problem(status, headers, body, "graphql_limit", 400)
    assert server.hits == 0


async def test_the_server_span_names_the_graphql_operation(upstream, start_sidecar, client):
    from tests.otlp_receiver import Receiver

    receiver = Receiver()
    collector = await upstream(receiver.app())

    async def answer(request: web.Request) -> web.Response:
        return web.json_response({"data": {}})

    app = web.Application()
    app.router.add_post("/graphql", answer)
    base = await upstream(app)
    policy = (
        f"version: 1\nservices:\n  gh:\n    upstream: {base}\n    graphql: {{path: /graphql}}\n"
    )
    sc = await start_sidecar(policy, env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector})
    query = {"query": "mutation CreateIssue { createIssue { id } }"}
    async with client.post(f"{sc.url}/gh/graphql", json=query) as r:
        assert r.status == 200
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    server = next(s for s in receiver.spans if s.kind == "server")
    assert server.attributes["graphql.operation.type"] == "mutation"
    assert server.attributes["graphql.operation.name"] == "CreateIssue"
