"""A streamed (SSE) LLM answer is kept only on the policy's explicit opt-in, and a miss
says why it was not kept (issue 21, item 5)."""

from __future__ import annotations

import json

import openai
from aiohttp import web

CHUNKS = ["Hel", "lo"]


class SSEUpstream:
    """An OpenAI-like chat endpoint that streams with Cache-Control: no-cache."""

    def __init__(self) -> None:
        self.calls = 0

    def app(self) -> web.Application:
        async def chat(request: web.Request) -> web.StreamResponse:
            self.calls += 1
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            for text in CHUNKS:
                chunk = {
                    "id": "c1",
                    "object": "chat.completion.chunk",
                    "created": 1,
                    "model": "m",
                    "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
                }
                await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_post("/v1/chat/completions", chat)
        return app


async def _stream(url: str) -> tuple[str, dict[str, str]]:
    agent = openai.AsyncOpenAI(base_url=f"{url}/llm/v1", api_key="x", max_retries=0)
    async with agent.chat.completions.with_streaming_response.create(
        model="m", messages=[{"role": "user", "content": "hi"}], temperature=0, stream=True
    ) as response:
        headers = dict(response.headers)
        text = ""
        async for chunk in await response.parse():
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
    await agent.close()
    return text, headers


POLICY = """
version: 1
services:
  llm:
    upstream: {base}
    auth: {{type: bearer, token: sk-test}}
    cache: {{methods: [POST]{extra}}}
"""


async def test_a_streamed_answer_is_kept_on_the_opt_in(upstream, start_sidecar) -> None:  # type: ignore[no-untyped-def]
    backend = SSEUpstream()
    base = await upstream(backend.app())
    extra = ", ignore_upstream_cache_control: [POST]"
    sc = await start_sidecar(POLICY.format(base=base, extra=extra))
    first, headers = await _stream(sc.url)
    assert (first, headers["x-sidecar-cache"]) == ("Hello", "miss")
    assert "x-sidecar-cache-not-stored" not in headers
    second, headers = await _stream(sc.url)
    assert (second, headers["x-sidecar-cache"]) == ("Hello", "hit")
    assert backend.calls == 1


async def test_without_the_opt_in_the_miss_says_why(upstream, start_sidecar) -> None:  # type: ignore[no-untyped-def]
    backend = SSEUpstream()
    base = await upstream(backend.app())
    sc = await start_sidecar(POLICY.format(base=base, extra=""))
    for _ in range(2):
        text, headers = await _stream(sc.url)
        assert text == "Hello"
        assert headers["x-sidecar-cache"] == "miss"
        assert headers["x-sidecar-cache-not-stored"] == "no-cache"
    assert backend.calls == 2


def test_the_opt_in_names_cached_methods_only() -> None:
    import pytest
    from pydantic import ValidationError

    from sidecar.policy.cache import Cache

    with pytest.raises(ValidationError, match="which `methods` does not cache"):
        Cache.model_validate({"ignore_upstream_cache_control": ["POST"]})
