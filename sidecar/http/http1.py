"""HTTP/1.1 wire helpers shared by the listener and the upstream pool.

How a message's body is framed is decided here only: `body_framing` for a message
read, `send_framing` for one written.

A message head is serialized once into bytes; a body is a `BodyStream`, an
async iterator of byte chunks with `aclose()` (httpx's AsyncByteStream), so the
listener, the pool, a cache or a mock all hand bodies over the same way.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from http import HTTPStatus
from typing import Final, Protocol

from ..core.headers import HOP_BY_HOP, IDEMPOTENT, FieldNames, unsafe_field

__all__ = [
    "CHUNKED",
    "HOP_BY_HOP",
    "IDEMPOTENT",
    "LAST_CHUNK",
    "NO_BODY",
    "UNTIL_CLOSE",
    "BodyStream",
    "BytesStream",
    "FeedStream",
    "FramingError",
    "Tunnel",
    "TunnelPeer",
    "body_framing",
    "chunk",
    "content_length",
    "framing_field",
    "head_bytes",
    "header_lines",
    "raw_header_lines",
    "send_framing",
    "status_line",
]

LAST_CHUNK: Final = b"0\r\n\r\n"

# Every status the stdlib knows, serialized once; an unknown one is built on demand.
_STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode("latin-1") for s in HTTPStatus
}
_PHRASES: Final[dict[int, str]] = {s.value: s.phrase for s in HTTPStatus}


def status_line(status: int, reason: str | None = None) -> bytes:
    """`HTTP/1.1 <status> <reason>\\r\\n`; the standard phrase when `reason` is None."""
    if reason is None or reason == _PHRASES.get(status):
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
        reason = ""
    _check_field(reason)
    return f"HTTP/1.1 {status} {reason}\r\n".encode("latin-1")


def head_bytes(first_line: bytes, headers: Iterable[tuple[str, str]]) -> bytes:
    """A message head: the first line, `Name: value` lines, the blank line.

    A CR, LF or NUL in a name or value raises ValueError: written as is, it would
    let a header value split the message (response splitting).
    """
    return first_line + header_lines(headers) + b"\r\n"


def header_lines(headers: Iterable[tuple[str, str]]) -> bytes:
    """`Name: value\\r\\n` lines; ValueError for a CR, LF or NUL in a field."""
    lines = [f"{name}: {value}\r\n" for name, value in headers]
    text = "".join(lines)
    # One pass over the whole head instead of three per field: each line holds
    # exactly one CR and one LF, its own.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines) or "\0" in text:
        for line in lines:
            _check_field(line[:-2])
    return text.encode("latin-1")


def content_length(value: bytes) -> int | None:
    """A Content-Length field's number; None unless it is all ASCII digits.

    Compiled digit by digit: int(bytes) is a call through the int type, and
    bytes.isdigit() a method call, for a value of a few digits on every message.
    """
    if not value:
        return None
    number = 0
    for byte in value:
        if byte < 48 or byte > 57:
            return None
        number = number * 10 + (byte - 48)
    return number


# How a message's body is framed (RFC 9112 6.3), as one int: a length >= 0 is
# Content-Length N, and these the rest. An int, not an object: deciding costs no
# allocation in the compiled modules, on every message both ways.
NO_BODY: Final = -1  # none, whatever the fields say (a HEAD's answer, 1xx, 204, 304)
CHUNKED: Final = -2
UNTIL_CLOSE: Final = -3  # an answer with neither field: it ends with its connection


class FramingError(ValueError):
    """A message whose body cannot be framed safely (conflicting or invalid fields):
    read on, it could be split differently by the next hop (request smuggling).
    The text names fields, never their values."""


def body_framing(method: str, status: int, lengths: bytes | None, codings: bytes | None) -> int:
    """How the body of a message as read is framed: the one place this is decided,
    for the agents' requests (`status` 0) and the upstreams' answers (`method` is the
    call's). `lengths` and `codings` are every Content-Length and Transfer-Encoding
    field's value, repeated fields joined with ", " (RFC 9110 5.3); None when absent.

    Returns a length (>= 0), CHUNKED, UNTIL_CLOSE or NO_BODY; raises FramingError for
    fields that conflict or that this proxy cannot relay. llhttp, which splits the
    bytes, frames them the same way and refuses the same conflicts (it is stricter
    still: it refuses a repeated Content-Length even when the values agree).
    """
    # Conflicts first, whatever the status: llhttp refuses them before it knows
    # whether the message has a body at all.
    length = -1  # no Content-Length
    if lengths is not None:
        if codings is not None:
            # RFC 9112 6.1: a sender must not send both, and the two hops could each
            # read a different one.
            raise FramingError("Content-Length and Transfer-Encoding together")
        length = _declared_length(lengths)
    if status and (status < 200 or status == 204 or status == 304 or method == "HEAD"):
        return NO_BODY  # RFC 9112 6.3, rule 1: the fields describe another message
    if codings is not None:
        if codings == b"chunked" or codings.strip().lower() == b"chunked":
            return CHUNKED
        # De-chunked, a body under another coding (gzip, chunked) would go on with
        # its coding dropped (Transfer-Encoding is hop-by-hop); alone, it is read
        # until close, which no request can be.
        raise FramingError("Transfer-Encoding other than chunked is not accepted")
    if length >= 0:
        return length
    return UNTIL_CLOSE if status else NO_BODY


def _declared_length(lengths: bytes) -> int:
    number = content_length(lengths)
    if number is not None:
        return number
    # A list (repeated fields, or one field "42, 42"): RFC 9110 8.6 allows it when
    # every member is the same number.
    first = -1
    for member in lengths.split(b","):
        number = content_length(member.strip())
        if number is None:
            raise FramingError("Content-Length is not a number")
        if first >= 0 and number != first:
            raise FramingError("Content-Length fields that disagree")
        first = number
    return first


def send_framing(method: str, status: int, length: int | None, streamed: bool, http10: bool) -> int:
    """How this side frames a message it sends: an answer (`status`) to a `method`,
    or a call (`status` 0). `length` is the body's size when known; `streamed`, a
    call's body of unknown size; `http10`, an answer to an HTTP/1.0 agent, which
    cannot read chunked. The same codes as `body_framing`, which the next hop's
    parser then reads back."""
    if status:
        if status < 200 or status == 204 or status == 304:
            return NO_BODY
        if length is not None:
            return length  # a HEAD's answer too: the length of the GET's body
        if method == "HEAD":
            return NO_BODY
        return UNTIL_CLOSE if http10 else CHUNKED
    if length is None:
        return CHUNKED if streamed else NO_BODY
    # An empty GET goes without a Content-Length: 0, as clients send it.
    return length if length or method not in IDEMPOTENT else NO_BODY


def framing_field(framing: int) -> bytes:
    """The header line that says `framing` (from `send_framing`) to the reader."""
    if framing >= 0:
        return b"Content-Length: %d\r\n" % framing
    if framing == CHUNKED:
        return b"Transfer-Encoding: chunked\r\n"
    return b""


def raw_header_lines(headers: Iterable[tuple[bytes, bytes]], drop: FieldNames) -> bytes:
    """`Name: value\\r\\n` lines of fields as a parser read them, leaving out the names
    in `drop`: a head relayed without decoding a byte.

    Not checked for CR, LF or NUL, unlike `header_lines`: llhttp refuses a message
    with any of them in a field, and `Call.set_header`, the one way a step adds a
    raw field, checks its own. A check here cost 6% of a proxied call's instructions.
    """
    # One join over every piece: a join per field cost more than the field's copy.
    parts: list[bytes] = []
    for name, value in headers:
        if not drop.has(name):
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
    return b"".join(parts)


def _check_field(text: str) -> None:
    if unsafe_field(text):
        # The field's name only: its value may be a credential.
        raise ValueError(f"CR, LF or NUL in the header field {text.partition(':')[0][:64]!r}")


def chunk(data: bytes) -> bytes:
    """One chunk of a chunked body (never empty: an empty chunk ends the body)."""
    return b"%x\r\n%b\r\n" % (len(data), data)


class BodyStream:
    """A body as an async iterator of non-empty byte chunks.

    Iterate it once; call `aclose()` when done or abandoning it, so whoever
    feeds it can reuse or close the connection underneath.
    """

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        raise StopAsyncIteration

    async def aclose(self) -> None:
        return None


class BytesStream(BodyStream):
    """A body held in memory, yielded as one chunk."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    async def __anext__(self) -> bytes:
        data, self._data = self._data, b""
        if not data:
            raise StopAsyncIteration
        return data

    async def aclose(self) -> None:
        self._data = b""


class FeedStream(BodyStream):
    """A body fed by a protocol as it reads from a socket, consumed by a task.

    Buffered bytes above `high_water` call `pause()` (the protocol stops reading
    its transport); once the consumer drains them to `high_water // 4` or less,
    `resume()`. `on_first_read` runs once, at the consumer's first read (the
    listener answers `Expect: 100-continue` there); `on_close` runs once when
    the consumer closes the stream, whether or not it read to the end.
    """

    __slots__ = (
        "_buffered",
        "_chunks",
        "_closed",
        "_eof",
        "_error",
        "_high_water",
        "_loop",
        "_low_water",
        "_on_first_read",
        "_pause",
        "_paused",
        "_resume",
        "_waiter",
        "on_close",
    )

    def __init__(
        self,
        *,
        pause: Callable[[], None],
        resume: Callable[[], None],
        high_water: int = 65536,
        on_first_read: Callable[[], None] | None = None,
        on_close: Callable[[], None] | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # Given by the protocol that feeds it: asking asyncio for the running loop at
        # each wait costs a getpid() system call (its fork check), per streamed chunk.
        self._loop = loop
        self._chunks: deque[bytes] = deque()
        self._buffered = 0
        self._eof = False
        self._closed = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._pause = pause
        self._resume = resume
        self._paused = False
        self._high_water = high_water
        self._low_water = high_water // 4
        self._on_first_read = on_first_read
        self.on_close = on_close

    @property
    def at_eof(self) -> bool:
        """The whole body arrived and was consumed."""
        return self._eof and not self._chunks

    @property
    def complete(self) -> bool:
        """The whole body arrived (consumed or not)."""
        return self._eof

    @property
    def buffered(self) -> int:
        return self._buffered

    # The feeding protocol's side.

    def feed(self, data: bytes) -> None:
        if self._closed:
            return  # the consumer gave up; the connection will not be reused
        self._chunks.append(data)
        self._buffered += len(data)
        if self._buffered > self._high_water and not self._paused:
            self._paused = True
            self._pause()
        self._wake()

    def feed_eof(self) -> None:
        self._eof = True
        self._wake()

    def set_error(self, error: BaseException) -> None:
        """The connection failed before the body ended: the next read raises `error`."""
        if not self._eof:
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # The consumer's side.

    async def __anext__(self) -> bytes:
        if self._on_first_read is not None:
            first_read, self._on_first_read = self._on_first_read, None
            first_read()
        while not self._chunks:
            if self._eof or self._closed:
                raise StopAsyncIteration
            if self._error is not None:
                raise self._error
            loop = self._loop
            if loop is None:
                loop = self._loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            await self._waiter
        data = self._chunks.popleft()
        self._buffered -= len(data)
        if self._paused and self._buffered <= self._low_water:
            self._paused = False
            self._resume()
        return data

    def take_all(self) -> bytes:
        """Everything buffered, at once: for a body already `complete`, the whole of it."""
        if self._error is not None and not self._chunks:
            raise self._error
        data = b"".join(self._chunks)
        self._chunks.clear()
        self._buffered = 0
        if self._on_first_read is not None:
            first_read, self._on_first_read = self._on_first_read, None
            first_read()
        if self._paused:
            self._paused = False
            self._resume()
        return data

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        """`aclose()` for sync callers."""
        if self._closed:
            return
        self._closed = True
        self._chunks.clear()
        self._buffered = 0
        if self._paused:
            self._paused = False
            self._resume()
        self._wake()
        if self.on_close is not None:
            on_close, self.on_close = self.on_close, None
            on_close()


class TunnelPeer(Protocol):
    """The side a `Tunnel` delivers to (the listener's agent connection)."""

    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_closed(self) -> None: ...

    def tunnel_pause(self) -> None:
        """The tunnel's write buffer is full: stop reading from the peer's socket."""

    def tunnel_resume(self) -> None: ...


class Tunnel(Protocol):
    """One end of an upgraded connection (e.g. an upstream after a 101): raw bytes."""

    def attach(self, peer: TunnelPeer) -> None:
        """Start delivering bytes (first those already read) and events to `peer`."""

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class WriteGate:
    """Write flow control of one transport: the protocol's pause_writing/resume_writing
    open and close it; a writer awaits `wait()` before writing more. `wake()` on
    connection loss releases a waiting writer, which then sees the closed connection."""

    __slots__ = ("_loop", "_waiter", "paused")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiter: asyncio.Future[None] | None = None
        self.paused = False

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        self.wake()

    async def wait(self) -> None:
        if not self.paused:
            return
        waiter = self._loop.create_future()
        self._waiter = waiter
        await waiter

    def wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
