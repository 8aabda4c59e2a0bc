"""The agent-facing HTTP/1.1 server: an asyncio.Protocol on httptools (llhttp).

Parser callbacks fill one small `Request` per message; one task per request
runs the app and writes its `Response`, so pipelined requests are answered in
order. Flow control both ways: reading pauses while a request body's buffer is
above its high-water mark or a pipelined request waits, and writing awaits a
drain while the transport's write buffer is above its own. Anything the parser
or our stricter checks refuse is answered 400 (431/414/505) and the connection
closed; the app never sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterable, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, cast

import httptools
from multidict import CIMultiDict

from ..core.headers import SERVER, decode_fields
from ..core.problems import ProblemError, problem_document
from ..core.reasons import Reason
from .http1 import (
    CHUNKED,
    LAST_CHUNK,
    NO_BODY,
    UNTIL_CLOSE,
    FeedStream,
    FramingError,
    Tunnel,
    WriteGate,
    body_framing,
    chunk,
    framing_field,
    head_bytes,
    header_lines,
    send_framing,
    status_line,
)

log = logging.getLogger("sidecar.listener")

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
# Framing belongs to this server: whatever the app put there is replaced.
_FRAMING: Final = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
# An unread request body up to this size is read and dropped after the answer, for up
# to this long, so the agent reads the answer instead of a reset (nginx's lingering close).
_DISCARD_LIMIT: Final = 1 << 20
_DISCARD_TIMEOUT: Final = 5.0


@dataclass(frozen=True, slots=True)
class Limits:
    """What one agent connection may cost; set at load, shared by every connection."""

    max_head_bytes: int = 32 * 1024  # request line + headers, as sent
    max_headers: int = 100
    max_url_bytes: int = 8 * 1024
    header_timeout: float = 10.0  # from the first byte of a request to its blank line
    idle_timeout: float = 75.0  # a kept-alive connection with no request
    body_high_water: int = 64 * 1024  # request body bytes buffered before reading pauses


class Request:
    """One agent request as parsed. Its header fields stay the bytes the parser read
    (`raw_headers`) until something asks for `headers`, decoded then, once: the proxy
    path reads the few it needs with `header()` and relays the rest as bytes."""

    __slots__ = (
        "_headers",
        "body",
        "connection",
        "content_length",
        "is_upgrade",
        "keep_alive",
        "method",
        "peer",
        "raw_headers",
        "target",
        "version",
    )

    def __init__(
        self,
        *,
        method: str,
        target: str,
        version: str,
        raw_headers: list[tuple[bytes, bytes]],
        content_length: int | None,
        body: FeedStream | None,
        peer: tuple[str, int] | None,
        keep_alive: bool,
        is_upgrade: bool,
        connection: bytes | None = None,
    ) -> None:
        self.method = method
        self.target = target  # as sent, never decoded or normalized
        self.version = version  # "1.0" or "1.1"
        self.raw_headers = raw_headers
        self._headers: CIMultiDict[str] | None = None
        self.content_length = content_length
        self.body = body  # None when the request has no body
        self.peer = peer
        self.keep_alive = keep_alive
        self.is_upgrade = is_upgrade
        self.connection = connection  # every Connection field's value, joined

    @property
    def headers(self) -> CIMultiDict[str]:
        """The fields decoded (a copy: changing it changes nothing that is relayed)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = decode_fields(self.raw_headers)
        return headers

    def header(self, name: bytes) -> str | None:
        """The first field called `name` (any case), decoding no other."""
        name = name.lower()
        size = len(name)
        for field_name, value in self.raw_headers:
            if len(field_name) == size and field_name.lower() == name:
                return value.decode("latin-1")
        return None


class _Head:
    """A request head as the parser reads it, made at each request's first byte and
    handed to its `Request` at the blank line. A plain class: compiled, its fields
    are native slots and making one is a single small allocation."""

    __slots__ = (
        "codings",
        "connection",
        "expect",
        "fields",
        "lengths",
        "proxy_connection",
        "size",
        "url",
    )

    def __init__(self) -> None:
        self.url = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.size = 0  # the fields' bytes as sent, for max_head_bytes
        # The fields the server itself reads, noted as they pass: every Content-Length
        # and Transfer-Encoding value, joined, for body_framing; every Connection field.
        self.lengths: bytes | None = None
        self.codings: bytes | None = None
        self.expect: bytes | None = None
        self.connection: bytes | None = None
        # A Proxy-Connection field came: llhttp reads it as Connection (keep-alive).
        self.proxy_connection = False


class Response:
    """An answer for the listener to write.

    A plain class, not a dataclass: compiled (setup.py), its __init__ is native,
    where a dataclass's is generated Python, one call per request.
    """

    __slots__ = (
        "body",
        "content_length",
        "head_lines",
        "headers",
        "no_framing",
        "on_done",
        "reason",
        "status",
        "tunnel",
    )

    def __init__(
        self,
        status: int,
        headers: list[tuple[str, str]] | None = None,
        body: bytes | AsyncIterable[bytes] | None = None,
        content_length: int | None = None,
        reason: str | None = None,
        tunnel: Tunnel | None = None,
        on_done: Callable[[int, BaseException | None], None] | None = None,
        no_framing: bool = False,
        head_lines: bytes | None = None,
    ) -> None:
        self.status = status
        self.headers: list[tuple[str, str]] = [] if headers is None else headers
        self.body = body
        self.content_length = content_length  # for a streamed body; None: chunked or close
        self.reason = reason  # None: the standard phrase
        # With status 101: the other end to relay raw bytes to once the head is written.
        self.tunnel = tunnel
        # Called once the answer is over: bytes written to the agent, and the error that
        # cut it short (None when whole; CancelledError when the agent left).
        self.on_done = on_done
        # The app already left out every framing and hop-by-hop field (a relayed
        # answer): `headers` is written as it is, without a second look at each name.
        self.no_framing = no_framing
        # The header lines already serialized (a relayed answer's, as the upstream sent
        # them), framing left out: written instead of `headers`.
        self.head_lines = head_lines


App = Callable[[Request], Awaitable[Response]]

# The closing of answer bodies whose connection's task was cancelled (_answer).
_CLOSING: Final[set[asyncio.Task[None]]] = set()


class _Refused(Exception):
    """A request the server answers itself, before the app."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_TITLES: Final = {
    400: "Bad request",
    414: "URI too long",
    431: "Request header fields too large",
    505: "HTTP version not supported",
}


def _frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    """One HTTP/2 frame (RFC 9113 4.1): length, type, flags, stream, payload."""
    head = len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big")
    return head + payload


def _hpack_literal(name: bytes, value: bytes) -> bytes:
    # A literal field without indexing and a new name (RFC 7541 6.2.2), no Huffman; every
    # name and value here is shorter than 127 bytes.
    return b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value


def _h2_refusal(detail: str) -> bytes:
    """The 505 in HTTP/2's own framing, for a client that opened with the HTTP/2 preface
    (prior knowledge, h2c): an HTTP/1.1 answer is unreadable to it (curl says "Empty
    reply from server"). The server preface (an empty SETTINGS), the answer on stream 1
    (the client's first), then GOAWAY, and the connection ends."""
    document = problem_document(ProblemError(Reason.http_version_not_supported, detail))
    body = json.dumps(document).encode()
    fields = (
        b"\x08\x03505"  # :status, its name by static index 8 (RFC 7541 6.2.2)
        + _hpack_literal(b"content-type", b"application/problem+json")
        + _hpack_literal(b"x-sidecar-error", b"http_version_not_supported")
        + _hpack_literal(b"server", SERVER.encode())
        + _hpack_literal(b"content-length", str(len(body)).encode())
    )
    goaway = (1).to_bytes(4, "big") + (0).to_bytes(4, "big")  # last stream 1, NO_ERROR
    return (
        _frame(0x4, 0, 0, b"")  # SETTINGS
        + _frame(0x1, 0x4, 1, fields)  # HEADERS, END_HEADERS
        + _frame(0x0, 0x1, 1, body)  # DATA, END_STREAM
        + _frame(0x7, 0, 0, goaway)
    )


H2_DETAIL: Final = "This sidecar speaks HTTP/1.1 only; send HTTP/1.1 requests."
_H2_REFUSAL: Final = _h2_refusal(H2_DETAIL)


def refusal_bytes(status: int, detail: str) -> bytes:
    """The whole answer for a refused request: problem+json, then the connection closes."""
    reason = Reason.http_version_not_supported if status == 505 else Reason.bad_request
    document = problem_document(ProblemError(reason, detail))
    # 414 and 431 are bad_request refusals with a status that says which limit.
    document["status"] = status
    document["title"] = _TITLES[status]
    body = json.dumps(document).encode()
    head = head_bytes(
        status_line(status),
        (
            ("Server", SERVER),
            ("Content-Type", "application/problem+json"),
            ("X-Sidecar-Error", reason),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ),
    )
    return head + body


_INTERNAL_ERROR: Final = Response(
    status=500,
    headers=[
        ("Server", SERVER),
        ("Content-Type", "application/problem+json"),
        ("X-Sidecar-Error", "internal_error"),
    ],
    body=json.dumps(
        {
            "type": "https://agent-sidecar.dev/errors/internal-error",
            "title": "Sidecar internal error",
            "status": 500,
            "detail": "The sidecar failed while handling this call; see its log.",
            "service": None,
            "reason": "internal_error",
            "message": "The sidecar failed while handling this call; see its log.",
        }
    ).encode(),
)


def _discardable(request: Request) -> bool:
    body = request.body
    if body is None or body.complete:
        return True
    length = request.content_length
    # With Expect the agent waits for a 100 that will not come: the body never arrives.
    return length is not None and length <= _DISCARD_LIMIT and request.header(b"expect") is None


class HttpServerProtocol(asyncio.Protocol):
    """One agent connection."""

    def __init__(self, app: App, limits: Limits, listener: Listener | None = None) -> None:
        self._app = app
        self._limits = limits
        self._listener = listener
        self._finishing = False  # the listener is stopping: close after this answer
        self._loop = asyncio.get_running_loop()
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer: tuple[str, int] | None = None
        self._closed = False
        # The request head being parsed; None between heads (and in a body's trailers).
        self._head: _Head | None = None
        self._body: FeedStream | None = None
        # Requests parsed, answered one at a time in order; the head one is running.
        # A list, not a deque: reading pauses while a request waits its turn, so it
        # holds a few requests at most, and an empty deque costs ~600 bytes of block
        # on every idle connection.
        self._queue: list[Request] = []
        # One task per connection, made at its first request; it waits for the next.
        self._task: asyncio.Task[None] | None = None
        self._busy = False  # answering a request (its head is parsed, its answer not done)
        self._waiter: asyncio.Future[None] | None = None
        self._app_has: Request | None = None  # handed to the app, not yet answered
        # Why reading is paused: a full request-body buffer, waiting pipelined requests.
        self._body_paused = False
        self._queue_paused = False
        self._writes = WriteGate(self._loop)
        self._timer: asyncio.TimerHandle | None = None
        self._deadline = 0.0  # 0: none; else when the sweep closes an idle or slow agent
        self._first_data = True
        # Bytes after an upgrade request's head, relayed once the tunnel opens.
        self._upgrade_rest = b""
        self._tunnel: Tunnel | None = None
        self._sent = 0  # bytes of the current answer written so far

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self._peer = (peer[0], peer[1]) if isinstance(peer, tuple) else None
        self._set_timer(self._limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        if self._listener is not None:
            self._listener.closed(self)
        self._cancel_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        for request in self._queue:
            if request.body is not None:
                request.body.set_error(ConnectionResetError("the agent closed the connection"))
        self._queue.clear()
        if self._body is not None:
            self._body.set_error(ConnectionResetError("the agent closed the connection"))
        self._writes.wake()
        if self._tunnel is not None:
            self._tunnel.close()

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel.write(data)
            return
        if self._upgrade_rest or (self._queue and self._queue[-1].is_upgrade):
            # Bytes after an upgrade head belong to the tunnel, not to HTTP.
            self._upgrade_rest += data
            return
        if self._first_data:
            self._first_data = False
            if data.startswith(b"PRI * HTTP/2"):
                self._refuse_h2()
                return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_rest = data[upgrade.args[0] :]
        except _Refused as refused:
            self._refuse(refused.status, refused.detail)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refused):
                self._refuse(cause.status, cause.detail)
            else:
                log.error("request parser callback failed", exc_info=cause)
                self._refuse(400, "The request could not be read.")
        except httptools.HttpParserError as exc:
            self._refuse(400, f"Malformed HTTP/1.1 request: {exc}.")

    # No eof_received: an agent's EOF closes the connection (asyncio's default), so
    # connection_lost cancels the call in flight, as for any hang-up.

    def pause_writing(self) -> None:
        self._writes.pause()
        if self._tunnel is not None:
            self._tunnel.pause_reading()

    def resume_writing(self) -> None:
        self._writes.resume()
        if self._tunnel is not None:
            self._tunnel.resume_reading()

    # httptools callbacks

    def on_message_begin(self) -> None:
        # A fresh head per request: nothing of the last one (its Expect, its framing
        # fields) can be read as this one's, and there is no field to forget to reset.
        self._head = _Head()
        if not self._busy:
            self._set_timer(self._limits.header_timeout)

    def on_url(self, url: bytes) -> None:
        head = self._head
        assert head is not None
        head.url += url
        if len(head.url) > self._limits.max_url_bytes:
            raise _Refused(414, "The request target is longer than this sidecar accepts.")

    def on_header(self, name: bytes, value: bytes) -> None:
        head = self._head
        if head is None:
            return  # a trailer: framing is done, nothing to forward it with
        head.size += len(name) + len(value) + 4
        if (
            head.size + len(head.url) > self._limits.max_head_bytes
            or len(head.fields) >= self._limits.max_headers
        ):
            raise _Refused(431, "The request headers are larger than this sidecar accepts.")
        head.fields.append((name, value))
        size = len(name)
        if size == 14 or size == 6 or size == 17 or size == 10 or size == 16:
            lower = name.lower()
            # Repeated fields are one list (RFC 9110 5.3): body_framing judges every
            # length and coding, and every Connection field names hop fields.
            if lower == b"content-length":
                lengths = head.lengths
                head.lengths = value if lengths is None else lengths + b", " + value
            elif lower == b"transfer-encoding":
                codings = head.codings
                head.codings = value if codings is None else codings + b", " + value
            elif lower == b"expect":
                if head.expect is None:
                    head.expect = value
            elif lower == b"connection":
                previous = head.connection
                head.connection = value if previous is None else previous + b", " + value
            elif lower == b"proxy-connection":
                head.proxy_connection = True

    def on_headers_complete(self) -> None:
        head = self._head
        assert head is not None
        # The request owns its head from here: an idle keep-alive connection holds no
        # copy of its last request's fields and URL.
        self._head = None
        parser = self._parser
        keep_alive = parser.should_keep_alive()
        if keep_alive and head.connection is None and not head.proxy_connection:
            # llhttp keeps a request alive without a Connection (or Proxy-Connection)
            # field only on HTTP/1.1 (major and minor both above 0): the version,
            # without get_http_version's str.format, 2.5% of a call's instructions.
            version = "1.1"
        else:
            version = parser.get_http_version()
            if keep_alive and head.codings is not None and version == "1.0":
                # RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty
                # framing (a hop before may have read its body otherwise): nothing after
                # it on this connection is trusted to be a request of its own.
                keep_alive = False
        if version not in ("1.1", "1.0"):
            if version.startswith("0"):
                raise _Refused(400, "HTTP/0.9 requests are not accepted; send HTTP/1.1.")
            raise _Refused(505, "This sidecar speaks HTTP/1.1 only; send HTTP/1.1 requests.")
        try:
            framing = body_framing("", 0, head.lengths, head.codings)
        except FramingError as exc:
            # e.g. `gzip, chunked`: llhttp would de-chunk it and the upstream would get
            # compressed bytes labelled as plain.
            raise _Refused(
                400, f"{exc}; send the body with Content-Length or Transfer-Encoding: chunked."
            ) from None
        method = parser.get_method()
        # llhttp upgrades only a CONNECT or a request whose Connection (or
        # Proxy-Connection) field says upgrade: without one, no need to ask.
        is_upgrade = (
            head.connection is not None or head.proxy_connection or method == b"CONNECT"
        ) and parser.should_upgrade()
        body: FeedStream | None = None
        if framing == CHUNKED or (framing > 0 and not is_upgrade):
            expect = head.expect
            body = FeedStream(
                loop=self._loop,
                pause=self._pause_for_body,
                resume=self._resume_for_body,
                high_water=self._limits.body_high_water,
                on_first_read=(
                    self._send_continue
                    if expect is not None
                    and version == "1.1"
                    and expect.lower().strip() == b"100-continue"
                    else None
                ),
            )
        self._body = body
        request = Request(
            method=method.decode("ascii"),
            target=head.url.decode("latin-1"),
            version=version,
            raw_headers=head.fields,
            content_length=framing if framing >= 0 else None,
            body=body,
            peer=self._peer,
            keep_alive=keep_alive and not is_upgrade,
            is_upgrade=is_upgrade,
            connection=head.connection,
        )
        self._queue.append(request)
        if not self._busy:
            self._busy = True
            self._cancel_timer()
            if self._task is None:
                self._task = self._loop.create_task(self._serve())
            elif self._waiter is not None and not self._waiter.done():
                self._waiter.set_result(None)
        elif not self._queue_paused:
            # A pipelined request waits its turn; read no further until it starts.
            self._queue_paused = True
            self._update_reading()

    def on_body(self, data: bytes) -> None:
        if self._body is not None:
            self._body.feed(data)

    def on_message_complete(self) -> None:
        if self._body is not None:
            self._body.feed_eof()
            self._body = None

    # Reading flow control

    def _pause_for_body(self) -> None:
        self._body_paused = True
        self._update_reading()

    def _resume_for_body(self) -> None:
        self._body_paused = False
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        if self._body_paused or self._queue_paused:
            transport.pause_reading()
        else:
            transport.resume_reading()

    def _send_continue(self) -> None:
        if not self._closed and self._transport is not None:
            self._transport.write(_CONTINUE)

    # Writing

    async def _drain(self) -> None:
        if self._closed:
            raise ConnectionResetError("the agent closed the connection")
        await self._writes.wait()
        if self._closed:
            raise ConnectionResetError("the agent closed the connection")

    async def _serve(self) -> None:
        """Answer the requests of this connection in order, waiting for each next one:
        one task for the connection's life, not one per request."""
        while True:
            if not self._queue:
                self._busy = False
                # A request head already begun (while busy) gets the header deadline.
                limits = self._limits
                begun = self._head is not None
                self._set_timer(limits.header_timeout if begun else limits.idle_timeout)
                if self._queue_paused:
                    self._queue_paused = False
                    self._update_reading()
                self._waiter = self._loop.create_future()
                await self._waiter  # cancelled when the connection ends
                self._waiter = None
                continue
            keep_alive = await self._answer(self._queue[0])
            del self._queue[0]
            if self._closed:
                return
            if not keep_alive or self._finishing:
                self._close()
                return
            if self._tunnel is not None:
                return

    async def _answer(self, request: Request) -> bool:
        """Run the app and write its answer; whether the connection stays open."""
        self._app_has = request
        try:
            response = await self._app(request)
        except asyncio.CancelledError:
            self._app_has = None
            raise
        except Exception:
            log.exception("the request handler failed")
            response = _INTERNAL_ERROR
        transport = self._transport
        assert transport is not None
        self._sent = 0
        keep_alive = False
        # No await in a `finally` or `except` here: a compiled coroutine (mypyc) that
        # awaits there loses the exceptions later thrown into it (setup.py).
        try:
            keep_alive = await self._write_response(transport, request, response)
        except asyncio.CancelledError as exc:
            closing = self._answered(response, exc)
            if closing is not None:
                # This task is being cancelled, so not here; held until done, as the loop
                # keeps only a weak reference to a task.
                task = self._loop.create_task(closing)
                _CLOSING.add(task)
                task.add_done_callback(_CLOSING.discard)
            raise
        except Exception as exc:
            # Mid-answer (the upstream broke, the agent left): the head is gone, so the
            # only honest signal left is the connection's end.
            self._close()
            closing = self._answered(response, exc)
        except BaseException:
            self._answered(response, None)
            raise
        else:
            closing = self._answered(response, None)
        if closing is not None:
            await closing
        if request.body is not None and not request.body.at_eof:
            keep_alive = await self._discard_body(request) and keep_alive
        return keep_alive

    def _answered(
        self, response: Response, error: BaseException | None
    ) -> Coroutine[Any, Any, None] | None:
        """Records the answer's end, before anything else may await: a hang-up there
        (cancelling this task) must not skip it. Returns the closing of a body that is
        an async generator, for the caller to await."""
        self._app_has = None
        body = response.body
        if isinstance(body, FeedStream):
            body.close()  # sync: the common case costs no await
        if response.on_done is not None:
            try:
                response.on_done(self._sent, error)
            except Exception:
                log.exception("recording the end of an answer failed")
        if body is not None and not isinstance(body, bytes | FeedStream):
            aclose = getattr(body, "aclose", None)
            if aclose is not None:
                closing: Coroutine[Any, Any, None] = aclose()
                return closing
        return None

    async def _discard_body(self, request: Request) -> bool:
        """Read and drop what is left of a body the answer did not need (a refusal):
        an agent still sending it would see a reset instead of the answer. True when
        the connection can serve the next request."""
        body = request.body
        assert body is not None
        if self._closed or not _discardable(request):
            body.close()
            return False
        try:
            async with asyncio.timeout(_DISCARD_TIMEOUT):
                async for _ in body:
                    pass
        except (TimeoutError, ConnectionError):
            body.close()
            return False
        return body.at_eof

    async def _write_response(
        self, transport: asyncio.Transport, request: Request, response: Response
    ) -> bool:
        status = response.status
        keep_alive = request.keep_alive and not self._finishing and _discardable(request)
        lines = response.head_lines
        headers: list[tuple[str, str]] = []
        if lines is None and response.no_framing:
            headers = list(response.headers)
        elif lines is None:
            for name, value in response.headers:
                if name.lower() in _FRAMING:
                    if name.lower() == "connection" and "close" in value.lower():
                        keep_alive = False
                    continue
                headers.append((name, value))
        if status == 101:
            if response.tunnel is None or not request.is_upgrade:
                raise RuntimeError("a 101 answer needs an upgrade request and a tunnel")
            headers.append(("Connection", "Upgrade"))
            head = head_bytes(status_line(101, response.reason), headers)
            self._sent = len(head)
            transport.write(head)
            self._open_tunnel(response.tunnel)
            return True
        if request.is_upgrade and response.tunnel is not None:
            response.tunnel.close()

        body = response.body
        length = len(body) if isinstance(body, bytes) else response.content_length
        http10 = request.version == "1.0"
        framing = send_framing(request.method, status, length, False, http10)
        # A HEAD's answer may say the length of the body it goes without.
        no_body = framing == NO_BODY or request.method == "HEAD"
        chunked = framing == CHUNKED
        if framing == UNTIL_CLOSE:
            keep_alive = False  # the body ends when the connection does
        # The framing this server writes itself, after the app's fields.
        fields = framing_field(framing)
        if not keep_alive:
            fields += b"Connection: close\r\n"
        elif http10:
            fields += b"Connection: keep-alive\r\n"
        if lines is None:
            lines = header_lines(headers)
        head = status_line(status, response.reason) + lines + fields + b"\r\n"

        if no_body or body is None:
            transport.write(head)
            self._sent = len(head)
            if chunked:
                transport.write(LAST_CHUNK)
            return keep_alive
        if isinstance(body, FeedStream) and body.complete:
            # The whole answer is already here (most are): one write, head and all.
            body = body.take_all()
            if length is not None and len(body) != length:
                raise RuntimeError("the answer's body does not match its Content-Length")
        if isinstance(body, bytes):
            data = head + (chunk(body) + LAST_CHUNK if chunked and body else body)
            if chunked and not body:
                data += LAST_CHUNK
            transport.write(data)
            self._sent = len(data)
            return keep_alive
        transport.write(head)
        self._sent = len(head)
        sent = 0
        async for data in body:
            if not data:
                continue
            sent += len(data)
            if length is not None and sent > length:
                raise RuntimeError("the answer's body is longer than its Content-Length")
            transport.write(chunk(data) if chunked else data)
            self._sent += len(data)
            if self._writes.paused or self._closed:
                await self._drain()
        if chunked:
            transport.write(LAST_CHUNK)
        elif length is not None and sent != length:
            # Short: the agent must see the answer cut, not wait for the rest.
            return False
        return keep_alive

    # Tunnel (after a 101)

    def _open_tunnel(self, tunnel: Tunnel) -> None:
        self._tunnel = tunnel
        self._queue_paused = False
        self._body_paused = False
        tunnel.attach(self)
        if self._upgrade_rest:
            rest, self._upgrade_rest = self._upgrade_rest, b""
            tunnel.write(rest)
        if self._writes.paused:
            tunnel.pause_reading()
        self._update_reading()

    def tunnel_data(self, data: bytes) -> None:
        if self._transport is not None and not self._closed:
            self._transport.write(data)

    def tunnel_closed(self) -> None:
        self._close()

    def tunnel_pause(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.pause_reading()

    def tunnel_resume(self) -> None:
        if self._transport is not None and not self._closed:
            self._transport.resume_reading()

    # Connection

    def _refuse_h2(self) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        transport.write(_H2_REFUSAL)
        self._close()

    def _refuse(self, status: int, detail: str) -> None:
        transport = self._transport
        if transport is None or self._closed:
            return
        if self._body is not None:
            self._body.set_error(ConnectionResetError("the request body was malformed"))
        if self._queue:
            if self._app_has is not None or len(self._queue) > 1:
                # The app already holds a request of this connection: the broken
                # body fails its read, and the connection ends.
                self._close()
                return
            # Parsed in the same read as the error: the app never sees it.
            if self._task is not None:
                self._task.cancel()
            self._queue.clear()
        transport.write(refusal_bytes(status, detail))
        self._close()

    def finish(self) -> None:
        """Close now if idle, else once the answer in progress is written."""
        self._finishing = True
        if not self._busy and self._tunnel is None:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _close(self) -> None:
        self._cancel_timer()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _set_timer(self, delay: float) -> None:
        # A deadline the listener's sweep checks: no timer object per request.
        if self._listener is not None:
            self._deadline = self._loop.time() + delay
            return
        self._cancel_timer()
        self._timer = self._loop.call_later(delay, self.time_out)

    def _cancel_timer(self) -> None:
        self._deadline = 0.0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def expired(self, now: float) -> bool:
        return 0.0 < self._deadline <= now

    def time_out(self) -> None:
        # A slow or silent agent: no answer is owed, close.
        self._timer = None
        self._deadline = 0.0
        if not self._busy:
            self._close()


class Listener:
    """A bound listener and its connections, so it can stop gracefully."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.name = name
        self.server: asyncio.Server | None = None
        self.connections: set[HttpServerProtocol] = set()
        self._all_closed: asyncio.Event | None = None
        # One sweep closes agents past their header or idle deadline, instead of a
        # timer made and cancelled for every request.
        self._every = min(1.0, limits.header_timeout / 4, limits.idle_timeout / 4)
        self._sweep: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._sweep = loop.call_later(self._every, self._sweep_once, loop)

    def _sweep_once(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        for connection in [c for c in self.connections if c.expired(now)]:
            connection.time_out()
        self._sweep = loop.call_later(self._every, self._sweep_once, loop)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        assert self.server is not None
        # Untyped: uvloop's `sockets` is a list where asyncio's is a tuple, and the
        # compiled module (mypyc) checks declared types at run time.
        sockets: Any = getattr(self.server, "sockets")  # noqa: B009
        return [s.getsockname()[:2] for s in sockets]

    def closed(self, connection: HttpServerProtocol) -> None:
        self.connections.discard(connection)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def shutdown(self, drain: float = 10.0) -> None:
        """Stop accepting; close idle connections now, busy ones after their answer,
        and whatever is left after `drain` seconds."""
        if self.server is not None:
            self.server.close()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._all_closed = asyncio.Event()
        for connection in list(self.connections):
            connection.finish()
        if self.connections:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain):
                    await self._all_closed.wait()
        for connection in list(self.connections):
            connection.abort()

    async def cleanup(self) -> None:
        await self.shutdown(0)


async def serve(
    app: App,
    host: str,
    port: int,
    *,
    limits: Limits | None = None,
    backlog: int = 1024,
    name: str = "http",
) -> Listener:
    """Listen on host:port; each connection gets its own `HttpServerProtocol`."""
    loop = asyncio.get_running_loop()
    shared = limits or Limits()
    listener = Listener(name, shared)

    def connection() -> HttpServerProtocol:
        protocol = HttpServerProtocol(app, shared, listener)
        listener.connections.add(protocol)
        return protocol

    listener.server = await loop.create_server(connection, host, port, backlog=backlog)
    listener.start()
    return listener
