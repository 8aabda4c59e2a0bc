"""A missed answer's body relayed and kept on the way (steps/answers/cache.py).

An async generator, so it lives outside the compiled cache step: mypyc cannot
compile one (as core/streams.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Callable


async def kept(
    body: AsyncIterable[bytes], limit: int, length: int | None, whole: Callable[[bytes], None]
) -> AsyncIterator[bytes]:
    """Each chunk of `body` as it came; `whole(data)` with all of it once it ended whole.

    The copy is dropped once larger than `limit`. Only a body that ended on its own
    counts: one cut short (the upstream failed, the agent left) leaves the generator
    by an exception, and one shorter than its `length` (Content-Length) was cut even
    if the stream ended quietly.
    """
    chunks: list[bytes] | None = []
    size = 0
    async for data in body:
        if chunks is not None:
            size += len(data)
            if size > limit:
                chunks = None
            else:
                chunks.append(data)
        yield data
    if chunks is not None and (length is None or length == size):
        whole(b"".join(chunks))
