"""A WebSocket tunnel whose agent messages a step judges (RFC 6455 framing).

After an upstream's 101 the egress relays raw bytes both ways (http/egress.py).
A step that must read the agent's messages (GraphQL over graphql-ws) gives the
call a `tunnel_filter`: the egress wraps the upstream's tunnel in a
`FilteredTunnel`, which

- reads the agent's frames (masked, as clients send them), puts a fragmented
  data message together, and hands each whole message to `judge`: passed on,
  its frames go to the upstream byte for byte; refused, they never do, and the
  judge's answer goes to the agent as a text frame instead;
- relays the upstream's bytes as they come, counting frame boundaries, so an
  answer of the sidecar's is written between two of the upstream's messages,
  never inside a frame or a fragmented message.

Control frames (ping, pong, close) pass at once. A message larger than
`limit`, or a frame with RSV bits (compression, which the step keeps from being
negotiated), cannot be judged: the connection is closed with 1009 or 1002.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Any, Protocol

# What `judge` makes of one agent message: None passes it on; bytes are the text of
# the sidecar's answer (the message is dropped); an int closes with that code.
Verdict = bytes | int | None
Judge = Callable[[bytes], Verdict]

TEXT = 0x1
BINARY = 0x2
CONTINUATION = 0x0
CLOSE = 0x8

MESSAGE_LIMIT = 1 << 20


class TunnelPeer(Protocol):
    def tunnel_data(self, data: bytes) -> None: ...

    def tunnel_closed(self) -> None: ...

    def tunnel_pause(self) -> None: ...

    def tunnel_resume(self) -> None: ...


class Tunnel(Protocol):
    def attach(self, peer: Any) -> None: ...

    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


def frame(opcode: int, payload: bytes, *, mask: bool = False) -> bytes:
    """One final frame; masked as a client sends it, or not, as a server does."""
    size = len(payload)
    head = bytes([0x80 | opcode])
    bit = 0x80 if mask else 0
    if size < 126:
        head += bytes([bit | size])
    elif size < 1 << 16:
        head += bytes([bit | 126]) + struct.pack("!H", size)
    else:
        head += bytes([bit | 127]) + struct.pack("!Q", size)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + _unmask(payload, key)


def close_frame(code: int, reason: str, *, mask: bool = False) -> bytes:
    return frame(CLOSE, struct.pack("!H", code) + reason.encode()[:120], mask=mask)


def _unmask(payload: bytes, key: bytes) -> bytes:
    size = len(payload)
    if not size:
        return payload
    keys = (key * (size // 4 + 1))[:size]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(keys, "big")).to_bytes(size, "big")


def _head_size(head: bytes | bytearray) -> int:
    """The size of a frame's head once its first two bytes are known."""
    size = head[1] & 0x7F
    extra = 2 if size == 126 else 8 if size == 127 else 0
    return 2 + extra + (4 if head[1] & 0x80 else 0)


def _payload_size(head: bytes | bytearray) -> int:
    size = head[1] & 0x7F
    if size == 126:
        return int(struct.unpack_from("!H", head, 2)[0])
    if size == 127:
        return int(struct.unpack_from("!Q", head, 2)[0])
    return size


class _Boundaries:
    """The upstream's side: bytes relayed as they come, frame boundaries counted, so
    that frames of the sidecar's own go out only between two whole messages."""

    __slots__ = ("head", "in_message", "pending", "remaining")

    def __init__(self) -> None:
        self.head = bytearray()
        self.remaining = 0
        self.in_message = False  # a fragmented data message is under way
        self.pending: list[bytes] = []

    @property
    def between(self) -> bool:
        return not self.head and self.remaining == 0 and not self.in_message

    def feed(self, data: bytes) -> bytes:
        out: list[bytes] = []
        i = 0
        n = len(data)
        while i < n:
            if self.remaining:
                take = min(self.remaining, n - i)
                out.append(data[i : i + take])
                i += take
                self.remaining -= take
                if not self.remaining:
                    self._done(out)
                continue
            head = self.head
            need = 2 if len(head) < 2 else _head_size(head)
            take = min(need - len(head), n - i)
            head += data[i : i + take]
            i += take
            if len(head) < 2 or len(head) < _head_size(head):
                continue
            out.append(bytes(head))
            self.remaining = _payload_size(head)
            opcode = head[0] & 0x0F
            fin = bool(head[0] & 0x80)
            if opcode in (TEXT, BINARY) and not fin:
                self.in_message = True
            elif opcode == CONTINUATION and fin:
                self.in_message = False
            head.clear()
            if not self.remaining:
                self._done(out)
        return b"".join(out)

    def _done(self, out: list[bytes]) -> None:
        if self.pending and not self.in_message:
            out.extend(self.pending)
            self.pending.clear()


class FilteredTunnel:
    """The upstream's tunnel, with the agent's messages judged on their way."""

    def __init__(self, inner: Tunnel, judge: Judge, *, limit: int = MESSAGE_LIMIT) -> None:
        self._inner = inner
        self._judge = judge
        self._limit = limit
        self._peer: TunnelPeer | None = None
        self._in = bytearray()  # the agent's bytes not yet a whole frame
        self._frames: list[bytes] = []  # the data message being put together, as sent
        self._payload: list[bytes] = []  # ... and unmasked
        self._size = 0
        self._out = _Boundaries()
        self._closing = False

    # The listener's side: it writes the agent's bytes here.

    def attach(self, peer: TunnelPeer) -> None:
        self._peer = peer
        self._inner.attach(self)

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        buffer = self._in
        buffer += data
        forward: list[bytes] = []
        start = 0
        while len(buffer) - start >= 2:
            head = buffer[start : start + 14]
            size = _head_size(head)
            if len(buffer) - start < size:
                break
            length = _payload_size(head)
            if head[0] & 0x70:
                self._fail(forward, 1002, "compressed or extended frames are not read")
                return
            if length > self._limit or self._size + length > self._limit:
                self._fail(forward, 1009, "message too large for the sidecar to check")
                return
            end = start + size + length
            if len(buffer) < end:
                break
            raw = bytes(buffer[start:end])
            start = end
            payload = raw[size:]
            if head[1] & 0x80:
                payload = _unmask(payload, raw[size - 4 : size])
            self._frame(raw, head[0] & 0x0F, bool(head[0] & 0x80), payload, forward)
            if self._closing:
                return
        del buffer[:start]
        if forward:
            self._inner.write(b"".join(forward))

    def close(self) -> None:
        self._inner.close()

    def pause_reading(self) -> None:
        self._inner.pause_reading()

    def resume_reading(self) -> None:
        self._inner.resume_reading()

    # The upstream's side: its tunnel delivers here.

    def tunnel_data(self, data: bytes) -> None:
        if self._peer is not None:
            self._peer.tunnel_data(self._out.feed(data))

    def tunnel_closed(self) -> None:
        if self._peer is not None:
            self._peer.tunnel_closed()

    def tunnel_pause(self) -> None:
        if self._peer is not None:
            self._peer.tunnel_pause()

    def tunnel_resume(self) -> None:
        if self._peer is not None:
            self._peer.tunnel_resume()

    # Judging

    def _frame(
        self, raw: bytes, opcode: int, fin: bool, payload: bytes, forward: list[bytes]
    ) -> None:
        if opcode >= CLOSE:
            forward.append(raw)  # control frames may come between a message's fragments
            return
        if opcode == CONTINUATION and not self._frames:
            forward.append(raw)  # nothing to continue: the upstream will refuse it
            return
        self._frames.append(raw)
        self._payload.append(payload)
        self._size += len(payload)
        if not fin:
            return
        frames, message = self._frames, b"".join(self._payload)
        self._frames, self._payload, self._size = [], [], 0
        verdict = self._judge(message)
        if verdict is None:
            forward.extend(frames)
        elif isinstance(verdict, int):
            self._fail(forward, verdict, "message refused by the sidecar")
        else:
            self._answer(frame(TEXT, verdict))

    def _answer(self, data: bytes) -> None:
        out = self._out
        if out.between:
            if self._peer is not None:
                self._peer.tunnel_data(data)
        else:
            out.pending.append(data)

    def _fail(self, forward: list[bytes], code: int, reason: str) -> None:
        """Close both ends with `code`: what was judged before goes first."""
        self._closing = True
        forward.append(close_frame(code, reason, mask=True))
        self._inner.write(b"".join(forward))
        forward.clear()
        self._answer(close_frame(code, reason))
        self._inner.close()
