"""An agent on the official MCP SDK 1.x, run by tests/protocols/test_mcp_transports.py in
its own virtualenv (the project's has 2.x): `python mcp1_client.py TRANSPORT URL AGENT`.

TRANSPORT is `streamable` (streamable HTTP) or `sse` (the older HTTP+SSE
transport). It lists the tools, calls an allowed one, a forbidden one, and the
allowed one again on the same session, and prints what it saw as one JSON line.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from mcp import ClientSession
from mcp.client.sse import sse_client
from mcp.client.streamable_http import streamablehttp_client
from mcp.shared.exceptions import McpError


async def session_calls(session: ClientSession) -> dict[str, Any]:
    await session.initialize()
    seen: dict[str, Any] = {}
    listed = await session.list_tools()
    seen["tools"] = [tool.name for tool in listed.tools]
    first = await session.call_tool("search_web", {"q": "otters"})
    seen["first"] = first.content[0].text  # type: ignore[union-attr]
    try:
        await session.call_tool("delete_files", {"path": "/"})
        seen["refused"] = None
    except McpError as err:
        seen["refused"] = {"code": err.error.code, "message": err.error.message}
    again = await session.call_tool("search_web", {"q": "again"})
    seen["again"] = again.content[0].text  # type: ignore[union-attr]
    return seen


async def main(transport: str, url: str, agent: str) -> dict[str, Any]:
    headers = {"X-Agent-Id": agent}
    if transport == "sse":
        async with (
            sse_client(url, headers=headers) as (read, write),
            ClientSession(read, write) as session,
        ):
            return await session_calls(session)
    async with (
        streamablehttp_client(url, headers=headers) as (read, write, _),
        ClientSession(read, write) as session,
    ):
        return await session_calls(session)


if __name__ == "__main__":
    try:
        outcome = asyncio.run(asyncio.wait_for(main(*sys.argv[1:4]), 20))
    except BaseException as exc:  # what the agent would have seen instead
        outcome = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(outcome), flush=True)
