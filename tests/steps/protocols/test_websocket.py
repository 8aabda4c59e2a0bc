"""The judged WebSocket tunnel on byte strings: frames as an agent and an upstream send
them, split anywhere, in and out of `FilteredTunnel`."""

from __future__ import annotations

import struct

from sidecar.steps.protocols.websocket import (
    BINARY,
    CONTINUATION,
    TEXT,
    FilteredTunnel,
    Verdict,
    frame,
)


class Upstream:
    """The upstream's end of the tunnel: what the filter wrote to it."""

    def __init__(self) -> None:
        self.written = b""
        self.closed = False
        self.peer: FilteredTunnel | None = None

    def attach(self, peer: FilteredTunnel) -> None:
        self.peer = peer

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


class Agent:
    """The listener's side: what reached the agent."""

    def __init__(self) -> None:
        self.received = b""

    def tunnel_data(self, data: bytes) -> None:
        self.received += data

    def tunnel_closed(self) -> None:
        pass

    def tunnel_pause(self) -> None:
        pass

    def tunnel_resume(self) -> None:
        pass


def _fragment(opcode: int, payload: bytes, fin: bool, *, mask: bool) -> bytes:
    data = frame(opcode, payload, mask=mask)
    return bytes([(0x80 if fin else 0) | opcode]) + data[1:]


def judged(verdicts: dict[bytes, Verdict]) -> tuple[FilteredTunnel, Upstream, Agent, list[bytes]]:
    seen: list[bytes] = []

    def judge(message: bytes) -> Verdict:
        seen.append(message)
        return verdicts.get(message)

    upstream, agent = Upstream(), Agent()
    tunnel = FilteredTunnel(upstream, judge, limit=1000)
    tunnel.attach(agent)
    return tunnel, upstream, agent, seen


def test_a_fragmented_message_is_judged_whole_and_sent_as_it_came() -> None:
    tunnel, upstream, _, seen = judged({})
    sent = (
        _fragment(TEXT, b"hel", False, mask=True)
        + frame(0x9, b"ping", mask=True)  # a control frame between fragments
        + _fragment(CONTINUATION, b"lo", True, mask=True)
    )
    for i in range(len(sent)):  # one byte at a time
        tunnel.write(sent[i : i + 1])
    assert seen == [b"hello"]
    ping = frame(0x9, b"ping", mask=True)
    assert len(upstream.written) == len(sent)
    # The ping went first (it came before the message ended), the fragments as sent.
    assert upstream.written[:2] == ping[:2]


def test_a_refused_message_never_reaches_the_upstream_and_is_answered() -> None:
    tunnel, upstream, agent, _ = judged({b"no": b'{"type":"error"}'})
    tunnel.write(frame(TEXT, b"no", mask=True) + frame(BINARY, b"ok", mask=True))
    assert agent.received == frame(TEXT, b'{"type":"error"}')
    assert len(upstream.written) == len(frame(BINARY, b"ok", mask=True))


def test_an_answer_waits_for_the_end_of_the_upstreams_message() -> None:
    tunnel, _, agent, _ = judged({b"no": b"refused"})
    first = _fragment(TEXT, b"a" * 200, False, mask=False)
    tunnel.tunnel_data(first[:10])  # mid-frame
    tunnel.write(frame(TEXT, b"no", mask=True))
    tunnel.tunnel_data(first[10:])  # the frame ends; its message does not
    assert agent.received == first
    last = _fragment(CONTINUATION, b"b", True, mask=False)
    tunnel.tunnel_data(last)
    assert agent.received == first + last + frame(TEXT, b"refused")


def test_a_message_over_the_limit_closes_both_ends_with_1009() -> None:
    tunnel, upstream, agent, seen = judged({})
    tunnel.write(frame(TEXT, b"x" * 1001, mask=True))
    assert seen == []
    assert upstream.closed
    assert agent.received[2:4] == struct.pack("!H", 1009)
