"""The upstream pool over real sockets, alone and behind the listener (a tiny proxy)."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar.http.pool import ConnectError, Pool, ResetError, TLSError
from tests.conftest import echo_app

from .dataplane import proxy, read_response

Upstream = Callable[[web.Application], Awaitable[str]]


def _peers_app(peers: set[int]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        peername = request.transport.get_extra_info("peername") if request.transport else None
        peers.add(peername[1])
        if request.path == "/head":
            return web.Response(body=b"x" * 10)
        if request.path == "/big":
            return web.Response(body=b"x" * (8 << 20))
        if request.path == "/204":
            return web.Response(status=204)
        if request.path == "/304":
            return web.Response(status=304, headers={"ETag": '"a"'})
        if request.path == "/stream":
            resp = web.StreamResponse()
            await resp.prepare(request)
            for part in (b"one,", b"two,", b"three"):
                await resp.write(part)
            await resp.write_eof()
            return resp  # type: ignore[return-value]
        return web.Response(body=await request.read() or b"ok")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def _read(reply_body: AsyncIterator[bytes]) -> bytes:
    return b"".join([data async for data in reply_body])


async def test_keep_alive_reuses_one_connection(upstream: Upstream) -> None:
    peers: set[int] = set()
    pool = Pool(await upstream(_peers_app(peers)))
    for path in ("/a", "/head", "/204", "/304", "/stream", "/b"):
        method = "HEAD" if path == "/head" else "GET"
        reply = await pool.request(method, path, [])
        body = await _read(reply.body)
        reply.release()
        if path == "/head":
            assert body == b"" and reply.content_length == 10
        if path == "/stream":
            assert body == b"one,two,three" and reply.content_length is None
        if path in ("/204", "/304"):
            assert body == b"" and reply.status == int(path[1:])
    assert len(peers) == 1 and pool.connections_opened == 1
    pool.close()


async def test_whole_answers_above_the_high_water_mark_leave_the_connection_reusable(
    upstream: Upstream,
) -> None:
    """An answer read whole before the caller took it, past the high-water mark (so
    reading paused meanwhile), comes back as bytes, and its connection reads the next
    answer: two of them, then a chunked one, on one connection."""
    peers: set[int] = set()
    pool = Pool(await upstream(_peers_app(peers)), high_water=4)
    for path in ("/head", "/a", "/stream"):
        async with asyncio.timeout(10):  # a connection left paused never answers
            reply = await pool.request("GET", path, [])
            body = await _read(reply.body)
        if path != "/stream":
            assert reply.data == body == (b"x" * 10 if path == "/head" else b"ok")
        else:
            assert body == b"one,two,three"
        reply.release()
    assert len(peers) == 1 and pool.connections_opened == 1
    pool.close()


async def test_bodies_both_ways_content_length_and_chunked(upstream: Upstream) -> None:
    pool = Pool(await upstream(echo_app()))

    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b"cd"

    for body, length in ((b"abcd", None), (parts(), None), (parts(), 4)):
        reply = await pool.request("POST", "/x?q=1", [("X-A", "1")], body, content_length=length)
        echoed = json.loads(await _read(reply.body))
        reply.release()
        assert echoed["body"] == "abcd" and echoed["query"] == "q=1"
        assert echoed["headers"]["X-A"] == "1"
        expected = "chunked" if length is None and not isinstance(body, bytes) else None
        assert echoed["headers"].get("Transfer-Encoding") == expected
    pool.close()


async def test_release_before_the_end_closes_the_connection(upstream: Upstream) -> None:
    peers: set[int] = set()
    pool = Pool(await upstream(_peers_app(peers)))
    reply = await pool.request("GET", "/big", [])
    assert not reply.body.complete
    reply.release()
    reply.release()  # idempotent
    reply = await pool.request("GET", "/a", [])
    assert await _read(reply.body) == b"ok"
    reply.release()
    assert pool.connections_opened == 2
    pool.close()


class _OneShotUpstream:
    """Answers each connection's first request with keep-alive; at the second, hangs up.

    To the pool that is a kept-alive connection the upstream closed between
    requests, its FIN arriving just after the second request went out.
    """

    def __init__(self) -> None:
        self.requests: list[bytes] = []

    async def start(self) -> str:
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.server = server
        return f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        self.requests.append(head.split(b"\r\n")[0])
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        writer.close()


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_kept_alive_connection_closed_by_the_upstream(method: str) -> None:
    one_shot = _OneShotUpstream()
    pool = Pool(await one_shot.start())
    reply = await pool.request(method, "/1", [], b"")
    assert await _read(reply.body) == b"ok"
    reply.release()
    assert pool.idle_connections == 1
    if method == "GET":
        reply = await pool.request(method, "/2", [])
        assert await _read(reply.body) == b"ok"
        assert pool.retries == 1 and pool.connections_opened == 2
        assert one_shot.requests == [b"GET /1 HTTP/1.1", b"GET /2 HTTP/1.1"]
    else:
        with pytest.raises(ResetError):
            await pool.request(method, "/2", [], b"data")
        assert pool.retries == 0 and pool.connections_opened == 1
    pool.close()
    one_shot.server.close()


async def test_interim_100_is_skipped() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 1\r\n\r\nz"
        )
        await writer.drain()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    reply = await pool.request("POST", "/", [], b"x")
    assert (reply.status, reply.reason) == (201, "Created")
    assert await _read(reply.body) == b"z"
    reply.release()
    pool.close()
    server.close()


async def _scripted(answer: bytes) -> tuple[asyncio.Server, Pool]:
    """An upstream that answers each request head with `answer`, then waits."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(answer)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")


async def test_an_answer_with_status_000_still_ends() -> None:
    server, pool = await _scripted(b"HTTP/1.1 000 Zero\r\nContent-Length: 2\r\n\r\nok")
    async with asyncio.timeout(10):
        reply = await pool.request("GET", "/", [])
        assert await _read(reply.body) == b"ok"
    reply.release()
    assert pool.idle_connections == 1
    pool.close()
    server.close()


async def test_an_answer_nobody_asked_for_closes_the_connection() -> None:
    """Bytes of a second answer after the whole first one (in the same read): the
    first is answered as it was, its head untouched, and the connection is not
    reused, so no call ever reads the stray answer as its own."""
    server, pool = await _scripted(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-First: 1\r\n\r\nfirst"
        b"HTTP/1.1 201 Stray\r\nContent-Length: 6\r\nX-Stray: 1\r\n\r\nsecond"
    )
    async with asyncio.timeout(10):
        reply = await pool.request("GET", "/", [])
        assert (reply.status, reply.reason) == (200, "OK")
        assert reply.headers.get("X-First") == "1" and "X-Stray" not in reply.headers
        assert await _read(reply.body) == b"first"
        reply.release()
        again = await pool.request("GET", "/", [])
        assert await _read(again.body) == b"first"
        again.release()
    assert pool.connections_opened == 2
    pool.close()
    server.close()


async def test_connect_refused(closed_port: int) -> None:
    pool = Pool(f"http://127.0.0.1:{closed_port}")
    with pytest.raises(ConnectError, match="refused"):
        await pool.request("GET", "/", [])


async def test_reset_before_the_answer() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    pool = Pool(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}")
    with pytest.raises(ResetError):
        await pool.request("GET", "/", [])
    server.close()


# TLS to a local aiohttp server with a self-signed certificate.


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
async def tls_upstream(tmp_path: Path) -> AsyncIterator[tuple[int, Path]]:
    cert, key = _self_signed(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    runner = web.AppRunner(echo_app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context)
    await site.start()
    yield int(runner.addresses[0][1]), cert
    await runner.cleanup()


async def test_tls_with_the_test_ca(tls_upstream: tuple[int, Path]) -> None:
    port, cert = tls_upstream
    context = ssl.create_default_context(cafile=str(cert))
    context.set_alpn_protocols(["http/1.1"])
    pool = Pool(f"https://localhost:{port}", ssl_context=context)
    reply = await pool.request("GET", "/tls", [])
    echoed = json.loads(await _read(reply.body))
    reply.release()
    assert echoed["path"] == "/tls" and echoed["headers"]["Host"] == f"localhost:{port}"
    pool.close()


async def test_tls_without_the_ca_is_refused(tls_upstream: tuple[int, Path]) -> None:
    port, _ = tls_upstream
    pool = Pool(f"https://localhost:{port}")
    with pytest.raises(TLSError, match="certificate was not accepted"):
        await pool.request("GET", "/", [])


# End to end through the tiny proxy.


async def test_proxy_end_to_end_keeps_one_upstream_connection(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    peers: set[int] = set()
    async with proxy(await upstream(_peers_app(peers))) as (host, port):
        base = f"http://{host}:{port}"
        for _ in range(3):
            async with client.post(f"{base}/x", data=b"payload") as resp:
                assert await resp.read() == b"payload"
        async with client.get(f"{base}/stream") as resp:
            assert resp.headers["Transfer-Encoding"] == "chunked"
            assert await resp.read() == b"one,two,three"
        async with client.head(f"{base}/head") as resp:
            assert resp.headers["Content-Length"] == "10"
    assert len(peers) == 1


async def test_proxy_chunked_request_body(upstream: Upstream) -> None:
    async with proxy(await upstream(echo_app())) as address:
        reader, writer = await asyncio.open_connection(*address)
        writer.write(
            b"POST /c HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        _, body = await read_response(reader)
        writer.close()
    assert json.loads(body)["body"] == "abcde"


async def test_websocket_through_the_tunnel(
    upstream: Upstream, client: aiohttp.ClientSession
) -> None:
    async def ws_echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT:
                if msg.data == "close":
                    await ws.close(code=4002, message=b"bye")
                else:
                    await ws.send_str("echo:" + msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        return ws

    app = web.Application()
    app.router.add_get("/ws", ws_echo)
    url = await upstream(app)
    async with proxy(url) as (host, port), client.ws_connect(f"http://{host}:{port}/ws") as ws:
        await ws.send_str("hi")
        assert (await ws.receive(timeout=10)).data == "echo:hi"
        await ws.send_bytes(b"\x01\x02\x03")
        assert (await ws.receive(timeout=10)).data == b"\x03\x02\x01"
        await ws.send_str("close")
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4002 or msg.data == 4002
