"""MCP-aware services: which agent may call which tool of a Model Context Protocol server.

MCP sends JSON-RPC messages (one, or an array: a batch) in POST bodies: to the
one endpoint of streamable HTTP, or to the messages endpoint that the older
HTTP+SSE transport announces on its GET stream. This step reads each message's
method and, for `tools/call`, the tool's name, and refuses the whole body when a
tool is not among the agent's globs (`mcp.per_agent[agent]`, else `mcp.tools`).

A refusal is framed as an MCP server frames a failed call, so every SDK shows
the sentence instead of failing the session: HTTP 200 with a JSON-RPC error
answer for each request of the body (`error.data` holds the problem document;
X-Sidecar-Error says it is the sidecar's), as JSON, or as one SSE event for a
client that accepts only SSE. On the older transport the answer belongs on the
session's GET stream: the error is sent there, and the POST gets the 202 the
server would have given. A body that is no JSON-RPC at all (no id to answer)
gets 400; a client that asks for problem+json (or sends no Accept, so is no
MCP client) gets the problem document with the refusal's own status.

Answers, often SSE streams, are relayed as they come, except that `tools/list`
results lose the tools the agent may not call: in a JSON answer (up to
LIST_LIMIT) and in every SSE stream of the service, the GET ones included.
GET, HEAD, OPTIONS and DELETE without a body pass; with a body, they are read
like a POST. The endpoint is compared percent-decoded, so an encoded path
cannot dodge it. A WebSocket (no MCP transport, but the SDK 1.x has one) has
every message the agent sends judged the same way, a refusal answered with
the JSON-RPC errors as a text message.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Callable
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urljoin, urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from ...core.call import Call, Handler, Reply, ReplyView, StaticReply
from ...core.problems import ProblemError, problem_document
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ...policy.protocols import MCP
from ..operation import (
    OPERATION,
    _DuplicateKey,
    _unique_keys,
    annotate,
    bad_request,
    endpoint,
    parse_json,
    read_body,
)
from .websocket import FilteredTunnel, Verdict

# JSON-RPC 2.0 error codes: the spec's, and one of its implementation-defined
# server errors (-32000..-32099) for a tool the policy does not allow.
PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
TOOL_FORBIDDEN = -32001

# Largest JSON tools/list answer read to be filtered; a larger one is relayed as is.
LIST_LIMIT = 1 << 20

# Methods that carry no JSON-RPC message when they have no body: the server's event
# stream (GET), the end of a session (DELETE), a CORS preflight.
_PASSING = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})

# Errors waiting for one older-transport session's GET stream; more are dropped.
_QUEUED_LIMIT = 64


def rpc_error(message_id: Any, code: int, message: str) -> dict[str, object]:
    """A JSON-RPC error response's members, to ride along in a problem document."""
    return {"jsonrpc": "2.0", "id": message_id, "error": {"code": code, "message": message}}


class _Refusal(Exception):
    """One message of a body is refused: its id, JSON-RPC code and the problem."""

    def __init__(self, message_id: Any, code: int, problem: ProblemError) -> None:
        super().__init__(problem.detail)
        self.message_id = message_id
        self.code = code
        self.problem = problem


class Sessions:
    """Older HTTP+SSE transport sessions (kept across reloads): the messages endpoints
    the server announced, and for each open GET stream the errors it must carry."""

    def __init__(self) -> None:
        self.endpoints: set[str] = set()
        self.streams: dict[str, asyncio.Queue[bytes]] = {}


def _session_key(target: str) -> str:
    return endpoint(target) + "?" + target.partition("?")[2]


class MCPStep:
    def __init__(
        self,
        *,
        service: str,
        config: MCP,
        prefix: str = "/",
        base_path: str = "",
        origin: str = "",
        sessions: Sessions | None = None,
    ) -> None:
        self.service = service
        self.path = config.path
        self.tools = tuple(config.tools)
        self.per_agent = {agent: tuple(globs) for agent, globs in config.per_agent.items()}
        self.prefix = "" if prefix == "/" else prefix
        self.base_path = base_path.rstrip("/")
        self.origin = origin
        self.sessions = sessions if sessions is not None else Sessions()

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if call.upgrade:
            # permessage-deflate would hide the messages from the sidecar.
            call.headers.popall("Sec-WebSocket-Extensions", None)
            return self._socket(call, await next(call))
        if (call.method in _PASSING and not _has_body(call)) or not self._reads(call):
            reply = await next(call)
            return self._streamed(call, reply, session_stream=call.method == "GET")
        try:
            messages, labels = await self._read(call)
        except ProblemError as err:
            if err.body is None:  # not framed as JSON-RPC answers already
                kind = _media_type(call.headers.get("Accept"))
                err.content_type = "application/json" if kind == "text/event-stream" else kind
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
        if "tools/list" in labels and _media(reply) == "application/json":
            return await self._filter_tools(call.agent, reply)
        return self._streamed(call, reply, session_stream=False)

    def _reads(self, call: Call) -> bool:
        if self.path is None:
            return True
        path = endpoint(call.target)
        return path == self.path or path in self.sessions.endpoints

    def _allows(self, agent: str | None, tool: str) -> bool:
        globs = self.per_agent.get(agent, self.tools) if agent is not None else self.tools
        return any(fnmatchcase(tool, glob) for glob in globs)

    # -- answers ---------------------------------------------------------------------

    def _streamed(self, call: Call, reply: Reply, *, session_stream: bool) -> Reply:
        """An SSE answer filtered event by event (and, for a GET, the older transport's
        session stream); any other answer as it is."""
        if reply.body is None or _media(reply) != "text/event-stream":
            return reply
        agent = call.agent
        session = _SessionStream(self, call.target) if session_stream else None
        return FilteredEvents(reply, lambda d: self._filtered(agent, d), session)

    async def _filter_tools(self, agent: str | None, reply: Reply) -> Reply:
        """A JSON tools/list answer without the tools the agent may not call; only one
        of at most LIST_LIMIT bytes is rewritten (a call to an unlisted tool is still
        refused)."""
        length = reply.content_length
        if length is None or length > LIST_LIMIT:
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
        if b'"tools"' not in data:
            return data
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

    def announced(self, data: str, stream: str) -> tuple[str, str | None]:
        """An older-transport `endpoint` event's URL as the agent must use it (through
        the sidecar's prefix), and the target (after the prefix) it names, now read
        like the MCP path; None when it is not this service's. `stream` is the target
        of the GET that carries the event (relative URLs are read against it)."""
        parts = urlsplit(data)
        if (parts.scheme or parts.netloc) and (
            f"{parts.scheme}://{parts.netloc}".lower() != self.origin
        ):
            return data, None  # another origin: not this service's, left to the client
        query = f"?{parts.query}" if parts.query else ""
        path = parts.path
        if not path.startswith("/"):
            # Relative to the GET's URL, which the agent already uses through the prefix.
            target = urljoin(stream.partition("?")[0], path)
            self.sessions.endpoints.add(endpoint(target))
            return data, target + query
        if self.base_path:
            if not (path == self.base_path or path.startswith(self.base_path + "/")):
                return data, None
            path = path[len(self.base_path) :] or "/"
        self.sessions.endpoints.add(endpoint(path))
        return self.prefix + path + query, path + query

    # -- requests --------------------------------------------------------------------

    async def _read(self, call: Call) -> tuple[list[Any], list[str]]:
        """The body's JSON-RPC messages and their labels, once every one is allowed."""
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
        if not all(isinstance(m, dict) for m in messages):
            raise self._bad(None, INVALID_REQUEST, "a JSON-RPC message must be a JSON object")
        labels = []
        for message in messages:
            try:
                labels.append(self._check(call.agent, message))
            except _Refusal as refusal:
                raise self._framed(call, refusal, messages) from None
        return messages, labels

    def _check(self, agent: str | None, message: dict[str, Any]) -> str:
        """The message's label (its method, `tools/call:<tool>`), once it is allowed."""
        message_id = message.get("id")
        method = message.get("method")
        if method is None:
            if "result" in message or "error" in message:
                return "response"  # the client answering a server's request
            raise self._invalid(message_id, INVALID_REQUEST, "a JSON-RPC message has no `method`")
        if not isinstance(method, str):
            raise self._invalid(message_id, INVALID_REQUEST, "`method` must be a string")
        if method != "tools/call":
            return method
        params = message.get("params")
        tool = params.get("name") if isinstance(params, dict) else None
        if not isinstance(tool, str):
            raise self._invalid(
                message_id, INVALID_PARAMS, "tools/call needs `params.name`, a string"
            )
        if not self._allows(agent, tool):
            caller = f"Agent '{agent}'" if agent else "A caller without an agent id"
            detail = (
                f"{caller} may not call the tool '{tool}' of MCP service '{self.service}': "
                "the policy's mcp tool rules do not allow it."
            )
            problem = ProblemError(Reason.forbidden, detail, service=self.service)
            raise _Refusal(message_id, TOOL_FORBIDDEN, problem)
        return f"tools/call:{tool}"

    # -- refusals --------------------------------------------------------------------

    def _framed(self, call: Call, refusal: _Refusal, messages: list[Any]) -> ProblemError:
        """The refusal of a body's JSON-RPC requests, framed for the client that sent it:
        an error answer for each request (the refused one's own, "not sent" for the
        rest of a batch), so the client shows it as the call's error."""
        problem = refusal.problem
        kind = _media_type(call.headers.get("Accept"))
        stream = self.sessions.streams.get(_session_key(call.target))
        if kind == "application/problem+json" and stream is None:
            problem.content_type = kind
            problem.extra = rpc_error(refusal.message_id, refusal.code, problem.detail)
            return problem
        text = self._answers(refusal, messages)
        event = b"event: message\r\ndata: " + text + b"\r\n\r\n"
        status, body, content_type = 200, text, "application/json"
        if stream is not None and stream.qsize() < _QUEUED_LIMIT:
            # The older transport: answers travel on the session's GET stream, and the
            # POST gets the server's own 202.
            stream.put_nowait(event)
            status = 202
        elif kind == "text/event-stream":
            body, content_type = event, kind
        return ProblemError(
            problem.reason,
            problem.detail,
            service=self.service,
            status=status,
            body=body,
            content_type=content_type,
        )

    def _answers(self, refusal: _Refusal, messages: list[Any]) -> bytes:
        """The JSON-RPC error answers to a refused body: one for each request (the
        refused one's own, "not sent" for the rest of a batch), none for notifications
        and responses, as one object or, for a batch, an array."""
        problem = refusal.problem
        data = problem_document(problem, self.service)
        refused = {"code": refusal.code, "message": problem.detail, "data": data}
        others = {
            "code": refusal.code,
            "message": f"Not sent: another request of the batch was refused. {problem.detail}",
            "data": data,
        }
        ids = [m["id"] for m in messages if "method" in m and "id" in m]
        if refusal.message_id not in ids:
            ids.append(refusal.message_id)  # a refused notification: answered all the same
        answers = [
            {"jsonrpc": "2.0", "id": i, "error": refused if i == refusal.message_id else others}
            for i in ids
        ]
        document: Any = answers if len(messages) > 1 else answers[0]
        return json.dumps(document, separators=(",", ":")).encode()

    def _socket(self, call: Call, reply: Reply) -> Reply:
        """A WebSocket the upstream accepted (the MCP SDK 1.x's `mcp` subprotocol, and
        any other JSON-RPC socket): every message the agent sends is judged."""
        if reply.status == 101:
            agent = call.agent
            call.tunnel_filter = lambda tunnel: FilteredTunnel(
                tunnel, lambda data: self._judge_message(agent, data)
            )
        return reply

    def _judge_message(self, agent: str | None, data: bytes) -> Verdict:
        """One WebSocket message: None to pass it, the JSON-RPC error answers of a
        refused one, or a close code for one servers could read two ways."""
        try:
            document = json.loads(data, object_pairs_hook=_unique_keys)
        except _DuplicateKey:
            return 1008
        except (ValueError, RecursionError):
            return None  # not JSON-RPC: the server refuses it as it would without us
        messages = document if isinstance(document, list) else [document]
        if not messages or not all(isinstance(m, dict) for m in messages):
            return None
        for message in messages:
            try:
                self._check(agent, message)
            except _Refusal as refusal:
                return self._answers(refusal, messages)
            except ProblemError:
                return None  # unusable and without an id: the server refuses it
        return None

    def _invalid(self, message_id: Any, code: int, flaw: str) -> Exception:
        if message_id is None:
            return self._bad(None, code, flaw)
        problem = bad_request(self._unusable(flaw), service=self.service)
        return _Refusal(message_id, code, problem)

    def _unusable(self, flaw: str) -> str:
        return (
            f"Service '{self.service}' reads every MCP request, and this one is not usable: {flaw}."
        )

    def _bad(self, message_id: Any, code: int, flaw: str) -> ProblemError:
        detail = self._unusable(flaw)
        return bad_request(detail, service=self.service, extra=rpc_error(message_id, code, detail))


class _SessionStream:
    """One GET stream of the service: announces and rewrites the older transport's
    messages endpoint, and carries the errors refused POSTs of its session left."""

    __slots__ = ("key", "queue", "step", "target")

    def __init__(self, step: MCPStep, target: str) -> None:
        self.step = step
        self.target = target
        self.key: str | None = None
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def endpoint_event(self, data: str) -> str:
        url, target = self.step.announced(data, self.target)
        if self.key is None and target is not None:
            self.key = _session_key(target)
            self.step.sessions.streams[self.key] = self.queue
        return url

    def close(self) -> None:
        if self.key is not None and self.step.sessions.streams.get(self.key) is self.queue:
            del self.step.sessions.streams[self.key]


class FilteredEvents(ReplyView):
    """An SSE answer relayed event by event, each event's data passed through `rewrite`.

    An event longer than LIST_LIMIT is relayed as it is from there on: the
    stream is never held in memory. With a `session` (a GET stream), the older
    transport's `endpoint` event is rewritten to the sidecar's URL, and errors
    for the session's refused POSTs are sent between the upstream's events.
    """

    __slots__ = ("_rewrite", "_session")

    def __init__(
        self,
        reply: Reply,
        rewrite: Callable[[bytes], bytes],
        session: _SessionStream | None = None,
    ) -> None:
        self._rewrite = rewrite
        self._session = session
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
        session = self._session
        chunks = _merged(body, session)
        pending = b""
        passthrough = False
        held: list[bytes] = []  # errors that came mid-event, sent at its end
        try:
            async for chunk, injected in chunks:
                if injected:
                    if pending or passthrough:
                        held.append(chunk)
                    else:
                        yield chunk
                    continue
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
                if held and not pending:
                    yield b"".join(held)
                    held.clear()
                if len(pending) > LIST_LIMIT:
                    passthrough = True
                    yield pending
                    pending = b""
            if pending:
                yield pending
        finally:
            if session is not None:
                session.close()
            await chunks.aclose()

    def _event(self, event: bytes) -> bytes:
        lines = event.splitlines()
        data = [line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:")]
        if not data:
            return event
        joined = b"\n".join(data)
        session = self._session
        if session is not None and any(
            line.replace(b" ", b"") == b"event:endpoint" for line in lines
        ):
            rewritten = session.endpoint_event(joined.decode("utf-8", "replace")).encode()
        else:
            rewritten = self._rewrite(joined)
        if rewritten == joined:
            return event
        kept = [line for line in lines if line and not line.startswith(b"data:")]
        return b"\n".join([*kept, b"data: " + rewritten]) + b"\n\n"


async def _merged(
    body: AsyncIterable[bytes], session: _SessionStream | None
) -> AsyncGenerator[tuple[bytes, bool], None]:
    """The upstream's chunks (False) and, for a session stream, the errors queued for
    it (True), each as soon as it is there."""
    source = aiter(body)
    if session is None:
        async for chunk in source:
            yield chunk, False
        return
    reading: asyncio.Future[bytes] | None = None
    waiting: asyncio.Future[bytes] | None = None
    try:
        while True:
            if reading is None:
                reading = asyncio.ensure_future(anext(source))
            if waiting is None:
                waiting = asyncio.ensure_future(session.queue.get())
            await asyncio.wait((reading, waiting), return_when=asyncio.FIRST_COMPLETED)
            if waiting.done():
                yield waiting.result(), True
                waiting = None
            if reading.done():
                try:
                    chunk = reading.result()
                except StopAsyncIteration:
                    return
                reading = None
                yield chunk, False
    finally:
        for future in (reading, waiting):
            if future is not None and not future.done():
                future.cancel()


_EVENT_END = re.compile(rb"\r?\n\r?\n|\r\r")


def _has_body(call: Call) -> bool:
    body = call.body
    return body is not None and body != b"" and call.content_length != 0


def _media(reply: Reply) -> str:
    return reply.headers.get("Content-Type", "").partition(";")[0].strip().lower()


def _media_type(accept: str | None) -> str:
    """problem+json, unless the client accepts JSON or SSE but not problem+json (MCP
    clients send `application/json, text/event-stream` and read an error answer only
    in one of those)."""
    types = {part.partition(";")[0].strip().lower() for part in (accept or "").split(",")}
    if "application/problem+json" in types:
        return "application/problem+json"
    if "application/json" in types:
        return "application/json"
    if "text/event-stream" in types:
        return "text/event-stream"
    return "application/problem+json"


def build(service: ServicePolicy, *, state: StateBuild) -> MCPStep | None:
    config = service.spec.mcp
    if config is None:
        return None
    upstream = urlsplit(service.spec.upstream)
    return MCPStep(
        service=service.name,
        config=config,
        prefix=service.prefix,
        base_path=upstream.path,
        origin=f"{upstream.scheme}://{upstream.netloc}".lower(),
        # Open GET streams outlive a reload: their sessions are found by the new chain.
        sessions=state.get(service.name, "mcp-sessions", None, Sessions),
    )
