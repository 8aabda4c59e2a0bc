"""The official MCP SDK on both ends: its server behind the sidecar, its client in front.

What an agent built on the SDK sees: an allowed tool works, a forbidden one
comes back as the tool call's error with the sidecar's sentence in it, and
the session (initialize, Mcp-Session-Id, the closing DELETE) goes through.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import uvicorn
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.server.mcpserver import MCPServer
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.shared.exceptions import MCPError


@pytest.fixture
async def mcp_server() -> AsyncIterator[tuple[str, list[str]]]:
    """A real MCP server on loopback; yields its base URL and the tool calls it ran."""
    ran: list[str] = []
    server = MCPServer("tools")

    @server.tool()
    def search_web(q: str) -> str:
        ran.append(f"search_web {q}")
        return f"found {q}"

    @server.tool()
    def delete_files(path: str) -> str:
        ran.append(f"delete_files {path}")
        return f"deleted {path}"

    config = uvicorn.Config(
        server.streamable_http_app(), host="127.0.0.1", port=0, log_level="warning"
    )
    running = uvicorn.Server(config)
    task = asyncio.create_task(running.serve())
    while not running.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = running.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}", ran
    running.should_exit = True
    await task


async def test_sdk_client_through_the_sidecar(mcp_server, start_sidecar):
    base, ran = mcp_server
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          tools:
            upstream: {base}
            mcp:
              path: /mcp
              tools: [search_*]
        """
    )
    http = create_mcp_http_client(headers={"X-Agent-Id": "research-bot"})
    transport = streamable_http_client(f"{sc.url}/tools/mcp", http_client=http)
    async with http, Client(transport) as client:
        listed = await client.list_tools()
        # The listing shows only what the agent may call; delete_files is still refused.
        assert [tool.name for tool in listed.tools] == ["search_web"]
        result = await client.call_tool("search_web", {"q": "otters"})
        assert not result.is_error
        assert result.content[0].text == "found otters"
        with pytest.raises(MCPError) as refused:
            await client.call_tool("delete_files", {"path": "/"})
    assert refused.value.error.code == -32001
    assert refused.value.error.message == (
        "Agent 'research-bot' may not call the tool 'delete_files' of MCP service 'tools': "
        "the policy's mcp tool rules do not allow it."
    )
    assert ran == ["search_web otters"]
