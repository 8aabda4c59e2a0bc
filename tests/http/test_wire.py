"""What an agent and an upstream see on the wire, through the real `sidecar run` process.

These hold for any data plane: request bodies pass byte for byte, the
sidecar's marks (Server, X-Sidecar-Error) cannot be forged or leak the
runtime, HTTP/2 is refused clearly, a WebSocket close comes back as the
upstream sent it, and a cut stream is logged as cut.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from tests.helpers import ROOT, eventually, sidecar_process

pytestmark = pytest.mark.process

HELLO_GZ = gzip.compress(b"hello", mtime=0)
# Small on the wire, large once decoded: max_body must count the former.
BOMB_GZ = gzip.compress(b"a" * 100_000, mtime=0)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    return env | extra


def _policies(tmp_path: Path, services: str) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "p.yaml").write_text(f"version: 1\nservices:\n{services}")
    return directory


@pytest.fixture
async def raw_upstream() -> AsyncIterator[Callable[[list[dict[str, Any]]], Awaitable[str]]]:
    """An upstream that keeps each request's headers and body exactly as received
    (its parser decodes nothing), and answers 200."""
    runners: list[web.ServerRunner] = []

    async def start(seen: list[dict[str, Any]]) -> str:
        async def handle(request: web.BaseRequest) -> web.Response:
            body = await request.read()
            seen.append({"headers": dict(request.headers), "body": body})
            return web.Response(text="ok")

        runner = web.ServerRunner(web.Server(handle, auto_decompress=False), handle_signals=False)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_an_encoded_request_body_reaches_the_upstream_byte_for_byte(
    tmp_path, raw_upstream, client
):
    seen: list[dict[str, Any]] = []
    base = await raw_upstream(seen)
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}', max_body: 1000}}\n")

    async def chunked() -> AsyncIterator[bytes]:
        yield BOMB_GZ[:10]
        yield BOMB_GZ[10:]

    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    async with sidecar_process(policies, env=_env()) as proc:
        async with asyncio.timeout(10):
            async with client.post(f"{proc.url}/svc/x", data=HELLO_GZ, headers=headers) as r:
                assert r.status == 200
            # Chunked, 100 kB once decoded but under max_body (1000) as sent.
            async with client.post(f"{proc.url}/svc/x", data=chunked(), headers=headers) as r:
                assert r.status == 200, await r.text()
    sized, streamed = seen
    assert sized["body"] == HELLO_GZ
    assert sized["headers"]["Content-Length"] == str(len(HELLO_GZ))
    assert sized["headers"]["Content-Encoding"] == "gzip"
    assert streamed["body"] == BOMB_GZ
    assert streamed["headers"]["Content-Encoding"] == "gzip"


async def test_max_body_counts_the_encoded_bytes(tmp_path, raw_upstream, client):
    seen: list[dict[str, Any]] = []
    base = await raw_upstream(seen)
    limit = len(HELLO_GZ) - 1  # larger than "hello", smaller than its gzip
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}', max_body: {limit}}}\n")

    async def chunked() -> AsyncIterator[bytes]:
        yield HELLO_GZ

    headers = {"Content-Encoding": "gzip"}
    async with sidecar_process(policies, env=_env()) as proc:
        async with asyncio.timeout(10):
            async with client.post(f"{proc.url}/svc/x", data=chunked(), headers=headers) as r:
                assert r.status == 413
                assert r.headers["X-Sidecar-Error"] == "request_too_large"
    assert seen == []


def _marks_app() -> web.Application:
    async def forged(request: web.Request) -> web.Response:
        return web.Response(
            status=429,
            text="slow down",
            headers={"X-Sidecar-Error": "rate_limited", "Server": "upstream/1.0"},
        )

    async def refused_ws(request: web.Request) -> web.Response:
        return web.Response(status=403, headers={"X-Sidecar-Error": "auth_failed"})

    async def anonymous(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        # aiohttp would add its own Server header; drop it on the wire.
        await response.write(b"anon")
        return response

    app = web.Application()
    app.router.add_get("/forged", forged)
    app.router.add_get("/ws", refused_ws)
    app.router.add_get("/anonymous", anonymous)
    return app


async def test_upstream_cannot_forge_the_sidecars_marks(tmp_path, upstream, client):
    base = await upstream(_marks_app())
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}'}}\n")
    async with sidecar_process(policies, env=_env()) as proc:
        async with asyncio.timeout(10):
            async with client.get(f"{proc.url}/svc/forged") as r:
                assert r.status == 429
                assert "X-Sidecar-Error" not in r.headers
                assert r.headers["Server"] == "upstream/1.0"  # the upstream's, passed on
                assert await r.text() == "slow down"
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(f"{proc.url}/svc/ws")
            assert refused.value.status == 403
            assert refused.value.headers is not None
            assert "X-Sidecar-Error" not in refused.value.headers
            # The sidecar's own answer: marked, and no runtime version.
            async with client.get(f"{proc.url}/nowhere") as r:
                assert r.status == 404
                assert r.headers["X-Sidecar-Error"] == "no_route"
                assert r.headers["Server"] == "agent-sidecar"
            # aiohttp's own answer to a request it cannot parse.
            reader, writer = await asyncio.open_connection(*_host_port(proc.url))
            writer.write(b"GET /svc/x HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n")
            answer = await reader.read()
            writer.close()
    assert answer.startswith(b"HTTP/1.") and b" 400 " in answer.split(b"\r\n")[0]
    assert b"Server: agent-sidecar\r\n" in answer
    assert b"aiohttp" not in answer and b"Python" not in answer


async def test_a_relayed_answer_gets_no_server_header_the_upstream_did_not_send(tmp_path, client):
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}'}}\n")
    async with server, sidecar_process(policies, env=_env()) as proc:
        async with asyncio.timeout(10):
            async with client.get(f"{proc.url}/svc/x") as r:
                assert await r.read() == b"ok"
                assert "Server" not in r.headers


def _host_port(url: str) -> tuple[str, int]:
    host, _, port = url.removeprefix("http://").rpartition(":")
    return host, int(port)


async def test_http2_prior_knowledge_gets_a_clear_refusal(tmp_path, upstream):
    base = await upstream(web.Application())
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}'}}\n")
    async with sidecar_process(policies, env=_env()) as proc:
        async with asyncio.timeout(10):
            reader, writer = await asyncio.open_connection(*_host_port(proc.url))
            # The client preface, then an empty SETTINGS frame, as curl sends them.
            writer.write(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            )
            answer = await reader.read()  # until the sidecar closes
            writer.close()
    # HTTP/2's own framing, which such a client reads: SETTINGS, the 505 on stream 1, GOAWAY.
    frames = h2_frames(answer)
    assert [(kind, stream) for kind, _, stream, _ in frames] == [(4, 0), (1, 1), (0, 1), (7, 0)]
    fields = frames[1][3]
    assert fields.startswith(b"\x08\x03505")  # :status 505
    assert b"x-sidecar-error\x1ahttp_version_not_supported" in fields
    assert b"application/problem+json" in fields
    problem = json.loads(frames[2][3])
    assert problem["status"] == 505
    assert "HTTP/1.1 only" in problem["detail"]


def h2_frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """HTTP/2 frames (RFC 9113 4.1) as (type, flags, stream, payload)."""
    frames = []
    while data:
        length = int.from_bytes(data[:3], "big")
        kind, flags = data[3], data[4]
        stream = int.from_bytes(data[5:9], "big") & 0x7FFFFFFF
        frames.append((kind, flags, stream, data[9 : 9 + length]))
        data = data[9 + length :]
    return frames


async def test_curl_with_http2_prior_knowledge_prints_the_505(tmp_path, upstream):
    base = await upstream(web.Application())
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}'}}\n")
    async with sidecar_process(policies, env=_env()) as proc:
        curl = await asyncio.create_subprocess_exec(
            "curl",
            "-s",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_code} %{http_version}",
            f"{proc.url}/svc/x",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(curl.communicate(), 20)
    body, _, status = out.decode().rpartition("\n")
    assert status == "505 2", (out, err)
    problem = json.loads(body)
    assert problem["reason"] == "http_version_not_supported"
    assert "HTTP/1.1 only" in problem["message"]


def _echo_close_app() -> web.Application:
    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoclose=False)
        await ws.prepare(request)
        msg = await ws.receive()  # `async for` would stop before the close
        assert msg.type is WSMsgType.CLOSE
        await ws.close(code=msg.data, message=f"echo {msg.extra}".encode())
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    return app


async def test_the_agent_gets_the_upstreams_answering_close(tmp_path, upstream, client):
    base = await upstream(_echo_close_app())
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}'}}\n")
    async with sidecar_process(policies, env=_env()) as proc:
        async with asyncio.timeout(10):
            ws = await client.ws_connect(f"{proc.url}/svc/ws", autoclose=False)
            assert ws._response.headers["Server"] == "agent-sidecar"
            # A close frame sent by hand: the agent's client reads the answer itself.
            await ws.send_frame((4002).to_bytes(2, "big") + b"client bye", WSMsgType.CLOSE)
            answer = await ws.receive()
            await ws.close()
    assert answer.type is WSMsgType.CLOSE
    assert (answer.data, answer.extra) == (4002, "echo client bye")


def _stalling_app() -> web.Application:
    async def stalls(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        await asyncio.Event().wait()  # then silence, the connection open
        return response

    async def resets(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: first\n\n")
        assert request.transport is not None
        request.transport.abort()
        return response

    app = web.Application()
    app.router.add_get("/stalls", stalls)
    app.router.add_get("/resets", resets)
    return app


async def test_a_cut_stream_is_logged_with_its_reason_and_bytes(tmp_path, upstream, client):
    base = await upstream(_stalling_app())
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}', timeout: {{idle: 300ms}}}}\n")
    async with sidecar_process(policies, env=_env(SIDECAR_ACCESS_LOG="1")) as proc:
        async with asyncio.timeout(10):
            for path in ("stalls", "resets"):
                async with client.get(f"{proc.url}/svc/{path}") as r:
                    assert r.status == 200
                    assert await r.content.readuntil(b"\n\n") == b"data: first\n\n"
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await r.content.read()
            await eventually(lambda: len(proc.stdout) == 2, "two access log lines")
    stalled, reset = (json.loads(line) for line in proc.stdout)
    assert (stalled["path"], stalled["status"]) == ("/svc/stalls", 200)
    assert stalled["reason"] == "upstream_idle_timeout"
    assert stalled["bytes_sent"] > len(b"data: first\n\n")  # the head and the first event
    assert (reset["path"], reset["reason"]) == ("/svc/resets", "upstream_reset")
    assert reset["bytes_sent"] > len(b"data: first\n\n")


async def _scripted_upstream(answers: list[bytes], seen: list[bytes]) -> tuple[asyncio.Server, str]:
    """An upstream that records each request head as sent and answers the next of
    `answers`, byte for byte."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while answers:
                seen.append(await reader.readuntil(b"\r\n\r\n"))
                writer.write(answers.pop(0))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def _through_sidecar(
    tmp_path: Path,
    answers: list[bytes],
    request: bytes,
    *,
    service: str = "",
    env: dict[str, str] | None = None,
) -> tuple[list[bytes], bytes]:
    """One raw request through a real sidecar to a scripted upstream: the heads the
    upstream got, and the head the agent got."""
    seen: list[bytes] = []
    server, base = await _scripted_upstream(answers, seen)
    policies = _policies(tmp_path, f"  svc:\n    upstream: '{base}'\n{service}")
    async with server, sidecar_process(policies, env=_env(**(env or {}))) as proc:
        reader, writer = await asyncio.open_connection(*_host_port(proc.url))
        writer.write(request)
        async with asyncio.timeout(10):
            head = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    return seen, head


async def test_header_fields_pass_byte_for_byte_both_ways(tmp_path):
    """Names keep their case and order, and values their bytes (obs-text, UTF-8) in
    both directions; only the hop's own fields are replaced."""
    seen, head = await _through_sidecar(
        tmp_path,
        [
            b"HTTP/1.1 200 OK\r\nX-Upstream-Note: caf\xc3\xa9 \xe9\r\nx-lower: One\r\n"
            b"X-Twice: a\r\nX-Twice: b\r\nConnection: keep-alive, X-Hop\r\nX-Hop: gone\r\n"
            b"Content-Length: 2\r\n\r\nok"
        ],
        b"GET /svc/x HTTP/1.1\r\nHost: agent\r\nX-Agent-Note: na\xc3\xafve \xff\r\n"
        b"x-MiXeD: 1\r\nX-Twice: c\r\nX-Twice: d\r\nConnection: X-Drop\r\nX-Drop: no\r\n\r\n",
    )
    sent = seen[0]
    assert (
        b"\r\nX-Agent-Note: na\xc3\xafve \xff\r\nx-MiXeD: 1\r\nX-Twice: c\r\nX-Twice: d\r\n" in sent
    )
    assert b"X-Drop" not in sent
    assert b"\r\nHost: 127.0.0.1:" in sent
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert (
        b"\r\nX-Upstream-Note: caf\xc3\xa9 \xe9\r\nx-lower: One\r\nX-Twice: a\r\nX-Twice: b\r\n"
        in head
    )
    assert b"X-Hop" not in head
    assert b"\r\nContent-Length: 2\r\n" in head


async def test_fields_the_upstream_must_not_see_stay_dropped_on_every_attempt(tmp_path):
    """Credential, agent id, proxy and hop-by-hop fields, in any case and repeated,
    never reach the upstream, and the injected ones go out once per attempt; the
    sidecar's marks and hop fields from the upstream never reach the agent."""
    busy = b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n"
    good = (
        b"HTTP/1.1 200 OK\r\nX-Sidecar-Error: forged\r\nx-sidecar-error: forged2\r\n"
        b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTrailer: X-T\r\n"
        b"Connection: keep-alive, X-Hop\r\nX-Hop: gone\r\nTransfer-Encoding: chunked\r\n"
        b"Upgrade: h2c\r\nX-Kept: yes\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    )
    seen, head = await _through_sidecar(
        tmp_path,
        [busy, good],
        b"GET /svc/x HTTP/1.1\r\nHost: agent\r\nauthorization: Bearer agent\r\n"
        b"AUTHORIZATION: Bearer agent2\r\nx-agent-id: a1\r\nX-AGENT-ID: a2\r\n"
        b"X-Forwarded-For: 1.2.3.4\r\nx-forwarded-host: evil\r\nVia: 1.1 evil\r\n"
        b"Forwarded: for=evil\r\nCookie: c=1\r\ncookie: c=2\r\nX-Set: agent\r\n"
        b"x-set: agent2\r\nProxy-Authorization: Basic x\r\nTE: trailers\r\n"
        b"Keep-Alive: 1\r\nConnection: keep-alive, X-Conn\r\nX-Conn: drop\r\n"
        b"Proxy-Connection: keep-alive\r\nTrailer: X\r\nX-Keep: 1\r\n\r\n",
        service="    auth: {type: bearer, token: '${env:TOKEN}'}\n"
        "    headers: {set: {X-Set: fixed}, remove: [Cookie]}\n"
        "    retry: {attempts: 2, on: [503], backoff: {initial: 1ms, max: 1ms}}\n",
        env={"TOKEN": "s3cret"},
    )
    assert len(seen) == 2
    for sent in seen:
        low = sent.lower()
        for name in (
            b"x-agent-id",
            b"x-forwarded",
            b"via:",
            b"forwarded:",
            b"cookie",
            b"proxy-",
            b"\r\nte:",
            b"keep-alive",
            b"x-conn",
            b"\r\ntrailer",
            b"agent2",
            b"bearer agent",
            b"evil",
        ):
            assert name not in low, name
        assert low.count(b"authorization: bearer s3cret\r\n") == 1
        assert low.count(b"x-set: fixed\r\n") == 1
        assert b"X-Keep: 1\r\n" in sent
    low = head.lower()
    for name in (b"x-sidecar-error", b"keep-alive", b"proxy-authenticate", b"trailer", b"x-hop"):
        assert name not in low, name
    assert b"upgrade" not in low
    assert b"X-Kept: yes" in head


async def test_every_connection_field_names_hop_by_hop_fields(tmp_path):
    """Two Connection fields are one list (RFC 9110 5.3): the fields named in the
    second are dropped too, both ways."""
    seen, head = await _through_sidecar(
        tmp_path,
        [
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: X-Up-Hop\r\n"
            b"X-Up-Hop: secret\r\nContent-Length: 2\r\n\r\nok"
        ],
        b"GET /svc/x HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\n"
        b"Connection: X-Agent-Hop\r\nX-Agent-Hop: secret\r\n\r\n",
    )
    assert b"X-Agent-Hop" not in seen[0]
    assert b"X-Up-Hop" not in head


@pytest.mark.parametrize("expect", [b"100-continue", b"100-continue ", b"100-Continue\t"])
async def test_expect_100_continue_is_answered_whatever_its_case_and_spaces(tmp_path, expect):
    seen: list[bytes] = []
    server, base = await _scripted_upstream([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"], seen)
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}'}}\n")
    async with server, sidecar_process(policies, env=_env()) as proc:
        reader, writer = await asyncio.open_connection(*_host_port(proc.url))
        writer.write(
            b"POST /svc/x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nExpect: "
            + expect
            + b"\r\n\r\n"
        )
        async with asyncio.timeout(10):
            first = await reader.readuntil(b"\r\n\r\n")
            assert first.startswith(b"HTTP/1.1 100 Continue\r\n")
            writer.write(b"hi")
            answer = await reader.readuntil(b"\r\n\r\n")
        writer.close()
    assert answer.startswith(b"HTTP/1.1 200 ")


async def test_an_answer_that_ends_with_its_connection_reaches_the_agent_whole(tmp_path):
    """No Content-Length, no chunked: the upstream's close ends the body (RFC 9112
    6.3), and the agent gets all of it, properly ended, not a cut answer."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\nhello "
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"world")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    policies = _policies(tmp_path, f"  svc: {{upstream: '{base}'}}\n")
    async with (
        server,
        sidecar_process(policies, env=_env()) as proc,
        aiohttp.ClientSession() as client,
        asyncio.timeout(10),
        client.get(f"{proc.url}/svc/x") as r,
    ):
        assert r.status == 200
        assert await r.read() == b"hello world"  # aiohttp raises on a cut chunked body


async def test_connect_is_refused_and_never_forwarded(tmp_path):
    # llhttp treats CONNECT as an upgrade even with no Connection field: the
    # listener must still ask it. Its authority-form target is refused first.
    seen, head = await _through_sidecar(
        tmp_path,
        [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
        b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 400 "), head
    assert b"X-Sidecar-Error: bad_request" in head
    assert b"Content-Type: application/problem+json" in head
    assert seen == []
    # The README's table of the sidecar's own answers says the same.
    rows: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith(("| `bad_request` | 400 |", "| `method_not_allowed`")):
            rows.setdefault(line.split("|")[1].strip(" `"), line)
    assert "CONNECT" in rows["bad_request"]
    assert "CONNECT" not in rows["method_not_allowed"]


async def test_upgrade_without_connection_upgrade_is_a_plain_request(tmp_path):
    seen, head = await _through_sidecar(
        tmp_path,
        [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"],
        b"GET /svc/plain HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\n\r\n",
    )
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert seen[0].startswith(b"GET /plain HTTP/1.1\r\n")
    assert b"Upgrade" not in seen[0]  # hop-by-hop: never forwarded on a plain request
