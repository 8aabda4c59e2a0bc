"""Each exchange's state is its own: calls in a row on one kept-alive upstream
connection (and requests on one agent connection), over real sockets, each read as
it was framed, with nothing of the previous one (its framing, its fields, its
failure) in the next."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sidecar.http.listener import Request, Response
from sidecar.http.pool import Pool, ResetError

from .dataplane import exchange, listening, read_response


class _Script:
    """An upstream that answers the n-th request on any connection with `answers[n]`,
    reading each request's head (and a Content-Length body), and counts connections."""

    def __init__(self, answers: list[bytes]) -> None:
        self.answers = answers
        self.served = 0
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.served < len(self.answers):
                head = await reader.readuntil(b"\r\n\r\n")
                for line in head.lower().split(b"\r\n"):
                    if line.startswith(b"content-length:"):
                        await reader.readexactly(int(line[15:]))
                answer = self.answers[self.served]
                self.served += 1
                writer.write(answer)
                await writer.drain()
            await reader.read()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()


Scripted = Callable[[list[bytes]], Awaitable[_Script]]


@pytest.fixture
async def script() -> AsyncIterator[Scripted]:
    """`await script(answers)`: a started _Script, its address in .url."""
    started: list[_Script] = []

    async def start(answers: list[bytes]) -> _Script:
        one = _Script(answers)
        await one.start()
        started.append(one)
        return one

    yield start
    for one in started:
        one.server.close()


async def _body(reply_body: AsyncIterator[bytes]) -> bytes:
    return b"".join([data async for data in reply_body])


async def test_a_chunked_answer_then_a_content_length_one_on_one_connection(
    script: Scripted,
) -> None:
    upstream = await script(
        [
            b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nConnection: X-Hop\r\n"
            b"Location: /a\r\nX-First: 1\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            # A HEAD's answer: its Content-Length (9) frames nothing, not the next answer.
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nz\r\n0\r\n\r\n",
        ]
    )
    pool = Pool(upstream.url)
    async with asyncio.timeout(10):
        first = await pool.request("GET", "/1", [])
        assert (first.status, first.reason, first.content_length) == (201, "Created", None)
        assert first.connection == b"X-Hop" and first.refers
        assert await _body(first.body) == b"abcde"
        first.release()

        second = await pool.request("GET", "/2", [])
        # Nothing of the chunked answer: not its framing, fields, reason or hop list.
        assert (second.status, second.reason, second.content_length) == (200, "OK", 2)
        assert second.connection is None and not second.refers
        assert "X-First" not in second.headers and "Location" not in second.headers
        assert second.data == b"ok"
        second.release()

        head = await pool.request("HEAD", "/3", [])
        assert (head.status, head.content_length, head.data) == (200, 9, b"")
        head.release()

        last = await pool.request("GET", "/4", [])
        assert (last.status, last.content_length) == (200, None)
        assert await _body(last.body) == b"z"
        last.release()
    assert upstream.connections == 1 and pool.connections_opened == 1
    assert pool.idle_connections == 1
    pool.close()


async def test_an_answer_after_an_interim_one_carries_none_of_its_fields(
    script: Scripted,
) -> None:
    upstream = await script(
        [
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\nContent-Location: /x\r\n"
            b"Connection: X-Interim\r\n\r\n"
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nk"
        ]
    )
    pool = Pool(upstream.url)
    async with asyncio.timeout(10):
        reply = await pool.request("GET", "/", [])
        assert (reply.status, reply.reason, reply.content_length) == (200, "OK", 1)
        assert reply.connection is None and not reply.refers
        assert "Link" not in reply.headers
        assert reply.data == b"k"
        reply.release()
    pool.close()


async def test_a_call_whose_answer_cannot_be_framed_fails_and_the_next_one_is_whole(
    script: Scripted,
) -> None:
    upstream = await script(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            # Relayed, the body would go on still gzipped with the coding dropped.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nX-Bad: 1\r\n\r\n"
            b"3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngood",
        ]
    )
    pool = Pool(upstream.url)
    async with asyncio.timeout(10):
        reply = await pool.request("GET", "/1", [])
        assert reply.data == b"ok"
        reply.release()
        with pytest.raises(ResetError, match="Transfer-Encoding other than chunked"):
            await pool.request("GET", "/2", [])
        assert pool.idle_connections == 0  # a connection that misframed is not reused
        good = await pool.request("GET", "/3", [])
        assert (good.status, good.content_length, good.data) == (200, 4, b"good")
        assert "X-Bad" not in good.headers
        good.release()
    assert upstream.connections == 2
    pool.close()


def _policy(url: str) -> str:
    return f"""
    version: 1
    services:
      s:
        upstream: {url}
    """


async def test_through_the_sidecar_a_chunked_then_a_sized_answer_reach_the_agent_whole(
    script: Scripted, start_sidecar
) -> None:
    """The same two answers on one upstream connection, through the sidecar, on one
    kept-alive agent connection: each is written with its own framing."""
    upstream = await script(
        [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ]
    )
    sc = await start_sidecar(_policy(upstream.url))
    reader, writer = await asyncio.open_connection(*_address(sc.url))
    try:
        async with asyncio.timeout(10):
            writer.write(b"GET /s/1 HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == b"abc"
            assert b"transfer-encoding: chunked" in head.lower()
            writer.write(b"GET /s/2 HTTP/1.1\r\nHost: x\r\n\r\n")
            head, body = await read_response(reader)
            assert head.startswith(b"HTTP/1.1 200") and body == b"ok"
            assert b"content-length: 2" in head.lower()
            assert b"transfer-encoding" not in head.lower()
    finally:
        writer.close()
    assert upstream.connections == 1


async def test_through_the_sidecar_an_unframeable_answer_is_502_and_the_next_call_is_whole(
    script: Scripted, start_sidecar
) -> None:
    upstream = await script(
        [
            b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        ]
    )
    sc = await start_sidecar(_policy(upstream.url))
    address = _address(sc.url)
    close = b"Host: x\r\nConnection: close\r\n\r\n"
    answer = await exchange(address, b"GET /s/1 HTTP/1.1\r\n" + close)
    assert answer.startswith(b"HTTP/1.1 502"), answer[:200]
    assert b"X-Sidecar-Error: upstream_unreachable" in answer
    answer = await exchange(address, b"GET /s/2 HTTP/1.1\r\n" + close)
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(b"\r\n\r\nok")
    assert upstream.connections == 2


def _address(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").partition(":")
    return host, int(port)


async def test_each_request_on_a_kept_alive_agent_connection_is_read_afresh() -> None:
    """The listener's side: a chunked request with Expect, then one sized without it,
    then one with no body, on one connection; none is read with another's fields."""
    seen: list[tuple[int | None, bool, bytes]] = []

    async def app(request: Request) -> Response:
        body = b"" if request.body is None else b"".join([d async for d in request.body])
        seen.append((request.content_length, request.body is None, body))
        return Response(200, body=body)

    async with listening(app) as address:
        reader, writer = await asyncio.open_connection(*address)
        try:
            async with asyncio.timeout(10):
                writer.write(
                    b"POST /1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                    b"Expect: 100-continue\r\nX-First: 1\r\n\r\n"
                )
                assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
                writer.write(b"3\r\nabc\r\n0\r\n\r\n")
                _, body = await read_response(reader)
                assert body == b"abc"
                writer.write(b"POST /2 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nde")
                # No 100 Continue: the Expect was the first request's.
                head, body = await read_response(reader)
                assert head.startswith(b"HTTP/1.1 200") and body == b"de"
                writer.write(b"GET /3 HTTP/1.1\r\nHost: x\r\n\r\n")
                head, body = await read_response(reader)
                assert head.startswith(b"HTTP/1.1 200") and body == b""
        finally:
            writer.close()
    assert seen == [(None, False, b"abc"), (2, False, b"de"), (None, True, b"")]


@pytest.mark.parametrize(
    ("first", "status", "body"),
    [
        # RFC 9112 6.1: an HTTP/1.0 answer with Transfer-Encoding has faulty framing, even
        # when it asks to be kept alive: it is read, and its connection carries no other
        # call (a hop that read it as 1.0 would split what follows differently).
        (
            b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            200,
            b"ok",
        ),
        # A broken upstream that switches protocols on a plain GET: what follows its 101
        # on that connection is no longer HTTP.
        (
            b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n",
            101,
            b"",
        ),
    ],
    ids=["http-1.0-chunked", "unasked-101"],
)
async def test_an_answer_that_ends_its_connections_use_is_not_followed_on_it(
    script: Scripted, first: bytes, status: int, body: bytes
) -> None:
    upstream = await script([first, b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nnext"])
    pool = Pool(upstream.url)
    async with asyncio.timeout(10):
        reply = await pool.request("GET", "/1", [])
        assert reply.status == status
        if body:
            assert await _body(reply.body) == body
        reply.release()
        assert pool.idle_connections == 0
        second = await pool.request("GET", "/2", [])
        assert (second.status, second.data) == (200, b"next")
        second.release()
    assert upstream.connections == 2
    pool.close()
