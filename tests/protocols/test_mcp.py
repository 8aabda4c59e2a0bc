"""MCP-aware services through the real sidecar, against a real JSON-RPC server over HTTP.

The upstream speaks MCP's streamable HTTP shape: JSON-RPC in POST bodies,
answers as JSON or as an SSE stream, a session id in `Mcp-Session-Id`.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from tests.conftest import RunningSidecar

TOOLS = ["search_web", "search_docs", "delete_files", "slow_report"]


class MCPServer:
    def __init__(self) -> None:
        self.hits = 0
        self.calls: list[str] = []
        self.release = asyncio.Event()

    def answer(self, message: dict[str, Any]) -> dict[str, Any] | None:
        if "id" not in message:
            return None  # a notification
        method = message["method"]
        if method == "initialize":
            result: dict[str, Any] = {"protocolVersion": "2025-03-26", "capabilities": {}}
        elif method == "tools/list":
            result = {"tools": [{"name": name} for name in TOOLS]}
        elif method == "tools/call":
            name = message["params"]["name"]
            self.calls.append(name)
            result = {"content": [{"type": "text", "text": f"ran {name}"}]}
        else:
            return {"jsonrpc": "2.0", "id": message["id"], "error": {"code": -32601}}
        return {"jsonrpc": "2.0", "id": message["id"], "result": result}

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            if request.method == "GET":
                return web.Response(status=405)
            if request.method == "DELETE":
                return web.Response(status=204)
            document = await request.json()
            messages = document if isinstance(document, list) else [document]
            session = {"Mcp-Session-Id": request.headers.get("Mcp-Session-Id", "session-1")}
            first = messages[0]
            if first.get("method") == "tools/call" and first["params"]["name"] == "slow_report":
                # An SSE answer: a progress event, then (once the test saw it) the result.
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", **session}
                )
                await response.prepare(request)
                progress = {"jsonrpc": "2.0", "method": "notifications/progress"}
                await response.write(f"event: message\ndata: {json.dumps(progress)}\n\n".encode())
                await self.release.wait()
                final = self.answer(first)
                await response.write(f"event: message\ndata: {json.dumps(final)}\n\n".encode())
                await response.write_eof()
                return response
            if first.get("method") == "tools/list" and "X-Test-Sse" in request.headers:
                event = f"event: message\ndata: {json.dumps(self.answer(first))}\n\n"
                return web.Response(
                    body=event.encode(), headers={"Content-Type": "text/event-stream", **session}
                )
            answers = [a for a in (self.answer(m) for m in messages) if a is not None]
            if not answers:
                return web.Response(status=202, headers=session)
            payload = answers if isinstance(document, list) else answers[0]
            return web.json_response(payload, headers=session)

        app = web.Application()
        app.router.add_route("*", "/mcp", handle)
        return app


MCP_RULES = """
                path: /mcp
                tools: [search_*, slow_report]
                per_agent:
                  janitor: ["*"]
                  reader: [search_docs]
"""


async def start(upstream, start_sidecar, mcp: str = MCP_RULES) -> tuple[MCPServer, RunningSidecar]:
    server = MCPServer()
    base = await upstream(server.app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          tools:
            upstream: {base}
            auth: {{type: bearer, token: canary-mcp-secret}}
            mcp:
        {mcp}
        """
    )
    return server, sc


def call_tool(name: str, message_id: int = 1) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": message_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": {}},
    }


async def post(
    client: aiohttp.ClientSession,
    sc: RunningSidecar,
    body: Any,
    agent: str | None = None,
    *,
    raw: bytes | None = None,
) -> tuple[int, dict[str, str], Any]:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    if agent:
        headers["X-Agent-Id"] = agent
    data = raw if raw is not None else json.dumps(body).encode()
    async with client.post(f"{sc.url}/tools/mcp", data=data, headers=headers) as resp:
        return resp.status, dict(resp.headers), json.loads(await resp.read())


def assert_answered(headers: dict[str, str], body: Any, reason: str) -> dict[str, Any]:
    """A refused JSON-RPC call, answered as an MCP server answers a failed call: HTTP 200
    with the JSON-RPC error for its id; the problem document is the error's `data`."""
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Sidecar-Error"] == reason
    assert body["jsonrpc"] == "2.0"
    problem: dict[str, Any] = body["error"]["data"]
    assert problem["reason"] == reason
    assert problem["service"] == "tools"
    assert body["error"]["message"].endswith(problem["detail"])
    assert "canary-mcp-secret" not in json.dumps(body)
    return problem


def assert_refused(status: int, headers: dict[str, str], body: Any, reason: str, code: int) -> None:
    assert status == code, body
    # The client accepts JSON and SSE, not problem+json: the same document, as JSON.
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Sidecar-Error"] == reason
    assert body["reason"] == reason
    assert body["service"] == "tools"
    assert body["jsonrpc"] == "2.0"
    assert "canary-mcp-secret" not in json.dumps(body)


async def test_tools_are_allowed_per_agent_by_glob(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    status, _, body = await post(client, sc, call_tool("search_web", 7), "anyone")
    assert status == 200
    assert body == {
        "jsonrpc": "2.0",
        "id": 7,
        "result": {"content": [{"type": "text", "text": "ran search_web"}]},
    }

    status, headers, body = await post(client, sc, call_tool("delete_files", 8), "anyone")
    assert status == 200
    problem = assert_answered(headers, body, "forbidden")
    detail = (
        "Agent 'anyone' may not call the tool 'delete_files' of MCP service 'tools': "
        "the policy's mcp tool rules do not allow it."
    )
    assert problem["detail"] == detail
    # The JSON-RPC error answer to the refused request.
    assert body["id"] == 8
    assert body["error"]["code"] == -32001

    status, _, _ = await post(client, sc, call_tool("delete_files"), "janitor")
    assert status == 200
    # per_agent replaces `tools` for that agent: the reader has search_docs only.
    assert (await post(client, sc, call_tool("search_docs"), "reader"))[0] == 200
    _, headers, body = await post(client, sc, call_tool("search_web"), "reader")
    assert headers["X-Sidecar-Error"] == "forbidden"
    # Without an agent id the service's `tools` apply.
    status, headers, body = await post(client, sc, call_tool("delete_files"))
    assert status == 200
    problem = assert_answered(headers, body, "forbidden")
    assert problem["detail"].startswith("A caller without an agent id may not call")
    assert server.calls == ["search_web", "delete_files", "search_docs"]


async def test_other_methods_pass_and_the_session_id_goes_both_ways(
    upstream, start_sidecar, client
):
    server, sc = await start(upstream, start_sidecar)
    initialize = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {}}
    status, headers, body = await post(client, sc, initialize, "reader")
    assert status == 200
    assert headers["Mcp-Session-Id"] == "session-1"
    assert body["result"]["protocolVersion"] == "2025-03-26"
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    status, _, body = await post(client, sc, listing, "reader")
    # A tools/list answer shows the reader only the tools it may call.
    assert [t["name"] for t in body["result"]["tools"]] == ["search_docs"]
    async with client.post(
        f"{sc.url}/tools/mcp",
        json={"jsonrpc": "2.0", "method": "notifications/initialized"},
        headers={"Mcp-Session-Id": "session-9"},
    ) as resp:
        assert resp.status == 202
        assert resp.headers["Mcp-Session-Id"] == "session-9"
    async with client.get(f"{sc.url}/tools/mcp") as resp:
        assert resp.status == 405  # the server's own answer to its event-stream GET
    async with client.delete(f"{sc.url}/tools/mcp") as resp:
        assert resp.status == 204
    assert server.hits == 5


async def test_batches_are_refused_whole_when_one_tool_is_forbidden(
    upstream, start_sidecar, client
):
    server, sc = await start(upstream, start_sidecar)
    batch = [call_tool("search_web", 1), call_tool("search_docs", 2)]
    status, _, body = await post(client, sc, batch, "anyone")
    assert status == 200
    assert [answer["id"] for answer in body] == [1, 2]

    notification = {"jsonrpc": "2.0", "method": "notifications/progress", "params": {}}
    refused = [*batch, notification, call_tool("delete_files", 3)]
    status, headers, body = await post(client, sc, refused, "anyone")
    assert status == 200
    # An error answer for each request of the batch, none for the notification.
    assert [answer["id"] for answer in body] == [1, 2, 3]
    for answer in body:
        assert_answered(headers, answer, "forbidden")
    assert "delete_files" in body[2]["error"]["message"]
    assert body[0]["error"]["message"].startswith("Not sent: another request of the batch")
    assert server.calls == ["search_web", "search_docs"]


async def test_an_sse_answer_streams_event_by_event(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    headers = {"X-Agent-Id": "anyone", "Accept": "application/json, text/event-stream"}
    async with client.post(
        f"{sc.url}/tools/mcp", json=call_tool("slow_report", 5), headers=headers
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/event-stream"
        # The first event arrives while the server still holds back the second.
        first = await resp.content.readuntil(b"\n\n")
        assert b"notifications/progress" in first
        server.release.set()
        rest = await resp.content.read()
    assert b'"text": "ran slow_report"' in rest
    assert b'"id": 5' in rest


async def test_malformed_bodies_get_a_json_rpc_friendly_400(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    cases: list[tuple[bytes, int, Any, str]] = [
        (b'{"jsonrpc": "2.0", "id": 1, "method": ', -32700, None, "is not valid JSON"),
        (b"\xff\xfe\x00", -32700, None, "is not"),
        (b"[]", -32600, None, "the JSON-RPC batch is empty"),
        (b"[1]", -32600, None, "must be a JSON object"),
        (b'{"jsonrpc": "2.0", "id": 4}', -32600, 4, "has no `method`"),
        (b'{"jsonrpc": "2.0", "id": 5, "method": 5}', -32600, 5, "`method` must be a string"),
        (
            b'{"jsonrpc": "2.0", "id": 6, "method": "tools/call", "params": {"name": ["x"]}}',
            -32602,
            6,
            "tools/call needs `params.name`",
        ),
        (b'{"jsonrpc": "2.0", "id": 7, "method": "tools/call"}', -32602, 7, "params.name"),
    ]
    for raw, code, message_id, expected in cases:
        status, headers, body = await post(client, sc, None, "janitor", raw=raw)
        if message_id is None:
            # Nothing to answer: the request as a whole is refused.
            assert_refused(status, headers, body, "bad_request", 400)
            detail = body["detail"]
        else:
            # A request with an id gets its JSON-RPC error answer.
            assert status == 200
            detail = assert_answered(headers, body, "bad_request")["detail"]
        assert expected in detail, (raw, detail)
        assert body["error"]["code"] == code
        assert body["id"] == message_id
    assert server.hits == 0


async def test_mcp_true_reads_every_post_and_allows_every_tool(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar, "                true")
    status, _, _ = await post(client, sc, call_tool("delete_files"), "anyone")
    assert status == 200
    status, headers, body = await post(client, sc, None, "anyone", raw=b"{oops")
    assert_refused(status, headers, body, "bad_request", 400)
    assert server.calls == ["delete_files"]


async def test_rate_limits_per_tool(upstream, start_sidecar, client):
    server = MCPServer()
    base = await upstream(server.app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          tools:
            upstream: {base}
            mcp: true
            rate_limit:
              - {{rate: 1/h, burst: 1, by_operation: true, operations: ["tools/call:*"]}}
        """
    )
    assert (await post(client, sc, call_tool("search_web")))[0] == 200
    status, headers, _ = await post(client, sc, call_tool("search_web"))
    assert status == 429
    assert headers["X-Sidecar-Error"] == "rate_limited"
    # Each tool has its own bucket; other methods are not counted.
    assert (await post(client, sc, call_tool("search_docs")))[0] == 200
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    assert [(await post(client, sc, listing))[0] for _ in range(3)] == [200] * 3
    assert server.calls == ["search_web", "search_docs"]


async def test_a_tool_name_given_twice_or_an_encoded_path_do_not_dodge_the_rules(
    upstream, start_sidecar, client
):
    server, sc = await start(upstream, start_sidecar)
    twice = (
        b'{"jsonrpc": "2.0", "id": 1, "method": "tools/call", '
        b'"params": {"name": "search_web", "name": "delete_files"}}'
    )
    status, headers, body = await post(client, sc, None, "anyone", raw=twice)
    assert_refused(status, headers, body, "bad_request", 400)
    assert "holds the key 'name' twice" in body["detail"]
    headers = {"X-Agent-Id": "anyone"}
    async with client.post(
        URL(f"{sc.url}/tools/%6Dcp", encoded=True), json=call_tool("delete_files"), headers=headers
    ) as resp:
        assert resp.status == 403
    assert server.hits == 0


async def test_a_client_that_accepts_problem_json_gets_it(upstream, start_sidecar, client):
    server, sc = await start(upstream, start_sidecar)
    for accept in ("application/problem+json, application/json", None):
        headers = {"X-Agent-Id": "anyone", **({"Accept": accept} if accept else {})}
        async with client.post(
            f"{sc.url}/tools/mcp", json=call_tool("delete_files"), headers=headers
        ) as resp:
            assert resp.status == 403
            assert resp.headers["Content-Type"] == "application/problem+json"
            assert (await resp.json(content_type=None))["error"]["code"] == -32001
    assert server.hits == 0


async def test_tools_list_shows_only_the_tools_the_agent_may_call(upstream, start_sidecar, client):
    _, sc = await start(upstream, start_sidecar)
    listing = {"jsonrpc": "2.0", "id": 3, "method": "tools/list"}
    status, headers, body = await post(client, sc, listing, "reader")
    assert status == 200
    assert body == {"jsonrpc": "2.0", "id": 3, "result": {"tools": [{"name": "search_docs"}]}}
    assert int(headers["Content-Length"]) == len(json.dumps(body, separators=(",", ":")))
    status, _, body = await post(client, sc, listing, "janitor")
    assert [t["name"] for t in body["result"]["tools"]] == list(TOOLS)
    status, _, body = await post(client, sc, listing)
    names = [t["name"] for t in body["result"]["tools"]]
    assert names and all(n.startswith("search_") or n == "slow_report" for n in names)


async def test_an_sse_tools_list_is_filtered_too(upstream, start_sidecar, client):
    _, sc = await start(upstream, start_sidecar)
    listing = {"jsonrpc": "2.0", "id": 4, "method": "tools/list"}
    headers = {"X-Agent-Id": "reader", "X-Test-Sse": "1", "Accept": "text/event-stream"}
    async with client.post(f"{sc.url}/tools/mcp", json=listing, headers=headers) as resp:
        text = (await resp.read()).decode()
    assert text.startswith("event: message\n")
    data = json.loads(text.split("data: ", 1)[1])
    assert data["result"]["tools"] == [{"name": "search_docs"}]
