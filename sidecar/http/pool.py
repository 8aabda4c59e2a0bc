"""The upstream HTTP/1.1 client: a keep-alive connection pool per origin on httptools.

`Pool(origin)` keeps idle connections to one (scheme, host, port); `request()`
writes a call (body streamed, with write flow control) and returns as soon as
the answer's head arrived, its body a `FeedStream` that pauses the upstream
socket while the consumer lags. Failures raise the `UpstreamError` hierarchy,
mapped once by the caller to the sidecar's own answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from typing import Final, Protocol, cast
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDictProxy

from ..core.headers import FieldNames, decode_fields
from .http1 import (
    CHUNKED,
    IDEMPOTENT,
    LAST_CHUNK,
    NO_BODY,
    UNTIL_CLOSE,
    FeedStream,
    FramingError,
    TunnelPeer,
    WriteGate,
    body_framing,
    chunk,
    content_length,
    framing_field,
    header_lines,
    raw_header_lines,
    send_framing,
)

# Written by the pool itself from the origin and the body; the caller's are dropped.
_OWN_HEADERS: Final = frozenset({"host", "content-length", "transfer-encoding"})
_OWN_HEADERS_RAW: Final = FieldNames(name.encode("latin-1") for name in _OWN_HEADERS)


class UpstreamError(Exception):
    """A call that got no complete answer from the upstream."""


class ConnectError(UpstreamError):
    """No connection: DNS, refused, unreachable."""


class ConnectTimeout(ConnectError):
    """No connection within the connect timeout."""


class TLSError(ConnectError):
    """The TLS handshake failed; `str()` says why in words fit for an error body."""


class ResetError(UpstreamError):
    """The connection closed (or broke) before the whole answer arrived."""


@dataclass(frozen=True, slots=True)
class Origin:
    scheme: str  # "http" or "https"
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Origin:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) origin: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(parts.scheme, parts.hostname, port)

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"


class Resolver:
    """`loop.getaddrinfo` with answers cached for `ttl` seconds; share one per process."""

    def __init__(self, *, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._cache: dict[tuple[str, int], tuple[float, list[tuple[str, int]]]] = {}

    async def resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses = list(dict.fromkeys((str(i[4][0]), int(i[4][1])) for i in infos))
        self._cache[(host, port)] = (now + self.ttl, addresses)
        return addresses


class AddressSource(Protocol):
    """What a pool resolves its origin through: a `Resolver`, or one that also judges
    the addresses (the webhook deliveries' guard refuses private ones by raising an
    OSError, reported as the ConnectError it causes)."""

    async def resolve(self, host: str, port: int) -> list[tuple[str, int]]: ...


class _Exchange:
    """One call on a connection, from its head written to its answer's end.

    Made fresh for each call (as uvicorn's RequestResponseCycle is for each request),
    never reset field by field: a field a reset forgot cannot carry one call's answer
    into the next, and the `UpstreamReply` made of it keeps reading its own call's
    state even once the connection carries another. A plain class (compiled, its
    fields are native slots): one small allocation per call.
    """

    __slots__ = (
        "answered",
        "body",
        "codings",
        "connection",
        "error",
        "final",
        "framing",
        "got_bytes",
        "in_head",
        "keep_alive",
        "lengths",
        "message_done",
        "method",
        "pending",
        "pending_paused",
        "pending_size",
        "raw",
        "reason",
        "refers",
        "sender",
        "status",
    )

    def __init__(self, method: str, answered: asyncio.Future[None]) -> None:
        self.method = method
        self.answered = answered  # done at the answer's head (or its failure)
        self.got_bytes = False  # the upstream sent anything: the call is not replayable
        self.status = 0
        self.reason = ""
        # The answer's head as read: decoded only if a step asks (UpstreamReply.headers).
        self.raw: list[tuple[bytes, bytes]] = []
        # Every Content-Length and Transfer-Encoding value, joined: body_framing's input.
        self.lengths: bytes | None = None
        self.codings: bytes | None = None
        self.connection: bytes | None = None  # every Connection field, joined
        self.refers = False  # a Location or Content-Location: a URL a proxy may rewrite
        self.in_head = False
        self.final = False  # the answer's own head came (not an interim one's)
        self.framing = NO_BODY  # body_framing's verdict, once the final head came
        # The body read before anyone asked for it: most answers arrive whole with their
        # head, and are then handed over as bytes, with no stream (UpstreamReply.data).
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.pending_paused = False
        self.error: UpstreamError | None = None  # the connection failed before the end
        self.body: FeedStream | None = None  # once the answer is known to stream
        self.message_done = False
        self.keep_alive = False
        # Sends a streamed request body, possibly still after the answer's head came.
        self.sender: asyncio.Task[None] | None = None

    def interim_over(self) -> None:
        """An interim answer (100 Continue, 103 Early Hints) ended: its fields are not
        the real answer's, which follows on the same exchange."""
        self.reason = ""
        self.raw = []
        self.lengths = self.codings = self.connection = None
        self.refers = False


class _Connection(asyncio.Protocol):
    """One upstream connection; at most one exchange at a time."""

    def __init__(self, pool: Pool) -> None:
        self._pool = pool
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._parser = httptools.HttpResponseParser(self)
        self._writes = WriteGate(self._loop)
        # While pooled: when the pool's sweep closes it (0: in use).
        self.idle_until = 0.0
        # The call in progress (and, after a 101, the one that opened the tunnel);
        # None while idle, when any answer is one nobody asked for.
        self.exchange: _Exchange | None = None
        # After a 101: raw bytes go to the tunnel's peer.
        self._upgrade_rest = b""
        self._peer: TunnelPeer | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_idle()
        self._pool._forget(self)
        ex = self.exchange
        if ex is not None:
            if exc is None and ex.final and ex.framing == UNTIL_CLOSE:
                # An answer framed by neither Content-Length nor chunked ends where its
                # connection does (RFC 9112 6.3): a clean close is its end, not a cut.
                self.on_message_complete()
            error = ResetError("the upstream closed the connection before the whole answer")
            if not ex.answered.done():
                ex.answered.set_exception(error)
            _broken(ex, error)
        self._writes.wake()
        if self._peer is not None:
            self._peer.tunnel_closed()

    def data_received(self, data: bytes) -> None:
        if self._peer is not None:
            self._peer.tunnel_data(data)
            return
        ex = self.exchange
        if ex is not None:
            if ex.status == 101:
                # Upgraded, tunnel not attached yet: these bytes are the tunnel's, not HTTP.
                self._upgrade_rest += data
                return
            ex.got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self._upgrade_rest = data[upgrade.args[0] :]
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _HeadDone):
                # The answer to a HEAD has no body, whatever its Content-Length says;
                # llhttp cannot be told so, so the next answer gets a fresh parser.
                self._parser = httptools.HttpResponseParser(self)
                self.on_message_complete()
            elif isinstance(cause, FramingError):
                self._fail(ResetError(f"the upstream's answer could not be read: {cause}"))
            else:
                self._fail(ResetError(f"the upstream's answer could not be read: {exc}"))
        except httptools.HttpParserError as exc:
            self._fail(ResetError(f"the upstream's answer could not be read: {exc}"))

    def _fail(self, error: UpstreamError) -> None:
        ex = self.exchange
        if ex is not None:
            if not ex.answered.done():
                ex.answered.set_exception(error)
            _broken(ex, error)
        self.close()

    def pause_writing(self) -> None:
        self._writes.pause()
        if self._peer is not None:
            self._peer.tunnel_pause()

    def resume_writing(self) -> None:
        self._writes.resume()
        if self._peer is not None:
            self._peer.tunnel_resume()

    # httptools callbacks: each runs within a call's exchange (on_message_begin
    # refuses an answer outside one).

    def on_message_begin(self) -> None:
        ex = self.exchange
        if ex is None or ex.message_done:
            # An answer no call asked for (after the whole one, or on an idle
            # connection): the connection can no longer be trusted to frame answers.
            raise _Unasked
        ex.in_head = True

    def on_status(self, reason: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        ex.reason += reason.decode("latin-1")

    def on_header(self, name: bytes, value: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        if ex.in_head:  # else a trailer, not forwarded
            ex.raw.append((name, value))
            size = len(name)
            if size == 14 or size == 10 or size == 8 or size == 16 or size == 17:
                lower = name.lower()
                # Repeated fields are one list (RFC 9110 5.3): body_framing reads them all.
                if lower == b"transfer-encoding":
                    codings = ex.codings
                    ex.codings = value if codings is None else codings + b", " + value
                elif lower == b"content-length":
                    lengths = ex.lengths
                    ex.lengths = value if lengths is None else lengths + b", " + value
                elif lower == b"connection":
                    previous = ex.connection
                    ex.connection = value if previous is None else previous + b", " + value
                elif lower == b"location" or lower == b"content-location":
                    ex.refers = True

    def on_headers_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        ex.in_head = False
        status = self._parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # Interim (100 Continue, 103 Early Hints): the real answer follows.
            ex.interim_over()
            return
        ex.framing = body_framing(ex.method, status, ex.lengths, ex.codings)
        ex.final = True
        ex.status = status
        keep_alive = self._parser.should_keep_alive()
        if (
            keep_alive
            and ex.codings is not None
            and ex.connection is not None  # llhttp keeps a 1.0 answer alive only if asked
            and self._parser.get_http_version() == "1.0"
        ):
            # RFC 9112 6.1: an HTTP/1.0 answer with Transfer-Encoding has faulty framing
            # (a hop that read it as 1.0 would split what follows differently): read, and
            # its connection closed. The version (a str.format) is read for such answers only.
            keep_alive = False
        ex.keep_alive = keep_alive
        if not ex.answered.done():
            ex.answered.set_result(None)
        if ex.method == "HEAD":
            # llhttp frames every answer as body_framing does but a HEAD's: it cannot
            # be told which call an answer is for.
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        body = ex.body
        if body is not None:
            body.feed(data)
            return
        ex.pending.append(data)
        ex.pending_size += len(data)
        if ex.pending_size > self._pool.high_water and not ex.pending_paused:
            # Until the caller takes the answer: the stream made for it then resumes.
            ex.pending_paused = True
            self._pause_reading()

    def on_message_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        if not ex.final:
            return  # the end of an interim answer
        ex.message_done = True
        if ex.body is not None:
            ex.body.feed_eof()
        elif ex.pending_paused:
            ex.pending_paused = False
            self._resume_reading()  # all of it is here: the next answer may be read

    def open_body(self, ex: _Exchange) -> FeedStream:
        """The answer's body as a stream: what was read so far, then the rest."""
        body = ex.body = FeedStream(
            loop=self._loop,
            pause=self._pause_reading,
            resume=self._resume_reading,
            high_water=self._pool.high_water,
        )
        ex.pending_paused = False  # the stream's own flow control takes over
        for data in ex.pending:
            body.feed(data)
        ex.pending = []
        if ex.message_done:
            body.feed_eof()
        elif ex.error is not None:
            body.set_error(ex.error)
        return body

    # Flow control

    def _pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    async def drain(self) -> None:
        if self.closed:
            raise ResetError("the upstream closed the connection while the call was sent")
        await self._writes.wait()
        if self.closed:
            raise ResetError("the upstream closed the connection while the call was sent")

    # Exchange

    def begin(self, method: str) -> _Exchange:
        """A fresh exchange for the next call: nothing of the last one carries over."""
        self._cancel_idle()
        ex = self.exchange = _Exchange(method, self._loop.create_future())
        return ex

    def reusable(self) -> bool:
        ex = self.exchange
        if ex is None or self.closed or not ex.message_done or not ex.keep_alive:
            return False
        if ex.status == 101:
            # What follows a 101 on the connection is no longer HTTP, asked for or not.
            return False
        sender = ex.sender
        return (
            # Read whole from the socket; a stream made of it need not be consumed.
            (ex.body is None or ex.body.at_eof)
            # The whole call went out: the upstream waits for no more of its body.
            and (
                sender is None
                or (sender.done() and not sender.cancelled() and sender.exception() is None)
            )
        )

    def idle(self, until: float) -> None:
        # The call's state goes with its reply: an idle connection keeps none of it.
        self.exchange = None
        self.idle_until = until

    def _cancel_idle(self) -> None:
        self.idle_until = 0.0

    def close(self) -> None:
        self._cancel_idle()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    # Tunnel (after a 101); this object is then the `Tunnel` itself.

    def attach(self, peer: TunnelPeer) -> None:
        self._peer = peer
        if self._upgrade_rest:
            rest, self._upgrade_rest = self._upgrade_rest, b""
            peer.tunnel_data(rest)
        if self.closed:
            peer.tunnel_closed()
        elif self._writes.paused:
            peer.tunnel_pause()

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def pause_reading(self) -> None:
        self._pause_reading()

    def resume_reading(self) -> None:
        self._resume_reading()


def _broken(ex: _Exchange, error: UpstreamError) -> None:
    """The connection failed: the call's body, if it has not ended, fails with `error`."""
    if ex.message_done:
        return
    if ex.body is not None:
        ex.body.set_error(error)
    else:
        ex.error = error


class _HeadDone(Exception):
    """Stops the parser at the end of a HEAD answer's head."""


class _Unasked(Exception):
    """Stops the parser at an answer that no call is waiting for."""


class UpstreamReply:
    """An upstream's answer: head now, body as it arrives.

    An answer whose body arrived whole with its head (most) has it in `data`; `body`
    is a stream in every case, made when first asked for. Call `release()` when done
    (from sync code too): the connection returns to the pool if the body was read to
    its end and both sides keep it alive, and is closed otherwise. Closing `body`
    releases too.
    """

    __slots__ = (
        "_conn",
        "_ex",
        "_headers",
        "_pool",
        "_released",
        "_stream",
        "connection",
        "content_length",
        "data",
        "raw_headers",
        "reason",
        "refers",
        "status",
    )

    def __init__(self, pool: Pool, conn: _Connection, ex: _Exchange) -> None:
        self._pool = pool
        self._conn = conn
        # This call's own exchange: what release() reads is this call's, whatever
        # the connection carries by then.
        self._ex = ex
        self._released = False
        self.status = ex.status
        self.reason = ex.reason
        # The head as the upstream sent it, names and values as bytes: the egress
        # relays it from these without decoding it (most steps never look).
        self.raw_headers = ex.raw
        self.connection = ex.connection
        self.refers = ex.refers
        self._headers: CIMultiDictProxy[str] | None = None
        framing = ex.framing
        if framing >= 0:
            self.content_length: int | None = framing
        else:
            # A HEAD's or a 304's too: the length its GET's body has, relayed as is.
            lengths = ex.lengths
            self.content_length = content_length(lengths) if lengths is not None else None
        self._stream: FeedStream | None = None
        self.data: bytes | None = None
        if ex.message_done:
            pending = ex.pending
            self.data = pending[0] if len(pending) == 1 else b"".join(pending)
            ex.pending = []
        else:
            self._stream = conn.open_body(ex)
            self._stream.on_close = self.release

    @property
    def body(self) -> FeedStream:
        stream = self._stream
        if stream is None:
            # A whole answer asked for as a stream: one already at its end, apart from
            # the connection, which may already be carrying another call.
            stream = self._stream = FeedStream(
                loop=self._conn._loop, pause=_nothing, resume=_nothing
            )
            if self.data:
                stream.feed(self.data)
            stream.feed_eof()
            stream.on_close = self.release
        return stream

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDictProxy(decode_fields(self.raw_headers))
        return headers

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        if self._stream is not None:
            self._stream.close()
        sender = self._ex.sender
        if sender is not None and not sender.done():
            # Answered before the whole body was sent: the upstream still waits for the
            # rest, so this connection can carry no other call.
            sender.cancel()
            self._conn.close()
        self._pool._put_back(self._conn)

    def detach(self) -> _Connection:
        """The raw connection after a 101, as a `Tunnel`; it never returns to the pool."""
        if self.status != 101:
            raise RuntimeError("only a 101 answer has a connection to detach")
        self._released = True
        self._pool._forget(self._conn)
        return self._conn


def _nothing() -> None:
    return None


class Pool:
    """Keep-alive connections to one origin."""

    def __init__(
        self,
        origin: Origin | str,
        *,
        connect_timeout: float = 10.0,
        idle_timeout: float = 30.0,
        max_idle: int = 64,
        high_water: int = 64 * 1024,
        ssl_context: ssl.SSLContext | None = None,
        resolver: AddressSource | None = None,
    ) -> None:
        self.origin = origin if isinstance(origin, Origin) else Origin.parse(origin)
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle
        self.high_water = high_water
        # The default context is made at the first connection, not here: it loads the
        # system's CA store (2.3 MiB), which an idle sidecar never needs.
        self._tls = self.origin.scheme == "https"
        self._ssl: ssl.SSLContext | None = ssl_context if self._tls else None
        self._resolver: AddressSource = resolver or Resolver()
        self._idle: list[_Connection] = []
        self._every = min(1.0, idle_timeout / 4)
        self._sweep: asyncio.TimerHandle | None = None
        self._host_line = b"Host: %b\r\n" % self.origin.host_header.encode("latin-1")
        # Counters for tests and metrics: connections opened, calls retried.
        self.connections_opened = 0
        self.retries = 0

    async def request(
        self,
        method: str,
        target: str,
        headers: Iterable[tuple[str, str]],
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        content_length: int | None = None,
        raw_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> UpstreamReply:
        """Send one call; returns at the answer's head (the body streams after).

        `raw_headers`, when given, are sent instead of `headers`: fields as a parser
        read them (bytes), relayed as they are.
        """
        if isinstance(body, FeedStream) and body.complete:
            # All of it came with the head (most calls): one write, no sender task.
            body = body.take_all()
        streamed = body is not None and not isinstance(body, bytes)
        if isinstance(body, bytes):
            content_length = len(body)
        if raw_headers is not None:
            lines = raw_header_lines(raw_headers, _OWN_HEADERS_RAW)
        else:
            lines = header_lines(h for h in headers if h[0].lower() not in _OWN_HEADERS)
        framing = send_framing(method, 0, content_length, streamed, False)
        chunked = framing == CHUNKED
        head = b"".join(
            (
                method.encode("latin-1"),
                b" ",
                target.encode("latin-1"),
                b" HTTP/1.1\r\n",
                self._host_line,
                lines,
                framing_field(framing),
                b"\r\n",
            )
        )
        replayable = method in IDEMPOTENT and not streamed

        conn = self._idle_connection()
        reused = conn is not None
        if conn is None:
            conn = await self._connect()
        try:
            if body is None or isinstance(body, bytes):
                # _exchange's whole-body path, inline: no coroutine more per call.
                ex = conn.begin(method)
                transport = conn.transport
                assert transport is not None
                try:
                    transport.write(head + body if body else head)
                    await ex.answered
                except BaseException:
                    conn.close()
                    raise
                return UpstreamReply(self, conn, ex)
            return await self._exchange(conn, method, head, body, chunked)
        except ResetError:
            failed = conn.exchange
            if not (reused and replayable and failed is not None and not failed.got_bytes):
                raise
        # A kept-alive connection the upstream had closed: once more, on a fresh one.
        self.retries += 1
        conn = await self._connect()
        return await self._exchange(conn, method, head, body, chunked)

    async def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | AsyncIterable[bytes] | None,
        chunked: bool,
    ) -> UpstreamReply:
        ex = conn.begin(method)
        answered = ex.answered
        transport = conn.transport
        assert transport is not None
        sender: asyncio.Task[None] | None = None
        try:
            if body is None or isinstance(body, bytes):
                transport.write(head + body if body else head)
            else:
                transport.write(head)
                # The upstream may answer before the upload ends (a 413, say).
                sender = ex.sender = asyncio.ensure_future(_send_body(conn, body, chunked))
                sender.add_done_callback(_retrieved)
                await asyncio.wait({sender, answered}, return_when=asyncio.FIRST_COMPLETED)
                if sender.done() and sender.exception() is not None:
                    conn.close()
                    sender.result()
            await answered
        except BaseException:
            if sender is not None:
                sender.cancel()
            conn.close()
            raise
        return UpstreamReply(self, conn, ex)

    def _idle_connection(self) -> _Connection | None:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed:
                return conn
        return None

    async def _connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        origin = self.origin
        if self._tls and self._ssl is None:
            self._ssl = _default_tls()
        try:
            async with asyncio.timeout(self.connect_timeout):
                try:
                    addresses = await self._resolver.resolve(origin.host, origin.port)
                except OSError as exc:
                    raise ConnectError(f"cannot resolve {origin.host}") from exc
                last: OSError | None = None
                for host, port in addresses:
                    try:
                        _, conn = await loop.create_connection(
                            lambda: _Connection(self),
                            host,
                            port,
                            ssl=self._ssl,
                            server_hostname=origin.host if self._ssl else None,
                        )
                    except ssl.SSLCertVerificationError as exc:
                        raise TLSError("its TLS certificate was not accepted") from exc
                    except ssl.SSLError as exc:
                        raise TLSError("the TLS handshake failed") from exc
                    except OSError as exc:
                        last = exc
                        continue
                    self.connections_opened += 1
                    return conn
                raise ConnectError(
                    f"{origin.host}:{origin.port} refused or dropped the connection"
                ) from last
        except TimeoutError as exc:
            raise ConnectTimeout(
                f"{origin.host}:{origin.port} did not accept a connection within "
                f"{self.connect_timeout:g}s"
            ) from exc

    def _put_back(self, conn: _Connection) -> None:
        if conn.reusable() and len(self._idle) < self.max_idle:
            loop = conn._loop
            conn.idle(loop.time() + self.idle_timeout)
            self._idle.append(conn)
            if self._sweep is None:
                self._sweep = loop.call_later(self._every, self._sweep_idle, loop)
        else:
            conn.close()

    def _sweep_idle(self, loop: asyncio.AbstractEventLoop) -> None:
        # One timer per pool, not one per pooled connection: put back is on every call.
        now = loop.time()
        for conn in [c for c in self._idle if c.idle_until <= now]:
            conn.close()
        self._sweep = loop.call_later(self._every, self._sweep_idle, loop) if self._idle else None

    def _forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)

    @property
    def idle_connections(self) -> int:
        return len(self._idle)

    def close(self) -> None:
        """Close every idle connection; ones in use close when released."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


def _retrieved(task: asyncio.Task[None]) -> None:
    # A sender that failed after the answer came is not an error of the call's.
    if not task.cancelled():
        task.exception()


async def _send_body(conn: _Connection, body: AsyncIterable[bytes], chunked: bool) -> None:
    transport = conn.transport
    assert transport is not None
    async for data in body:
        if not data:
            continue
        if conn.closed:
            raise ResetError("the upstream closed the connection while the call was sent")
        transport.write(chunk(data) if chunked else data)
        await conn.drain()
    if chunked and not conn.closed:
        transport.write(LAST_CHUNK)


@functools.cache
def _default_tls() -> ssl.SSLContext:
    # One for the process: each context loads the system's CA store (megabytes).
    context = ssl.create_default_context()
    context.set_alpn_protocols(["http/1.1"])
    return context
