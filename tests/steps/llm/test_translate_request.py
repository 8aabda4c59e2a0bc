"""Request bodies alone: each API's call as the other documents it."""

from __future__ import annotations

import pytest

from sidecar.steps.llm.translate_answer import (
    completion_to_message,
    error_to_anthropic,
    message_to_completion,
)
from sidecar.steps.llm.translate_request import (
    Untranslatable,
    anthropic_to_openai,
    openai_to_anthropic,
)
from tests.steps.llm_upstream import anthropic_json, openai_json


def test_anthropic_tools_and_tool_results_as_openai() -> None:
    doc = {
        "model": "gpt-4o",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "Use tools."}],
        "stop_sequences": ["END"],
        "stream": True,
        "tools": [{"name": "f", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": [
                    {"type": "text", "text": "Calling."},
                    {"type": "tool_use", "id": "t1", "name": "f", "input": {"a": 1}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "42"},
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
    }
    assert anthropic_to_openai(doc) == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Use tools."},
            {"role": "user", "content": "go"},
            {
                "role": "assistant",
                "content": "Calling.",
                "tool_calls": [
                    {
                        "id": "t1",
                        "type": "function",
                        "function": {"name": "f", "arguments": '{"a": 1}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "t1", "content": "42"},
            {"role": "user", "content": "and?"},
        ],
        "max_tokens": 50,
        "stop": ["END"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "tools": [
            {
                "type": "function",
                "function": {"name": "f", "description": "", "parameters": {"type": "object"}},
            }
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }


def test_openai_calls_anthropic_cannot_serve_are_refused() -> None:
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    for extra, why in [
        ({"n": 3}, "n other than 1"),
        ({"functions": [{"name": "f"}]}, "deprecated functions"),
        ({"messages": [{"role": "function", "content": "x"}]}, "role 'function'"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "input_audio"),
    ]:
        with pytest.raises(Untranslatable, match=why):
            openai_to_anthropic({**base, **extra})


def test_temperature_is_capped_and_max_tokens_defaults() -> None:
    out = openai_to_anthropic({"model": "m", "messages": [], "temperature": 1.7})
    assert out["temperature"] == 1.0
    assert out["max_tokens"] == 4096


def test_json_answers_and_errors_both_ways() -> None:
    completion = message_to_completion(
        anthropic_json("claude-x", {"input_tokens": 3, "output_tokens": 2}), created=1
    )
    assert completion["choices"][0]["message"]["content"] == "Hello!"
    assert completion["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    message = completion_to_message(openai_json("gpt-4o", 12, 5))
    assert message["content"] == [{"type": "text", "text": "Hello!"}]
    assert message["stop_reason"] == "end_turn"
    assert message["usage"] == {"input_tokens": 12, "output_tokens": 5}
    error = {"error": {"message": "slow down", "type": "requests", "code": "rate_limit_exceeded"}}
    assert error_to_anthropic(error, 429) == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "slow down"},
    }
