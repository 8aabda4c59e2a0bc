"""A socket of the relay once its login is done: what arrives goes straight into the
connection's Framer, and the one coroutine waiting for it is woken.

asyncio's streams put a StreamReaderProtocol, a StreamReader buffer, a copy per
read() and a future per wait between the socket and the framer, all in
interpreted Python; the relay makes two reads per transaction, so it takes the
transport over from them (`transport.set_protocol`) once the login, TLS
included, is done. Flow control is kept both ways: reading pauses while more
than HIGH_WATER bytes wait in the framer, and `drain()` waits while the
transport's write buffer is full.
"""

from __future__ import annotations

import asyncio
from typing import Final, cast

from . import protocol as pg

# Past this many unread bytes the socket is not read until the relay catches up.
HIGH_WATER: Final = 256 * 1024


class Channel:
    """The protocol of one relayed transport (duck-typed: asyncio and uvloop call these
    methods on whatever `set_protocol` was given)."""

    def __init__(self, transport: asyncio.Transport, framer: pg.Framer) -> None:
        self.transport = transport
        self.framer = framer
        self.closed = False
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._drain: asyncio.Future[None] | None = None
        self._paused = False
        self._writing_paused = False

    @classmethod
    def take_over(
        cls, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, framer: pg.Framer
    ) -> Channel:
        """Move `writer`'s transport from asyncio's streams to a Channel feeding `framer`,
        with whatever the StreamReader had buffered and not yet handed out."""
        # A stream's transport reads too (WriteTransport is only how StreamWriter types it).
        transport = cast(asyncio.Transport, writer.transport)
        channel = cls(transport, framer)
        # The StreamReader's own buffer: bytes already received that nothing read yet.
        buffered = getattr(reader, "_buffer", None)
        if buffered:
            framer.feed(bytes(buffered))
            buffered.clear()
        if reader.at_eof() or transport.is_closing():
            channel.closed = True
        else:
            transport.set_protocol(channel)  # type: ignore[arg-type]
            # The streams may have paused reading for their own full buffer.
            transport.resume_reading()
        return channel

    # -- the transport's calls ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass

    def data_received(self, data: bytes) -> None:
        framer = self.framer
        framer.feed(data)
        if framer.pending > HIGH_WATER and not self._paused:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool:
        self.closed = True
        self._wake()
        return False  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.error = exc
        self._wake()
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        drain = self._drain
        if drain is not None and not drain.done():
            drain.set_result(None)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # -- the relay's calls --------------------------------------------------------------

    async def receive(self) -> bool:
        """Wait for more bytes in the framer; False when the peer closed (or reset) the
        connection."""
        if self._paused:
            self._paused = False
            self.transport.resume_reading()
        pending = self.framer.pending
        while not self.closed and self.framer.pending == pending:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            await waiter
        return self.framer.pending != pending

    def write(self, data: bytes | bytearray) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        """Wait while the transport's write buffer is over its high-water mark."""
        if self.closed:
            raise ConnectionResetError("the connection was closed")
        if not self._writing_paused:
            return
        drain = asyncio.get_running_loop().create_future()
        self._drain = drain
        await drain
        if self.closed:
            raise ConnectionResetError("the connection was closed")
