"""Stream translation alone: the same events out however the upstream's bytes are cut."""

from __future__ import annotations

import json
from typing import Any

from sidecar.steps.llm.translate_answer import SSEReader, ToAnthropicEvents, ToOpenAIChunks
from tests.steps.llm_upstream import anthropic_stream, openai_stream, sse


def run(translator: ToOpenAIChunks | ToAnthropicEvents, data: bytes, cuts: list[int]) -> bytes:
    reader = SSEReader()
    out = b""
    start = 0
    for end in [*cuts, len(data)]:
        out += b"".join(translator.event(d) for _, d in reader.feed(data[start:end]))
        start = end
    out += b"".join(translator.event(d) for _, d in reader.finish())
    return out + translator.finish()


def events(data: bytes) -> list[Any]:
    out = []
    for block in data.decode().split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                value = line[6:]
                out.append(value if value == "[DONE]" else json.loads(value))
    return out


ANTHROPIC = b"".join(anthropic_stream("claude-x", 25, 15))


def test_an_anthropic_stream_cut_at_every_byte_translates_the_same() -> None:
    whole = run(ToOpenAIChunks(usage=True, created=1), ANTHROPIC, [])
    for cut in range(1, len(ANTHROPIC)):
        assert run(ToOpenAIChunks(usage=True, created=1), ANTHROPIC, [cut]) == whole
    chunks = events(whole)
    assert chunks[-1] == "[DONE]"
    assert chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == {"prompt_tokens": 25, "completion_tokens": 15, "total_tokens": 40}
    assert [c["choices"][0]["delta"] for c in chunks[:-2]] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
        {},
    ]
    assert chunks[-3]["choices"][0]["finish_reason"] == "stop"


def test_without_include_usage_no_usage_chunk_and_no_usage_key() -> None:
    chunks = events(run(ToOpenAIChunks(usage=False), ANTHROPIC, []))
    assert chunks[-1] == "[DONE]"
    assert all("usage" not in c for c in chunks[:-1])


def test_an_error_event_mid_stream_becomes_an_openai_error() -> None:
    data = ANTHROPIC.split(b"event: content_block_stop")[0] + sse(
        {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}, "error"
    )
    chunks = events(run(ToOpenAIChunks(usage=True), data, []))
    assert chunks[-1]["error"]["type"] == "overloaded_error"
    assert "[DONE]" not in chunks  # a stream that failed does not say it ended well


def test_an_openai_stream_with_text_and_a_tool_call_as_anthropic_events() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    parts = openai_stream("gpt-4o", ["Hi", " there"], usage)
    tool = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"a":'},
                        }
                    ]
                },
                "finish_reason": None,
            }
        ],
    }
    more = json.loads(json.dumps(tool))
    more["choices"][0]["delta"]["tool_calls"][0] = {"index": 0, "function": {"arguments": "1}"}}
    more["choices"][0]["finish_reason"] = "tool_calls"
    data = b"".join([*parts[:2], sse(tool), sse(more), *parts[2:]])
    whole = run(ToAnthropicEvents(), data, [])
    for cut in range(1, len(data), 7):
        assert run(ToAnthropicEvents(), data, [cut]) == whole
    types = [(e["type"], e.get("index")) for e in events(whole)]
    assert types == [
        ("message_start", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("message_delta", None),
        ("message_stop", None),
    ]
    delta = events(whole)[-2]
    assert delta["delta"]["stop_reason"] == "tool_use"
    assert delta["usage"] == {"input_tokens": 9, "output_tokens": 4}


def test_an_openai_stream_ending_without_done_still_ends_the_anthropic_message() -> None:
    usage = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
    *parts, _done = openai_stream("gpt-4o", ["Hi"], usage)
    finished = json.loads(json.dumps(json.loads(parts[0][6:])))
    finished["choices"][0] = {"index": 0, "delta": {}, "finish_reason": "stop"}
    data = b"".join([parts[0], sse(finished), parts[1]])
    names = [e["type"] for e in events(run(ToAnthropicEvents(), data, []))]
    assert names[-2:] == ["message_delta", "message_stop"]
    # Cut before any finish_reason: the message stays unfinished, as the upstream left it.
    names = [e["type"] for e in events(run(ToAnthropicEvents(), parts[0], []))]
    assert "message_stop" not in names
