"""MCP tool rules on every transport and framing, through the real `sidecar run` process,
with the official SDK on both ends (2.x here, 1.x from its own virtualenv).

A refused call is answered as MCP servers answer a failed one (HTTP 200, a
JSON-RPC error for its id), so each SDK shows the sentence and the session
goes on: over streamable HTTP with JSON answers and with SSE answers, and over
the older HTTP+SSE transport, whose answers travel on the GET stream.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvicorn
from aiohttp import web
from mcp import Client
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError
from starlette.types import ASGIApp

from tests.helpers import ROOT, SidecarProcess, sidecar_process

pytestmark = pytest.mark.process

MCP1_PYTHON = Path(os.environ.get("MCP1_PYTHON", "/tmp/mcp1/bin/python"))
MCP1_CLIENT = ROOT / "tests" / "protocols" / "mcp1_client.py"

REFUSAL = (
    "Agent 'research-bot' may not call the tool 'delete_files' of MCP service '{service}': "
    "the policy's mcp tool rules do not allow it."
)


def _tools(ran: list[str]) -> MCPServer:
    server = MCPServer("tools")

    @server.tool()
    def search_web(q: str) -> str:
        ran.append(f"search_web {q}")
        return f"found {q}"

    @server.tool()
    def delete_files(path: str) -> str:
        ran.append(f"delete_files {path}")
        return f"deleted {path}"

    return server


async def _serve(app: ASGIApp, servers: list[tuple[uvicorn.Server, asyncio.Task[None]]]) -> str:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve())
    servers.append((running, task))
    while not running.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    return f"http://127.0.0.1:{running.servers[0].sockets[0].getsockname()[1]}"


@pytest.fixture
async def sidecar(tmp_path: Path) -> AsyncIterator[tuple[SidecarProcess, list[str]]]:
    """Three MCP servers (streamable HTTP answering JSON, streamable HTTP answering SSE,
    the older HTTP+SSE transport) behind one sidecar process; yields it and the tool
    calls the servers ran."""
    ran: list[str] = []
    servers: list[tuple[uvicorn.Server, asyncio.Task[None]]] = []
    json_base = await _serve(_tools(ran).streamable_http_app(json_response=True), servers)
    sse_base = await _serve(_tools(ran).streamable_http_app(), servers)
    legacy_base = await _serve(_tools(ran).sse_app(), servers)
    (tmp_path / "p.yaml").write_text(
        f"""version: 1
services:
  json:
    upstream: {json_base}
    mcp: {{path: /mcp, tools: [search_*]}}
  sse:
    upstream: {sse_base}
    mcp: {{path: /mcp, tools: [search_*]}}
  legacy:
    upstream: {legacy_base}
    # The SSE stream's path: the messages endpoint it announces is read all the same.
    mcp: {{path: /sse, tools: [search_*]}}
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    try:
        async with sidecar_process(tmp_path, env=env) as proc:
            yield proc, ran
    finally:
        for running, _ in servers:
            running.should_exit = True
        await asyncio.gather(*(task for _, task in servers))


async def _calls(client: Client) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    seen["tools"] = [tool.name for tool in (await client.list_tools()).tools]
    seen["first"] = (await client.call_tool("search_web", {"q": "otters"})).content[0].text
    with pytest.raises(MCPError) as refused:
        await client.call_tool("delete_files", {"path": "/"})
    seen["refused"] = {"code": refused.value.error.code, "message": refused.value.error.message}
    seen["again"] = (await client.call_tool("search_web", {"q": "again"})).content[0].text
    return seen


def _expected(service: str) -> dict[str, Any]:
    return {
        "tools": ["search_web"],  # the listing shows only what the agent may call
        "first": "found otters",
        "refused": {"code": -32001, "message": REFUSAL.format(service=service)},
        "again": "found again",  # the session survived the refusal
    }


@pytest.mark.parametrize("service", ["json", "sse"])
async def test_streamable_http_with_the_2x_sdk(sidecar, service):
    proc, ran = sidecar
    http = create_mcp_http_client(headers={"X-Agent-Id": "research-bot"})
    transport = streamable_http_client(f"{proc.url}/{service}/mcp", http_client=http)
    async with asyncio.timeout(20), http, Client(transport) as client:
        assert await _calls(client) == _expected(service)
    assert ran == ["search_web otters", "search_web again"]


async def test_the_older_sse_transport_with_the_2x_sdk(sidecar):
    proc, ran = sidecar
    transport = sse_client(f"{proc.url}/legacy/sse", headers={"X-Agent-Id": "research-bot"})
    async with asyncio.timeout(20), Client(transport) as client:
        assert await _calls(client) == _expected("legacy")
    assert ran == ["search_web otters", "search_web again"]


@pytest.mark.skipif(
    not MCP1_PYTHON.exists(),
    reason=f"no MCP SDK 1.x virtualenv at {MCP1_PYTHON} (`make mcp1-venv` makes it)",
)
@pytest.mark.parametrize(
    ("transport", "service", "path"),
    [("streamable", "json", "/mcp"), ("streamable", "sse", "/mcp"), ("sse", "legacy", "/sse")],
)
async def test_the_1x_sdk_sees_the_refusal_and_keeps_its_session(sidecar, transport, service, path):
    proc, ran = sidecar
    child = await asyncio.create_subprocess_exec(
        str(MCP1_PYTHON),
        str(MCP1_CLIENT),
        transport,
        f"{proc.url}/{service}{path}",
        "research-bot",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(child.communicate(), 40)
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    lines = out.decode().strip().splitlines()
    assert lines, err.decode()[-2000:]
    assert json.loads(lines[-1]) == _expected(service), err.decode()[-2000:]
    assert ran == ["search_web otters", "search_web again"]


async def _post(
    client: aiohttp.ClientSession, url: str, body: Any, *, method: str = "POST"
) -> tuple[int, dict[str, str], Any]:
    headers = {
        "X-Agent-Id": "research-bot",
        "Accept": "application/json, text/event-stream",
        "Content-Type": "application/json",
        "MCP-Protocol-Version": "2025-06-18",
    }
    async with client.request(method, url, data=json.dumps(body), headers=headers) as r:
        return r.status, dict(r.headers), await r.read()


def _call(name: str, message_id: int) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": message_id,
        "method": "tools/call",
        "params": {"name": name, "arguments": {"q": "x", "path": "/"}},
    }


async def test_batches_and_bodies_on_other_methods_are_judged_too(sidecar):
    proc, ran = sidecar
    async with aiohttp.ClientSession() as client:
        # A batch (2025-03-26) with one forbidden call: an error answer for each request.
        batch = [_call("search_web", 1), _call("delete_files", 2)]
        status, headers, body = await _post(client, f"{proc.url}/json/mcp", batch)
        assert status == 200
        assert headers["X-Sidecar-Error"] == "forbidden"
        answers = json.loads(body)
        assert [(a["id"], a["error"]["code"]) for a in answers] == [(1, -32001), (2, -32001)]
        # A client that takes only SSE gets the error as one SSE event.
        async with client.post(
            f"{proc.url}/sse/mcp",
            json=_call("delete_files", 3),
            headers={"X-Agent-Id": "research-bot", "Accept": "text/event-stream"},
        ) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "text/event-stream", (r.headers, await r.read())
            assert r.headers["X-Sidecar-Error"] == "forbidden"
            event = (await r.read()).decode()
        assert event.startswith("event: message\r\ndata: ")
        assert json.loads(event.split("data: ", 1)[1])["id"] == 3
        # A JSON-RPC request in the body of a GET or DELETE is read like a POST's.
        for method in ("GET", "DELETE"):
            status, headers, body = await _post(
                client, f"{proc.url}/json/mcp", _call("delete_files", 4), method=method
            )
            assert headers.get("X-Sidecar-Error") == "forbidden", (method, status, body)
    assert ran == []


async def test_a_json_rpc_websocket_is_judged_message_by_message(upstream, tmp_path):
    """No MCP transport, but the SDK 1.x has one (subprotocol `mcp`): a tool the agent
    may not call is answered with its JSON-RPC error, and the socket goes on."""
    ran: list[str] = []

    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=["mcp"])
        await ws.prepare(request)
        async for message in ws:
            call = json.loads(message.data)
            ran.append(call["params"]["name"])
            await ws.send_json({"jsonrpc": "2.0", "id": call["id"], "result": {"content": []}})
        return ws

    app = web.Application()
    app.router.add_get("/ws", socket)
    base = await upstream(app)
    (tmp_path / "p.yaml").write_text(
        f"version: 1\nservices:\n  ws:\n    upstream: {base}\n"
        "    mcp: {path: /mcp, tools: [search_*]}\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    async with (
        sidecar_process(tmp_path, env=env) as proc,
        aiohttp.ClientSession() as client,
        client.ws_connect(
            f"{proc.url}/ws/ws", protocols=["mcp"], headers={"X-Agent-Id": "research-bot"}
        ) as ws,
    ):
        await ws.send_str(json.dumps(_call("delete_files", 1)))
        refused = await ws.receive_json(timeout=10)
        assert refused["id"] == 1
        assert refused["error"]["code"] == -32001
        assert refused["error"]["message"] == REFUSAL.format(service="ws")
        assert refused["error"]["data"]["reason"] == "forbidden"
        await ws.send_str(json.dumps(_call("search_web", 2)))
        assert (await ws.receive_json(timeout=10)) == {
            "jsonrpc": "2.0",
            "id": 2,
            "result": {"content": []},
        }
    assert ran == ["search_web"]
