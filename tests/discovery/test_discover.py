"""`sidecar discover URL` against real servers: a FastAPI app, a strawberry GraphQL server,
an MCP server (the official SDK's), and an aiohttp app that describes nothing.

Each drafted policy must pass `sidecar validate` and proxy a call as it is; the
probes stay on the host, within their budget, and send only the credentials given.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import strawberry
import uvicorn
from aiohttp import web
from fastapi import Depends, FastAPI
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from mcp.server.mcpserver import MCPServer
from pydantic import BaseModel
from strawberry.aiohttp.views import GraphQLView

from tests.helpers import ROOT

pytestmark = pytest.mark.process

PROBE_TOKEN = "probe-canary-5e6f"


@dataclass
class Done:
    returncode: int
    stdout: str
    stderr: str


async def sidecar_cli(*args: str, env: dict[str, str] | None = None) -> Done:
    """The real command, run while this test's servers keep answering."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Done(proc.returncode, out.decode(), err.decode())


async def discover(*args: str, env: dict[str, str] | None = None) -> Done:
    return await sidecar_cli("discover", *args, env=env)


async def validate(directory: Path) -> None:
    done = await sidecar_cli("validate", str(directory))
    assert done.returncode == 0, done.stderr


async def serve_asgi(app: object) -> AsyncIterator[str]:
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")  # type: ignore[arg-type]
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


class Item(BaseModel):
    name: str
    price: float


@pytest.fixture
async def fastapi_app() -> AsyncIterator[str]:
    app = FastAPI(title="Inventory")
    bearer = HTTPBearer()

    @app.get("/items/{item_id}", operation_id="getItem")
    def get_item(item_id: int, auth: HTTPAuthorizationCredentials = Depends(bearer)) -> Item:  # noqa: B008
        return Item(name=f"item {item_id}", price=1.5)

    @app.post("/items", operation_id="createItem")
    def create_item(item: Item, auth: HTTPAuthorizationCredentials = Depends(bearer)) -> Item:  # noqa: B008
        return item

    async for url in serve_asgi(app):
        yield url


async def test_fastapi_openapi_document(fastapi_app, tmp_path, start_sidecar, client):
    out = tmp_path / "policies" / "inventory.yaml"
    done = await discover(fastapi_app, "--name", "inventory", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "GET /openapi.json (OpenAPI?): 200 application/json" in done.stderr
    assert "found: OpenAPI document at /openapi.json" in done.stderr
    text = out.read_text()
    assert "inventory.openapi.json" in text and (out.parent / "inventory.openapi.json").exists()
    assert "${env:" in text  # the bearer scheme, as a placeholder, never a value
    await validate(out.parent)
    sc = await start_sidecar(
        {p.name: p.read_text() for p in out.parent.iterdir()}, env={"INVENTORY_TOKEN": "t0ken"}
    )
    async with client.get(f"{sc.url}/inventory/items/3") as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["name"] == "item 3"


@strawberry.type
class Query:
    @strawberry.field
    def hello(self, name: str = "world") -> str:
        return f"hello {name}"

    @strawberry.field
    def stock(self, sku: str) -> int:
        return 3


@strawberry.type
class Mutation:
    @strawberry.mutation
    def restock(self, sku: str, count: int) -> int:
        return count


async def test_graphql_server(upstream, tmp_path, start_sidecar, client):
    app = web.Application()
    schema = strawberry.Schema(query=Query, mutation=Mutation)
    app.router.add_route("*", "/graphql", GraphQLView(schema=schema))
    base = await upstream(app)
    out = tmp_path / "policies" / "shop.yaml"
    done = await discover(base, "--name", "shop", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "found: GraphQL at /graphql" in done.stderr
    text = out.read_text()
    assert "graphql:" in text and "path: /graphql" in text
    assert "query: hello, stock" in text and "mutation: restock" in text
    await validate(out.parent)
    sc = await start_sidecar(out.read_text())
    async with client.post(f"{sc.url}/shop/graphql", json={"query": "{ hello }"}) as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"data": {"hello": "hello world"}}


@pytest.fixture
async def mcp_app() -> AsyncIterator[str]:
    server = MCPServer("files")

    @server.tool(description="Search the documents by words")
    def search_docs(q: str) -> str:
        return f"found {q}"

    @server.tool(description="Delete a document for good")
    def delete_doc(path: str) -> str:
        return f"deleted {path}"

    async for url in serve_asgi(server.streamable_http_app()):
        yield url


async def test_mcp_server(mcp_app, tmp_path, start_sidecar, client):
    out = tmp_path / "policies" / "docs.yaml"
    done = await discover(mcp_app, "--name", "docs", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "found: MCP server 'files' at /mcp with 2 tools" in done.stderr
    text = out.read_text()
    assert "mcp:\n      path: /mcp" in text
    assert '- "search_docs"   # Search the documents by words' in text
    assert '- "delete_doc"   # Delete a document for good' in text
    await validate(out.parent)
    sc = await start_sidecar(out.read_text())
    init = {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "t", "version": "1"},
        },
    }
    headers = {"Accept": "application/json, text/event-stream"}
    async with client.post(f"{sc.url}/docs/mcp", json=init, headers=headers) as resp:
        assert resp.status == 200
        assert '"serverInfo"' in await resp.text()


async def test_nothing_described(upstream, tmp_path, start_sidecar, client):
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path} {request.headers.get('Authorization')}")
        if request.headers.get("Authorization") != f"Bearer {PROBE_TOKEN}":
            return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="x"'})
        if request.path == "/hello":
            return web.json_response({"hello": "world"})
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    base = await upstream(app)

    # Without a credential: the auth scheme is inferred, as a comment.
    out = tmp_path / "bare" / "plain.yaml"
    done = await discover(base, "--name", "plain", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "found: no description" in done.stderr
    text = out.read_text()
    assert '# auth: {type: bearer, token: "${env:PLAIN_TOKEN}"}' in text
    await validate(out.parent)
    assert all(line.endswith(" None") for line in seen)  # no credential was invented

    # With one from --header as ${env:}: sent to the API, written as the reference only.
    seen.clear()
    out = tmp_path / "policies" / "plain.yaml"
    done = await discover(
        base,
        "--name",
        "plain",
        "--out",
        str(out),
        "--header",
        "Authorization: Bearer ${env:PROBE_TOKEN}",
        env={"PROBE_TOKEN": PROBE_TOKEN},
    )
    assert done.returncode == 0, done.stderr
    assert seen and all(line.endswith(PROBE_TOKEN) for line in seen)
    text = out.read_text()
    assert 'auth: {type: bearer, token: "${env:PROBE_TOKEN}"}' in text
    assert PROBE_TOKEN not in text and PROBE_TOKEN not in done.stderr + done.stdout
    await validate(out.parent)
    sc = await start_sidecar(text, env={"PROBE_TOKEN": PROBE_TOKEN})
    async with client.get(f"{sc.url}/plain/hello") as resp:
        assert resp.status == 200
        assert await resp.json() == {"hello": "world"}


async def test_stays_on_the_host_and_within_budget(upstream, tmp_path):
    elsewhere: list[str] = []

    async def other(request: web.Request) -> web.Response:
        elsewhere.append(request.path)
        return web.json_response(
            {"openapi": "3.1.0", "info": {"title": "x", "version": "1"}, "paths": {}}
        )

    other_app = web.Application()
    other_app.router.add_route("*", "/{tail:.*}", other)
    other_base = await upstream(other_app)
    # The same port on another loopback address is another host.
    other_host = other_base.replace("127.0.0.1", "localhost")

    async def moved(request: web.Request) -> web.Response:
        raise web.HTTPFound(f"{other_host}/openapi.json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", moved)
    base = await upstream(app)
    done = await discover(base, "--max-requests", "5")
    assert done.returncode == 0, done.stderr
    assert "redirect off the host, not followed" in done.stderr
    assert "stopped: out of budget (5 requests)" in done.stderr
    assert elsewhere == []


async def test_known_provider_gets_its_template():
    done = await discover("https://api.openai.com/v1")
    assert done.returncode == 0, done.stderr
    assert "known provider: template openai" in done.stderr
    assert "openai: {template: openai}" in done.stdout


async def test_header_with_a_missing_variable_is_refused():
    done = await discover(
        "http://127.0.0.1:9", "--header", "Authorization: Bearer ${env:NOT_SET_ANYWHERE}"
    )
    assert done.returncode == 2
    assert "NOT_SET_ANYWHERE is not set" in done.stderr


@pytest.mark.parametrize(
    "url",
    [
        f"http://bob:{PROBE_TOKEN}@127.0.0.1:9/api",
        f"http://127.0.0.1:9/api?api_key={PROBE_TOKEN}",
        f"http://127.0.0.1:9/api#{PROBE_TOKEN}",
    ],
)
async def test_a_credential_in_the_url_is_refused_never_written(url, tmp_path):
    # A user name, password or query in the URL would be sent to every probe and written
    # into the draft's `upstream:` (which then fails validation); --header is the way.
    out = tmp_path / "p.yaml"
    done = await discover(url, "--out", str(out))
    assert done.returncode == 2, done.stderr
    assert "--header" in done.stderr
    assert PROBE_TOKEN not in done.stderr + done.stdout
    assert not out.exists()


async def test_a_redirect_loop_on_the_host_is_reported_and_bounded(upstream):
    seen: list[str] = []

    async def loop(request: web.Request) -> web.Response:
        seen.append(request.path)
        raise web.HTTPFound(request.path)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", loop)
    base = await upstream(app)
    done = await discover(base, "--max-requests", "8")
    assert done.returncode == 0, done.stderr
    assert "GET / (the base URL): too many redirects" in done.stderr
    assert len(seen) == 8
