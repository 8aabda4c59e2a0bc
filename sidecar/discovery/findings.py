"""What the probes look for: an OpenAPI document, a GraphQL schema, an MCP server, and
how the API wants to be authenticated."""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from typing import Any

from .probe import Answer, Prober

OPENAPI_PATHS = (
    "/openapi.json",
    "/openapi.yaml",
    "/swagger.json",
    "/v3/api-docs",
    "/api-docs",
    "/.well-known/openapi.json",
    "/.well-known/openapi.yaml",
    "/.well-known/openapi",
    "/swagger/v1/swagger.json",
    "/openapi/v3",
)
GRAPHQL_PATHS = ("/graphql", "/api/graphql", "/graphql/", "/query")
MCP_PATHS = ("/mcp", "/mcp/", "/")
_DESCRIBED = re.compile(r"(openapi|swagger|api-docs)[^\"'\s<>]*\.(json|ya?ml)|api-docs", re.I)
_LINK = re.compile(r"<([^>]+)>\s*;[^,]*rel=\"?(service-desc|describedby|openapi)\"?", re.I)


@dataclass
class Findings:
    openapi: Any = None  # the sidecar's parsed openapi.Document
    openapi_text: bytes = b""
    openapi_at: str = ""
    openapi_media: str = ""
    graphql_path: str = ""
    graphql_roots: dict[str, list[str]] = field(default_factory=dict)  # query -> fields
    mcp_path: str = ""
    mcp_tools: list[tuple[str, str]] = field(default_factory=list)  # name, description
    mcp_server: str = ""
    auth: list[str] = field(default_factory=list)  # schemes from WWW-Authenticate


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("href", "src", "data-url", "url") and value and _DESCRIBED.search(value):
                self.found.append(value)


def linked_documents(answer: Answer) -> list[str]:
    """Where an answer points to a description: `Link: <...>; rel=service-desc`, or
    links in an HTML page (Swagger UI, Redoc pages name their document)."""
    out = [m.group(1) for m in _LINK.finditer(answer.headers.get("link", ""))]
    if answer.media == "text/html":
        parser = _Links()
        with contextlib.suppress(Exception):
            parser.feed(answer.text()[:200_000])
        out += parser.found
        # Swagger UI's inline configuration: url: "/openapi.json"
        out += [m.group(1) for m in re.finditer(r"url:\s*[\"']([^\"']+)[\"']", answer.text())]
    return out


def note_auth(answer: Answer, findings: Findings) -> None:
    challenge = answer.headers.get("www-authenticate", "")
    if answer.status in (401, 403) and challenge:
        scheme = challenge.split()[0].strip(",").lower()
        if scheme and scheme not in findings.auth:
            findings.auth.append(scheme)


def try_openapi(answer: Answer, findings: Findings) -> bool:
    from ..openapi import OpenAPIError
    from ..openapi import parse as parse_openapi

    if answer.status != 200 or not answer.body:
        return False
    try:
        document = parse_openapi(answer.body, source=answer.url)
    except OpenAPIError:
        return False
    findings.openapi = document
    findings.openapi_text = answer.body
    findings.openapi_at = answer.url
    findings.openapi_media = answer.media
    return True


async def find_openapi(prober: Prober, findings: Findings, candidates: list[str]) -> None:
    tried: set[str] = set()
    for path in candidates + list(OPENAPI_PATHS):
        url = prober.url(path) if not path.startswith("http") else path
        if url in tried or not prober.same_origin(url):
            continue
        tried.add(url)
        answer = await prober.request("GET", url, what=" (OpenAPI?)")
        if answer is None:
            continue
        note_auth(answer, findings)
        if try_openapi(answer, findings):
            return


def _introspection() -> str:
    from graphql import get_introspection_query

    return get_introspection_query(descriptions=False)


async def find_graphql(prober: Prober, findings: Findings) -> None:
    body = json.dumps({"query": _introspection()}).encode()
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    for path in GRAPHQL_PATHS:
        answer = await prober.request("POST", path, body=body, headers=headers, what=" (GraphQL?)")
        if answer is None:
            continue
        note_auth(answer, findings)
        data = answer.json()
        schema = (data or {}).get("data", {}) if isinstance(data, dict) else {}
        schema = schema.get("__schema") if isinstance(schema, dict) else None
        if not isinstance(schema, dict):
            continue
        findings.graphql_path = path.rstrip("/") or "/"
        findings.graphql_roots = _roots(schema)
        return


def _roots(schema: dict[str, Any]) -> dict[str, list[str]]:
    types = {t.get("name"): t for t in schema.get("types") or () if isinstance(t, dict)}
    out: dict[str, list[str]] = {}
    for kind in ("queryType", "mutationType", "subscriptionType"):
        named = (schema.get(kind) or {}).get("name")
        if not named or named not in types:
            continue
        fields = [f.get("name") for f in types[named].get("fields") or () if isinstance(f, dict)]
        out[kind.removesuffix("Type")] = sorted(f for f in fields if isinstance(f, str))
    return out


def _rpc(method: str, id: int | None, params: dict[str, Any] | None = None) -> bytes:
    message: dict[str, Any] = {"jsonrpc": "2.0", "method": method}
    if id is not None:
        message["id"] = id
    if params is not None:
        message["params"] = params
    return json.dumps(message).encode()


def _rpc_result(answer: Answer) -> Any:
    """The JSON-RPC answer of a JSON or an SSE (streamable HTTP) reply."""
    if answer.media == "text/event-stream":
        for line in answer.text().splitlines():
            if line.startswith("data:"):
                try:
                    message = json.loads(line[5:].strip())
                except ValueError:
                    continue
                if isinstance(message, dict) and ("result" in message or "error" in message):
                    return message
        return None
    return answer.json()


async def find_mcp(prober: Prober, findings: Findings) -> None:
    headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
    init = _rpc(
        "initialize",
        1,
        {
            "protocolVersion": "2025-06-18",
            "capabilities": {},
            "clientInfo": {"name": "sidecar-discover", "version": "1"},
        },
    )
    for path in MCP_PATHS:
        answer = await prober.request("POST", path, body=init, headers=headers, what=" (MCP?)")
        if answer is None:
            continue
        note_auth(answer, findings)
        message = _rpc_result(answer) if answer.status == 200 else None
        result = message.get("result") if isinstance(message, dict) else None
        if not isinstance(result, dict) or "protocolVersion" not in result:
            continue
        findings.mcp_path = urlparse_path(answer.url, prober.base)
        info = result.get("serverInfo") or {}
        findings.mcp_server = str(info.get("name") or "")
        session = dict(headers)
        if sid := answer.headers.get("mcp-session-id"):
            session["Mcp-Session-Id"] = sid
        if version := result.get("protocolVersion"):
            session["MCP-Protocol-Version"] = str(version)
        await prober.request(
            "POST", answer.url, body=_rpc("notifications/initialized", None), headers=session
        )
        listed = await prober.request(
            "POST", answer.url, body=_rpc("tools/list", 2), headers=session, what=" (tools/list)"
        )
        tools = ((_rpc_result(listed) or {}).get("result") or {}).get("tools") if listed else None
        for tool in tools or ():
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                findings.mcp_tools.append((tool["name"], str(tool.get("description") or "")))
        if sid:
            await prober.request("DELETE", answer.url, headers=session)
        return


def urlparse_path(url: str, base: str) -> str:
    """The path of `url` under the base URL's own path (`/mcp`)."""
    from urllib.parse import urlsplit

    path = urlsplit(url).path or "/"
    prefix = urlsplit(base).path.rstrip("/")
    if prefix and path.startswith(prefix):
        path = path[len(prefix) :] or "/"
    return path.rstrip("/") or "/"
