"""A local upstream that speaks OpenAI chat completions and Anthropic messages.

Answers follow the providers' documented wire formats: JSON answers with a
`usage` object, and SSE streams (OpenAI's `data:` chunks ending in
`data: [DONE]`, the last chunk carrying `usage` under
`stream_options.include_usage`; Anthropic's named events from message_start
to message_stop). A test can script a stream as parts and gates: the upstream
writes each part as its own chunk and waits at each gate until the test opens
it, so a test can see what reached the agent before the rest is sent.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    payload = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {payload}\n\n".encode()


def openai_chunk(model: str, text: str | None, usage: Any = None, *, with_usage: bool) -> bytes:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": model,
        "choices": []
        if text is None
        else [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    if with_usage:
        chunk["usage"] = usage
    return sse(chunk)


def openai_stream(model: str, words: list[str], usage: dict[str, int] | None) -> list[bytes]:
    """A chat completion stream; with `usage`, the agent asked for include_usage."""
    parts = [openai_chunk(model, w, with_usage=usage is not None) for w in words]
    if usage is not None:
        parts.append(openai_chunk(model, None, usage, with_usage=True))
    parts.append(b"data: [DONE]\n\n")
    return parts


def openai_json(model: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello!"},
                "finish_reason": "stop",
            }
        ],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
    }


def anthropic_json(model: str, usage: dict[str, int]) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [{"type": "text", "text": "Hello!"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": usage,
    }


def anthropic_start(model: str, input_tokens: int) -> bytes:
    """An Anthropic stream's message_start."""
    message = anthropic_json(model, {"input_tokens": input_tokens, "output_tokens": 1})
    message["content"] = []
    message["stop_reason"] = None
    return sse({"type": "message_start", "message": message}, "message_start")


def anthropic_block_start(index: int, block: dict[str, Any] | None = None) -> bytes:
    """content_block_start of a text block, or of `block`."""
    content = block if block is not None else {"type": "text", "text": ""}
    return sse(
        {"type": "content_block_start", "index": index, "content_block": content},
        "content_block_start",
    )


def anthropic_delta(index: int, text: str = "", partial_json: str | None = None) -> bytes:
    """content_block_delta: text, or a tool call's input JSON when `partial_json`."""
    delta = (
        {"type": "text_delta", "text": text}
        if partial_json is None
        else {"type": "input_json_delta", "partial_json": partial_json}
    )
    return sse(
        {"type": "content_block_delta", "index": index, "delta": delta}, "content_block_delta"
    )


def anthropic_end(index: int, stop_reason: str, output_tokens: int) -> list[bytes]:
    """The last block's stop, message_delta (stop reason and usage) and message_stop."""
    return [
        sse({"type": "content_block_stop", "index": index}, "content_block_stop"),
        sse(
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
            "message_delta",
        ),
        sse({"type": "message_stop"}, "message_stop"),
    ]


def anthropic_stream(model: str, input_tokens: int, output_tokens: int) -> list[bytes]:
    return [
        anthropic_start(model, input_tokens),
        anthropic_block_start(0),
        sse({"type": "ping"}, "ping"),
        anthropic_delta(0, "Hello"),
        *anthropic_end(0, "end_turn", output_tokens),
    ]


Part = bytes | asyncio.Event


class LLMUpstream:
    """Answers POSTs with `script` (parts and gates) when set, else from the request."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[Part] | None = None
        self.content_type = "text/event-stream"
        self.gzip = False

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self.openai)
        app.router.add_post("/v1/messages", self.anthropic)
        app.router.add_post("/raw", self.raw)
        return app

    async def _read(self, request: web.Request) -> dict[str, Any]:
        body = await request.json()
        self.requests.append(body)
        return body  # type: ignore[no-any-return]

    async def _stream(self, request: web.Request, parts: list[Part]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": self.content_type})
        await response.prepare(request)
        for part in parts:
            if isinstance(part, asyncio.Event):
                await asyncio.wait_for(part.wait(), 10)
            else:
                await response.write(part)
        await response.write_eof()
        return response

    async def _json(self, document: Any) -> web.Response:
        response = web.json_response(document)
        if self.gzip:
            response.enable_compression(web.ContentCoding.gzip)
        return response

    async def openai(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if self.script is not None:
            return await self._stream(request, self.script)
        model = body.get("model", "gpt-4o")
        if body.get("stream"):
            options = body.get("stream_options") or {}
            usage = {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}
            parts = openai_stream(
                model, ["Hel", "lo", "!"], usage if options.get("include_usage") else None
            )
            return await self._stream(request, list(parts))
        return await self._json(openai_json(model, 12, 5))

    async def anthropic(self, request: web.Request) -> web.StreamResponse:
        body = await self._read(request)
        if self.script is not None:
            return await self._stream(request, self.script)
        model = body.get("model", "claude-sonnet-4-5")
        if body.get("stream"):
            return await self._stream(request, list(anthropic_stream(model, 25, 15)))
        usage = {
            "input_tokens": 20,
            "output_tokens": 7,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 1000,
        }
        return await self._json(anthropic_json(model, usage))

    async def raw(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        return await self._stream(request, self.script or [])
