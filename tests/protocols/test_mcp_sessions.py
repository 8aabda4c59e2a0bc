"""MCP sessions (`Mcp-Session-Id`) stick to the upstream that made them.

Real MCP servers from the official SDK on loopback, the real sidecar in front.
A session lives in one server's memory: with fallbacks, a call carrying a
session id goes to the server that issued it and never to another one. The
header goes both ways, and record/replay keeps it: an SDK client replayed
offline gets the recorded session id and carries it in its next calls.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx2
import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared._httpx_utils import create_mcp_http_client

from tests.conftest import RunningSidecar

SESSION = "Mcp-Session-Id"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


class McpServer:
    """A real MCP server (streamable HTTP, sessions on) whose tool says which server it is."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.calls = 0
        server = MCPServer(name)

        @server.tool()
        def whoami() -> str:
            self.calls += 1
            return self.name

        config = uvicorn.Config(
            server.streamable_http_app(), host="127.0.0.1", port=0, log_level="warning"
        )
        self.server = uvicorn.Server(config)
        self.task: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> McpServer:
        self.task = asyncio.create_task(self.server.serve())
        while not self.server.started:
            if self.task.done():
                self.task.result()
            await asyncio.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self.task is not None and not self.task.done():
            self.server.should_exit = True
            await self.task


@pytest.fixture
async def mcp_servers() -> AsyncIterator[Callable[[str], Awaitable[McpServer]]]:
    started: list[McpServer] = []

    async def start(name: str) -> McpServer:
        server = await McpServer(name).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


def policy(primary: str, secondary: str, extra: str = "") -> str:
    return f"""
        version: 1
        services:
          tools:
            upstream: {primary}
            mcp: {{path: /mcp}}
            fallback: [tools-b]
            {extra}
          tools-b:
            upstream: {secondary}
            mcp: {{path: /mcp}}
        """


def _message(body: bytes) -> Any:
    text = body.decode()
    if text.lstrip().startswith("{"):
        return json.loads(text)
    data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
    return json.loads(data[-1]) if data else None


async def rpc(
    http: httpx2.AsyncClient, url: str, message: dict[str, Any], session: str | None = None
) -> tuple[int, httpx2.Headers, Any]:
    headers = dict(ACCEPT)
    if session is not None:
        headers[SESSION] = session
    r = await http.post(url, json=message, headers=headers)
    return r.status_code, r.headers, _message(r.content) if r.content else None


async def open_session(http: httpx2.AsyncClient, url: str) -> tuple[str, httpx2.Headers]:
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "test", "version": "1"},
        },
    }
    status, headers, answer = await rpc(http, url, init)
    assert status == 200, answer
    session = headers[SESSION]
    status, _, _ = await rpc(
        http, url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session
    )
    assert status == 202
    return session, headers


WHOAMI = {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "whoami"}}


def said(answer: Any) -> str:
    return str(answer["result"]["content"][0]["text"])


async def test_a_session_of_the_primary_never_moves_to_the_fallback(
    mcp_servers, start_sidecar
) -> None:
    a, b = await mcp_servers("a"), await mcp_servers("b")
    sc: RunningSidecar = await start_sidecar(policy(a.url, b.url))
    url = f"{sc.url}/tools/mcp"
    async with httpx2.AsyncClient() as http:
        session, headers = await open_session(http, url)
        assert "X-Sidecar-Served-By" not in headers  # a's own session, its id passed back
        status, _, answer = await rpc(http, url, WHOAMI, session)
        assert (status, said(answer)) == (200, "a")

        await a.stop()
        # a is gone, and its session with it: b never saw that id, so the call is not
        # moved there; the agent learns a is unreachable, and opens a new session.
        status, headers, answer = await rpc(http, url, WHOAMI, session)
        assert status == 502
        assert headers["X-Sidecar-Error"] == "upstream_unreachable"
        assert "X-Sidecar-Served-By" not in headers
        assert b.calls == 0

        # A call without a session still falls back: a new session, on b.
        session_b, headers = await open_session(http, url)
        assert headers["X-Sidecar-Served-By"] == "tools-b"
        status, headers, answer = await rpc(http, url, WHOAMI, session_b)
        assert (status, said(answer), headers["X-Sidecar-Served-By"]) == (200, "b", "tools-b")


async def test_a_session_the_fallback_issued_stays_on_the_fallback(
    mcp_servers, start_sidecar, closed_port
) -> None:
    b = await mcp_servers("b")
    sc: RunningSidecar = await start_sidecar(policy(f"http://127.0.0.1:{closed_port}", b.url))
    url = f"{sc.url}/tools/mcp"
    async with httpx2.AsyncClient() as http:
        session, headers = await open_session(http, url)  # a is down: b answers
        assert headers["X-Sidecar-Served-By"] == "tools-b"

        # a comes back (its upstream fixed by a reload that keeps the fallback list).
        a = await mcp_servers("a")
        sc.write("policy.yaml", policy(a.url, b.url))
        assert (await sc.sidecar.reload("test")).ok
        status, headers, answer = await rpc(http, url, WHOAMI, session)
        # b's session goes on on b; a would not know it.
        assert (status, said(answer), headers["X-Sidecar-Served-By"]) == (200, "b", "tools-b")
        assert a.calls == 0

        # A new session is a's again.
        fresh, headers = await open_session(http, url)
        assert "X-Sidecar-Served-By" not in headers
        status, _, answer = await rpc(http, url, WHOAMI, fresh)
        assert said(answer) == "a"

        # The session's end goes to b too, and b's id is forgotten after it.
        r = await http.delete(url, headers={SESSION: session})
        assert (r.status_code, r.headers["X-Sidecar-Served-By"]) == (200, "tools-b")
        status, headers, _ = await rpc(http, url, WHOAMI, session)
        assert status == 404 and "X-Sidecar-Served-By" not in headers  # a: no such session


async def test_the_session_id_is_recorded_and_replayed(mcp_servers, tmp_path) -> None:
    """An SDK client recorded through the sidecar, then replayed with the server stopped."""
    from sidecar.app import serve
    from sidecar.runtime import Sidecar

    server = await mcp_servers("a")
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        f"version: 1\nservices:\n  tools:\n    upstream: {server.url}\n    mcp: {{path: /mcp}}\n"
        "    cassettes: {pacing: fast}\n"
    )

    async def session_run(mode: str) -> tuple[str, list[str | None], str]:
        sidecar = Sidecar(str(policies), mode=mode)
        assert (await sidecar.reload("startup")).ok
        listeners = await serve(sidecar, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))
        seen: list[str] = []
        sent: list[str | None] = []

        async def on_request(request: httpx2.Request) -> None:
            if request.method == "POST":
                sent.append(request.headers.get(SESSION))

        async def on_response(response: httpx2.Response) -> None:
            if SESSION in response.headers:
                seen.append(response.headers[SESSION])

        http = create_mcp_http_client()
        http.event_hooks = {"request": [on_request], "response": [on_response]}
        url = f"http://127.0.0.1:{listeners[0].addresses[0][1]}/tools/mcp"
        try:
            transport = streamable_http_client(url, http_client=http)
            # The handshake-era protocol (initialize): the one with sessions.
            async with http, Client(transport, mode="legacy") as client:
                result = await client.call_tool("whoami", {})
        finally:
            for listener in listeners:
                await listener.cleanup()
            await sidecar.close()
        return seen[0], sent, str(result.content[0].text)

    recorded_id, recorded_sent, live = await session_run("record")
    assert live == "a"
    # The server's id came back to the client, which sent it with every later POST.
    assert recorded_sent[0] is None and set(recorded_sent[1:]) == {recorded_id}
    tapes = list((policies / "cassettes" / "tools").glob("*.json"))
    assert any(recorded_id in f.read_text() for f in tapes)

    await server.stop()
    replayed_id, replayed_sent, replayed = await session_run("replay")
    assert (replayed_id, replayed) == (recorded_id, "a")
    assert replayed_sent == recorded_sent
