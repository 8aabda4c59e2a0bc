"""The three deadlines of `timeout` as an agent notices them, against real loopback servers.

- `connect`: a server whose accept queue is full never completes the handshake;
- `idle`: a streamed answer that stalls is cut, not left hanging;
- `total`: ends at the response headers, so a long SSE stream arrives whole.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import aiohttp
import pytest
from aiohttp import web


def _policy(base: str, timeout: str) -> str:
    return f"version: 1\nservices:\n  svc:\n    upstream: {base}\n    timeout: {timeout}\n"


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A loopback port that listens but never accepts, its backlog full: connects hang.

    Linux drops a SYN while the accept queue is full, so the client waits for a
    retransmission (a second or more) instead of being refused.
    """
    with contextlib.ExitStack() as stack:
        server = stack.enter_context(socket.socket())
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = int(server.getsockname()[1])
        for _ in range(8):
            probe = socket.socket()
            probe.settimeout(0.2)
            try:
                probe.connect(("127.0.0.1", port))
            except TimeoutError:
                probe.close()  # the queue is full: this connect hung
                yield port
                return
            stack.enter_context(probe)  # queued; holds its place in the backlog
        pytest.skip("this kernel completes loopback handshakes past a full backlog")


async def test_connect_timeout_is_a_502_upstream_unreachable(
    start_sidecar, client, unaccepting_port
):
    base = f"http://127.0.0.1:{unaccepting_port}"
    sc = await start_sidecar(_policy(base, "{connect: 200ms, total: 30s}"))
    async with asyncio.timeout(10):
        async with client.get(f"{sc.url}/svc/x") as r:
            assert r.status == 502
            assert r.headers["X-Sidecar-Error"] == "upstream_unreachable"
            body = await r.json(content_type=None)
    assert body["reason"] == "upstream_unreachable"
    assert "0.2s" in body["detail"]


async def test_idle_cuts_a_stalled_streamed_answer(upstream, start_sidecar, client):
    async def stalls(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: first\n\n")
        await asyncio.Event().wait()  # then silence, with the connection open
        return resp

    app = web.Application()
    app.router.add_get("/events", stalls)
    sc = await start_sidecar(_policy(await upstream(app), "{idle: 300ms}"))
    async with asyncio.timeout(10):  # a hung stream fails here, not at the suite's timeout
        async with client.get(f"{sc.url}/svc/events") as r:
            assert r.status == 200
            assert await r.content.readuntil(b"\n\n") == b"data: first\n\n"
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.content.read()


async def test_total_does_not_cut_a_stream_once_headers_arrived(upstream, start_sidecar, client):
    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for n in range(10):  # about a second in all, over three times `total`
            await asyncio.sleep(0.1)
            await resp.write(f"data: {n}\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/events", events)
    sc = await start_sidecar(_policy(await upstream(app), "{total: 300ms}"))
    async with client.get(f"{sc.url}/svc/events") as r:
        assert r.status == 200
        body = await r.read()
    assert body == b"".join(f"data: {n}\n\n".encode() for n in range(10))
