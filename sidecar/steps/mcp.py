"""MCP-aware services: which agent may call which tool of a Model Context Protocol server.

MCP over streamable HTTP sends JSON-RPC messages (one, or an array: a batch)
in POST bodies. This step reads each message's method and, for `tools/call`,
the tool's name, and refuses the whole POST with `403 forbidden` when a tool
is not among the agent's globs (`mcp.per_agent[agent]`, else `mcp.tools`).
The refusal is a problem+json document that is also a JSON-RPC error
response (`jsonrpc`, `id`, `error`), so either kind of client can read it.

Answers, often SSE streams, are relayed as they come, except a JSON
`tools/list` answer (JSON up to LIST_LIMIT, or SSE event by event): the tools
the agent may not call are dropped from it. GET (the server's event stream)
and DELETE (end of a session) pass.
The endpoint is compared percent-decoded, so an encoded path cannot dodge it.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from fnmatch import fnmatchcase
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from ..call import Call, Handler, Reply, ReplyView, StaticReply
from ..policy.loader import ServicePolicy
from ..policy.protocols import MCP
from ..problems import ProblemError
from ..state import StateBuild
from .operation import OPERATION, annotate, bad_request, endpoint, parse_json, read_body

# JSON-RPC 2.0 error codes: the spec's, and one of its implementation-defined
# server errors (-32000..-32099) for a tool the policy does not allow.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
TOOL_FORBIDDEN = -32001

# Largest JSON tools/list answer read to be filtered; a larger one is relayed as is.
LIST_LIMIT = 1 << 20

# Methods that carry no JSON-RPC message: the server's event stream (GET), the end of
# a session (DELETE), a CORS preflight. Any other method's body is read, not just POST's.
_PASSING = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def rpc_error(message_id: Any, code: int, message: str) -> dict[str, object]:
    """A JSON-RPC error response's members, to ride along in a problem document."""
    return {"jsonrpc": "2.0", "id": message_id, "error": {"code": code, "message": message}}


class MCPStep:
    def __init__(self, *, service: str, config: MCP) -> None:
        self.service = service
        self.path = config.path
        self.tools = tuple(config.tools)
        self.per_agent = {agent: tuple(globs) for agent, globs in config.per_agent.items()}

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if call.method in _PASSING or (
            self.path is not None and endpoint(call.target) != self.path
        ):
            return await next(call)
        try:
            messages, labels = await self._read(call)
        except ProblemError as err:
            err.content_type = _media_type(call.headers.get("Accept"))
            raise
        label = ",".join(labels)
        attributes: dict[str, str | int | bool] = {"mcp.operation.label": label}
        if len(messages) == 1:
            method, _, tool = labels[0].partition(":")
            attributes["mcp.method.name"] = method
            if tool:
                attributes["gen_ai.tool.name"] = tool
            message_id = messages[0].get("id")
            if isinstance(message_id, str | int) and not isinstance(message_id, bool):
                attributes["jsonrpc.request.id"] = str(message_id)
        else:
            attributes["jsonrpc.batch.size"] = len(messages)
        annotate(call, attributes)
        token = OPERATION.set(tuple(labels))
        try:
            reply = await next(call)
        finally:
            OPERATION.reset(token)
        if "tools/list" in labels:
            return await self._filter_tools(call.agent, reply)
        return reply

    def _allows(self, agent: str | None, tool: str) -> bool:
        globs = self.per_agent.get(agent, self.tools) if agent is not None else self.tools
        return any(fnmatchcase(tool, glob) for glob in globs)

    async def _filter_tools(self, agent: str | None, reply: Reply) -> Reply:
        """A JSON tools/list answer without the tools the agent may not call.

        Only a JSON answer of at most LIST_LIMIT bytes is rewritten; an SSE
        answer is relayed as it comes (not filtered yet): calling a listed
        but forbidden tool is still refused.
        """
        kind = reply.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        if kind == "text/event-stream" and reply.body is not None:
            return FilteredEvents(reply, lambda d: self._filtered(agent, d))
        length = reply.content_length
        if kind != "application/json" or length is None or length > LIST_LIMIT:
            return reply
        try:
            chunks = [chunk async for chunk in reply.body] if reply.body is not None else []
        finally:
            reply.release()
        data = self._filtered(agent, b"".join(chunks))
        headers = CIMultiDict(reply.headers)
        headers.popall("Content-Length", None)
        headers.popall("Transfer-Encoding", None)
        headers["Content-Length"] = str(len(data))
        return StaticReply(reply.status, headers, data, reason=reply.reason)

    def _filtered(self, agent: str | None, data: bytes) -> bytes:
        """A JSON-RPC answer (or batch) without the listed tools the agent may not call."""
        try:
            document = json.loads(data)
        except ValueError:
            return data
        changed = False
        for message in document if isinstance(document, list) else [document]:
            result = message.get("result") if isinstance(message, dict) else None
            tools = result.get("tools") if isinstance(result, dict) else None
            if isinstance(result, dict) and isinstance(tools, list):
                kept = [
                    t
                    for t in tools
                    if isinstance(t, dict)
                    and isinstance(t.get("name"), str)
                    and self._allows(agent, t["name"])
                ]
                changed = changed or len(kept) != len(tools)
                result["tools"] = kept
        return json.dumps(document, separators=(",", ":")).encode() if changed else data

    async def _read(self, call: Call) -> tuple[list[Any], list[str]]:
        """The POST's JSON-RPC messages and their labels, once every one is allowed."""
        body = await read_body(call, service=self.service, what="MCP")
        document = parse_json(
            body,
            service=self.service,
            what="MCP (JSON-RPC)",
            extra=rpc_error(None, PARSE_ERROR, "Parse error"),
        )
        messages = document if isinstance(document, list) else [document]
        if not messages:
            raise self._bad(None, INVALID_REQUEST, "the JSON-RPC batch is empty")
        return messages, [self._check(call.agent, message) for message in messages]

    def _check(self, agent: str | None, message: Any) -> str:
        """The message's label (its method, `tools/call:<tool>`), once it is allowed."""
        if not isinstance(message, dict):
            raise self._bad(None, INVALID_REQUEST, "a JSON-RPC message must be a JSON object")
        message_id = message.get("id")
        method = message.get("method")
        if method is None:
            if "result" in message or "error" in message:
                return "response"  # the client answering a server's request
            raise self._bad(message_id, INVALID_REQUEST, "a JSON-RPC message has no `method`")
        if not isinstance(method, str):
            raise self._bad(message_id, INVALID_REQUEST, "`method` must be a string")
        if method != "tools/call":
            return method
        params = message.get("params")
        tool = params.get("name") if isinstance(params, dict) else None
        if not isinstance(tool, str):
            raise self._bad(message_id, INVALID_PARAMS, "tools/call needs `params.name`, a string")
        if not self._allows(agent, tool):
            caller = f"Agent '{agent}'" if agent else "A caller without an agent id"
            detail = (
                f"{caller} may not call the tool '{tool}' of MCP service '{self.service}': "
                "the policy's mcp tool rules do not allow it."
            )
            raise ProblemError(
                "forbidden",
                detail,
                service=self.service,
                extra=rpc_error(message_id, TOOL_FORBIDDEN, detail),
            )
        return f"tools/call:{tool}"

    def _bad(self, message_id: Any, code: int, flaw: str) -> ProblemError:
        detail = (
            f"Service '{self.service}' reads every MCP request, and this one is not usable: {flaw}."
        )
        return bad_request(detail, service=self.service, extra=rpc_error(message_id, code, detail))


class FilteredEvents(ReplyView):
    """An SSE answer relayed event by event, each event's data passed through `rewrite`.

    An event longer than LIST_LIMIT is relayed as it is from there on: the
    stream is never held in memory.
    """

    __slots__ = ("_rewrite",)

    def __init__(self, reply: Reply, rewrite: Callable[[bytes], bytes]) -> None:
        self._rewrite = rewrite
        headers = CIMultiDict(reply.headers)
        headers.popall("Content-Length", None)
        assert reply.body is not None
        super().__init__(
            reply,
            body=self._events(reply.body),
            headers=CIMultiDictProxy(headers),
            content_length=None,
        )

    async def _events(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        pending = b""
        passthrough = False
        async for chunk in body:
            if passthrough:
                yield chunk
                continue
            pending += chunk
            while True:
                match = _EVENT_END.search(pending)
                if match is None:
                    break
                event, pending = pending[: match.end()], pending[match.end() :]
                yield self._event(event)
            if len(pending) > LIST_LIMIT:
                passthrough = True
                yield pending
                pending = b""
        if pending:
            yield pending

    def _event(self, event: bytes) -> bytes:
        lines = event.splitlines()
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return event
        joined = b"\n".join(data)
        rewritten = self._rewrite(joined)
        if rewritten == joined:
            return event
        kept = [line for line in lines if line and not line.startswith(b"data:")]
        return b"\n".join([*kept, b"data: " + rewritten]) + b"\n\n"


_EVENT_END = re.compile(rb"\r?\n\r?\n|\r\r")


def _media_type(accept: str | None) -> str:
    """problem+json, unless the client accepts JSON but not problem+json (MCP clients send
    `application/json, text/event-stream` and read an error answer only as JSON)."""
    types = {part.partition(";")[0].strip().lower() for part in (accept or "").split(",")}
    if "application/json" in types and "application/problem+json" not in types:
        return "application/json"
    return "application/problem+json"


def build(service: ServicePolicy, *, state: StateBuild) -> MCPStep | None:
    config = service.spec.mcp
    if config is None:
        return None
    return MCPStep(service=service.name, config=config)
