"""A tiny forwarding proxy on the new data plane (listener + pool), and raw-socket helpers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from sidecar.core.headers import HOP_BY_HOP
from sidecar.http.listener import App, Limits, Request, Response, serve
from sidecar.http.pool import Pool


def forwarding_app(pool: Pool, seen: list[Request] | None = None) -> App:
    async def app(request: Request) -> Response:
        if seen is not None:
            seen.append(request)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        if request.is_upgrade:
            headers += [("Connection", "Upgrade"), ("Upgrade", request.headers["Upgrade"])]
        reply = await pool.request(
            request.method,
            request.target,
            headers,
            request.body,
            content_length=request.content_length,
        )
        answer = [(k, v) for k, v in reply.headers.items() if k.lower() not in HOP_BY_HOP]
        if reply.status == 101:
            answer.append(("Upgrade", reply.headers["Upgrade"]))
            return Response(101, headers=answer, tunnel=reply.detach())
        return Response(
            reply.status,
            headers=answer,
            body=reply.body,
            content_length=reply.content_length,
            reason=reply.reason,
        )

    return app


@asynccontextmanager
async def listening(app: App, limits: Limits | None = None) -> AsyncIterator[tuple[str, int]]:
    server = await serve(app, "127.0.0.1", 0, limits=limits)
    try:
        host, port = server.addresses[0]
        yield host, port
    finally:
        await server.cleanup()


@asynccontextmanager
async def proxy(upstream_url: str, limits: Limits | None = None) -> AsyncIterator[tuple[str, int]]:
    pool = Pool(upstream_url)
    try:
        async with listening(forwarding_app(pool), limits) as address:
            yield address
    finally:
        pool.close()


async def exchange(address: tuple[str, int], data: bytes, limit: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes; everything it sent."""
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(data)
        return await asyncio.wait_for(reader.read(), limit)
    finally:
        writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One Content-Length or chunked response off a raw stream: (head, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lower = head.lower()
    if b"transfer-encoding: chunked" in lower:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            data = await reader.readexactly(size + 2)
            if size == 0:
                return head, body
            body += data[:-2]
    for line in lower.split(b"\r\n"):
        if line.startswith(b"content-length:"):
            return head, await reader.readexactly(int(line.split(b":")[1]))
    return head, b""
