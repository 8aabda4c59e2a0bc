"""The agent-facing HTTP/1.1 listener, over real sockets: framing, refusals, flow control."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.http.http1 import content_length
from sidecar.http.listener import Limits, Request, Response
from tests.conftest import Counting, echo_app
from tests.helpers import eventually

from .dataplane import exchange, listening, proxy, read_response

Upstream = Callable[[web.Application], Awaitable[str]]

GOOD = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"

REFUSED = {
    "cl_and_te": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "two_content_lengths": b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
    b"Content-Length: 4\r\n\r\nabcd",
    "invalid_chunk_size": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nabc\r\n0\r\n\r\n",
    "obs_fold": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: a\r\n b\r\n\r\n",
    "bare_lf": b"GET / HTTP/1.1\nHost: x\n\n",
    "bare_cr": b"GET / HTTP/1.1\r\nHost: x\rX-A: b\r\n\r\n",
    "nul_in_header": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: b\x00c\r\n\r\n",
    "http_0_9": b"GET /\r\n\r\n",
    "oversized_url": b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    "oversized_headers": b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 40000 + b"\r\n\r\n",
    "too_many_headers": b"GET / HTTP/1.1\r\n"
    + b"".join(b"X-%d: a\r\n" % i for i in range(101))
    + b"\r\n",
    "te_not_chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nabc",
    # De-chunked, the body would reach the upstream still gzipped but labelled plain.
    "te_coding_then_chunked": b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, "
    b"chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
}


def _status(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


@pytest.mark.parametrize("name", sorted(REFUSED))
async def test_malformed_requests_are_refused_and_never_forwarded(
    upstream: Upstream, name: str
) -> None:
    counting = Counting()
    url = await upstream(counting.app())
    async with proxy(url) as address:
        answer = await exchange(address, REFUSED[name])
    head, _, body = answer.partition(b"\r\n\r\n")
    assert _status(answer) in (400, 414, 431), answer[:200]
    assert b"X-Sidecar-Error: bad_request" in head
    assert b"Server: agent-sidecar" in head
    assert b"Content-Type: application/problem+json" in head
    problem = json.loads(body)
    assert problem["reason"] == "bad_request" and problem["status"] == _status(answer)
    assert counting.hits == 0


async def test_http2_prior_knowledge_gets_505(upstream: Upstream) -> None:
    counting = Counting()
    async with proxy(await upstream(counting.app())) as address:
        answer = await exchange(address, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    # Answered in HTTP/2 framing (tests/http/test_wire.py reads it frame by frame).
    assert answer[3] == 0x4  # the server's SETTINGS first
    assert b"\x08\x03505" in answer
    assert b"HTTP/1.1 only" in answer
    assert counting.hits == 0


async def test_pipelined_requests_are_answered_in_order(upstream: Upstream) -> None:
    async with proxy(await upstream(echo_app())) as address:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(
            b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
            b"POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nde\r\n0\r\n\r\n"
            b"GET /4 HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        paths = []
        for _ in range(4):
            _, body = await read_response(reader)
            echoed = json.loads(body)
            paths.append((echoed["path"], echoed["body"]))
        writer.close()
    assert paths == [("/1", ""), ("/2", "abc"), ("/3", "de"), ("/4", "")]


async def test_connection_close_from_the_agent_closes_after_the_answer(
    upstream: Upstream,
) -> None:
    async with proxy(await upstream(echo_app())) as address:
        answer = await exchange(address, b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(answer) == 200
    assert b"Connection: close" in answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["path"] == "/a"


# llhttp keeps an HTTP/1.0 request alive when either field asks: the version must
# still be read as 1.0 (the listener takes a shortcut only without them).
@pytest.mark.parametrize(
    "fields", [b"", b"Connection: keep-alive\r\n", b"Proxy-Connection: keep-alive\r\n"]
)
async def test_http_1_0_answer_without_length_is_close_delimited(fields: bytes) -> None:
    versions: list[str] = []

    async def stream() -> AsyncIterator[bytes]:
        yield b"one,"
        yield b"two"

    async def app(request: Request) -> Response:
        versions.append(request.version)
        return Response(200, body=stream())

    async with listening(app) as address:
        answer = await exchange(address, b"GET / HTTP/1.0\r\n" + fields + b"\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Transfer-Encoding" not in head and b"Content-Length" not in head
    assert body == b"one,two"
    assert versions == ["1.0"]


# RFC 9112 6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing, whatever
# keeps it alive: the hop before may have read its body otherwise (until close, say),
# so what follows on the connection is not trusted to be a request of its own.
@pytest.mark.parametrize(
    "fields", [b"Connection: keep-alive\r\n", b"Proxy-Connection: keep-alive\r\n"]
)
async def test_an_http_1_0_request_with_transfer_encoding_closes_after_its_answer(
    fields: bytes,
) -> None:
    paths: list[str] = []

    async def app(request: Request) -> Response:
        paths.append(request.target)
        body = b"" if request.body is None else b"".join([d async for d in request.body])
        return Response(200, body=body)

    async with listening(app) as address:
        answer = await exchange(
            address,
            b"POST /1 HTTP/1.0\r\nHost: x\r\n" + fields + b"Transfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n"
            b"GET /smuggled HTTP/1.0\r\nHost: x\r\n" + fields + b"\r\n",
            limit=5,
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"Connection: close" in head
    assert body == b"abc"
    assert paths == ["/1"]


async def test_chunked_answer_for_a_stream_without_length(client: aiohttp.ClientSession) -> None:
    async def stream() -> AsyncIterator[bytes]:
        for part in (b"data: 1\n\n", b"data: 2\n\n"):
            yield part

    async def app(request: Request) -> Response:
        return Response(200, headers=[("Content-Type", "text/event-stream")], body=stream())

    async with listening(app) as (host, port), client.get(f"http://{host}:{port}/") as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        assert await resp.read() == b"data: 1\n\ndata: 2\n\n"


@pytest.mark.parametrize("status", [204, 304])
async def test_no_body_statuses_and_head(status: int) -> None:
    async def app(request: Request) -> Response:
        return Response(status if request.method == "GET" else 200, body=b"never sent")

    async with listening(app) as address:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\nHEAD / HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await reader.readuntil(b"\r\n\r\n")
        second = await reader.readuntil(b"\r\n\r\n")
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        rest = await reader.read()
        writer.close()
    assert _status(first) == status and b"Content-Length" not in first
    assert _status(second) == 200 and b"Content-Length: 10" in second
    # Nothing of either body was written: the next bytes are the third answer.
    assert rest.startswith(b"HTTP/1.1 %d" % status)


async def test_expect_100_continue_answered_when_the_body_is_read() -> None:
    async def app(request: Request) -> Response:
        assert request.body is not None
        body = b"".join([data async for data in request.body])
        return Response(200, body=body)

    async with listening(app) as address:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await reader.readuntil(b"\r\n\r\n")
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        _, body = await read_response(reader)
        writer.close()
    assert body == b"hello"


async def test_slowloris_header_timeout_closes_the_connection() -> None:
    reached = []

    async def app(request: Request) -> Response:
        reached.append(request)
        return Response(200)

    async with listening(app, Limits(header_timeout=0.2)) as address:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
    assert reached == []


async def test_idle_keep_alive_timeout_closes_the_connection() -> None:
    async def app(request: Request) -> Response:
        return Response(200, body=b"ok")

    async with listening(app, Limits(idle_timeout=0.2)) as address:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(GOOD)
        await read_response(reader)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()


async def test_agent_disconnect_cancels_the_app_task() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def app(request: Request) -> Response:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return Response(200)

    async with listening(app) as address:
        _, writer = await asyncio.open_connection(*address)
        writer.write(GOOD)
        await asyncio.wait_for(started.wait(), 10)
        writer.close()
        await asyncio.wait_for(cancelled.wait(), 10)


async def test_slow_reader_of_a_large_answer_keeps_buffers_bounded() -> None:
    produced = 0
    piece = b"x" * 65536

    async def huge() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(16384):  # 1 GiB if nothing held it back
            produced += len(piece)
            yield piece

    async def app(request: Request) -> Response:
        return Response(200, body=huge(), content_length=len(piece) * 16384)

    async with listening(app) as address:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
        await asyncio.get_running_loop().sock_sendall(sock, GOOD)
        last = -1

        def settled() -> bool:
            nonlocal last
            stalled = produced == last and produced > 0
            last = produced
            return stalled

        # The producer stops once the socket buffers and one high-water mark are full.
        await eventually(settled, "the answer's producer to stall", every=0.2)
        assert produced < 16 * 1024 * 1024
        # Reading resumes it.
        received = 0
        while received < 4 * 1024 * 1024:
            received += len(await asyncio.get_running_loop().sock_recv(sock, 1 << 20))
        await eventually(lambda: produced > last, "the producer to resume")
        sock.close()


async def test_request_body_over_high_water_pauses_reading() -> None:
    got = asyncio.Event()
    release = asyncio.Event()
    seen: list[Request] = []

    async def app(request: Request) -> Response:
        seen.append(request)
        got.set()
        await release.wait()
        assert request.body is not None
        size = 0
        async for data in request.body:
            size += len(data)
        return Response(200, body=str(size).encode())

    total = 8 * 1024 * 1024
    async with listening(app, Limits(body_high_water=65536)) as address:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
        sender = asyncio.ensure_future(_send_zeros(writer, total))
        await asyncio.wait_for(got.wait(), 10)
        body = seen[0].body
        assert body is not None
        await eventually(lambda: body.buffered > 65536, "the body buffer to pass high water")
        await asyncio.sleep(0.2)  # let more arrive if reading were not paused
        assert body.buffered < 1024 * 1024
        release.set()
        _, answer = await read_response(reader)
        await sender
        writer.close()
    assert int(answer) == total


async def _send_zeros(writer: asyncio.StreamWriter, total: int) -> None:
    block = b"\0" * 65536
    for _ in range(total // len(block)):
        writer.write(block)
        await writer.drain()


async def test_app_failure_is_a_500_problem() -> None:
    async def app(request: Request) -> Response:
        raise RuntimeError("boom")

    async with listening(app) as address:
        answer = await exchange(address, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert _status(answer) == 500 and b"X-Sidecar-Error: internal_error" in answer


# The parser boundary, fuzzed: every connection ends with an answer or a close, and
# nothing escapes the protocol (an escaped exception would fail the app's assert).

_SEEDS = [GOOD, *REFUSED.values(), b"POST / HTTP/1.1\r\nContent-Length: 2\r\n\r\nab"]


@st.composite
def _request_bytes(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        at = draw(st.integers(0, len(data)))
        kind = draw(st.integers(0, 2))
        if kind == 0:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif kind == 1 and at < len(data):
            del data[at : at + draw(st.integers(1, 8))]
        elif at < len(data):
            data[at] = draw(st.sampled_from(b"\r\n\0 :\t\x7f\xff-0"))
    return bytes(data)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.one_of(_request_bytes(), st.binary(max_size=200)))
def test_fuzzed_requests_get_an_answer_or_a_close(data: bytes) -> None:
    async def app(request: Request) -> Response:
        return Response(200, body=b"ok")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        errors: list[dict[str, object]] = []
        loop.set_exception_handler(lambda _loop, context: errors.append(context))
        async with listening(app, Limits(header_timeout=0.5, idle_timeout=0.5)) as address:
            reader, writer = await asyncio.open_connection(*address)
            writer.write(data)
            # Answers, then a close (or the idle/header timeout's close); never a hang.
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
        assert errors == []

    asyncio.run(run())


@given(st.binary(max_size=30) | st.integers(min_value=0, max_value=10**40).map(lambda n: b"%d" % n))
def test_content_length_reads_what_int_reads_for_digits_only(value: bytes) -> None:
    expected = int(value) if value and all(48 <= b <= 57 for b in value) else None
    assert content_length(value) == expected
