"""Async generators over bodies, kept out of the compiled modules: mypyc cannot compile them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator

from .problems import ProblemError
from .reasons import Reason


async def once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def idle_bounded(body: AsyncIterable[bytes], idle: float) -> AsyncIterator[bytes]:
    # Only the silence between chunks is bounded, never the whole stream.
    chunks = aiter(body)
    while True:
        async with asyncio.timeout(idle):
            try:
                data = await anext(chunks)
            except StopAsyncIteration:
                return
        yield data


async def limited(source: AsyncIterable[bytes], limit: int, service: str) -> AsyncIterator[bytes]:
    seen = 0
    async for data in source:
        seen += len(data)
        if seen > limit:
            raise ProblemError(
                Reason.request_too_large,
                f"The request body exceeded {limit} bytes, the most service '{service}' accepts.",
                service=service,
            )
        yield data
