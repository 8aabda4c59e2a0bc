"""translate: an agent written for one LLM API served by the other, through a real `sidecar run`.

The agents are the official `openai` and `anthropic` SDKs; the upstreams are
local aiohttp servers speaking each API's wire format (tests/steps/llm_upstream.py),
SSE included. What the upstream receives (path, headers, body) is checked on its side.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from aiohttp import web

from tests.helpers import SidecarProcess, sidecar_process
from tests.policy.test_loader import errors, write
from tests.steps.llm.test_llm import tokens
from tests.steps.llm_upstream import (
    LLMUpstream,
    anthropic_block_start,
    anthropic_delta,
    anthropic_end,
    anthropic_json,
    anthropic_start,
    sse,
)
from tests.steps.resilience.test_fallback import recording

ANTHROPIC_KEY = "sk-ant-upstream-secret"
OPENAI_KEY = "sk-openai-upstream-secret"
AGENT_KEY = "sk-agents-own-key"
ENV = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "OPENAI_API_KEY": OPENAI_KEY}


class Seen(LLMUpstream):
    """LLMUpstream that also notes each request's path and headers."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[dict[str, Any]] = []
        self.status = 200

    def app(self) -> web.Application:
        app = super().app()

        @web.middleware
        async def note(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            self.calls.append({"path": request.path_qs, "headers": dict(request.headers)})
            return await handler(request)

        app.middlewares.append(note)
        return app


def json_answer(doc: Any) -> list[bytes | asyncio.Event]:
    return [json.dumps(doc).encode()]


@asynccontextmanager
async def sidecar(tmp_path: Path, policy: str) -> AsyncIterator[SidecarProcess]:
    directory = tmp_path / "policies"
    directory.mkdir(exist_ok=True)
    (directory / "policy.yaml").write_text(policy)
    async with sidecar_process(directory, env={**os.environ, **ENV}) as proc:
        yield proc


def fallback_policy(primary: str, claude: str) -> str:
    return f"""
version: 1
services:
  gpt:
    upstream: {primary}/v1
    auth: {{type: bearer, token: "${{env:OPENAI_API_KEY}}"}}
    llm: {{api: openai}}
    fallback: [claude]
  claude:
    template: anthropic
    upstream: {claude}
    translate: openai->anthropic
    model_map: {{gpt-4o: claude-sonnet-4-5}}
"""


def openai_agent(proc: SidecarProcess, service: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{proc.url}/{service}", api_key=AGENT_KEY, max_retries=0, timeout=20
    )


def assert_upstream_credentials(headers: dict[str, str]) -> None:
    assert headers["x-api-key"] == ANTHROPIC_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in headers
    assert AGENT_KEY not in json.dumps(headers)
    assert OPENAI_KEY not in json.dumps(headers)


@pytest.mark.process
async def test_openai_agent_served_by_anthropic_when_the_primary_answers_503(upstream, tmp_path):
    seen: list[dict[str, Any]] = []
    primary = await upstream(recording(503, seen, "primary"))
    claude = Seen()
    base = await upstream(claude.app())
    async with sidecar(tmp_path, fallback_policy(primary, base)) as proc:
        agent = openai_agent(proc, "gpt")
        raw = await agent.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "hi"},
            ],
            temperature=0.2,
            stop="END",
        )
        assert raw.headers["X-Sidecar-Served-By"] == "claude"
        completion = raw.parse()
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.content == "Hello!"
        assert completion.choices[0].finish_reason == "stop"
        assert completion.model == "claude-sonnet-4-5"
        # Anthropic counts cached input apart; OpenAI's prompt_tokens is all of it.
        assert completion.usage is not None
        assert completion.usage.prompt_tokens == 20 + 100 + 1000
        assert completion.usage.completion_tokens == 7
        assert completion.usage.total_tokens == 1127
        async with aiohttp.ClientSession() as client:
            counted = await tokens(client, proc.admin)
            async with client.get(f"{proc.admin}/metrics") as r:
                metrics = await r.text()
        logs = proc.output
    for secret in (ANTHROPIC_KEY, OPENAI_KEY, AGENT_KEY):
        assert secret not in logs and secret not in metrics
    assert [s["upstream"] for s in seen] == ["primary"]
    assert seen[0]["headers"]["Authorization"] == f"Bearer {OPENAI_KEY}"
    [call] = claude.calls
    assert call["path"] == "/v1/messages"
    assert_upstream_credentials(call["headers"])
    assert claude.requests == [
        {
            "model": "claude-sonnet-4-5",
            "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 4096,
            "temperature": 0.2,
            "stop_sequences": ["END"],
        }
    ]
    # Token accounting reads the Anthropic answer on the service that served it.
    assert counted[("claude", "", "claude-sonnet-4-5", "input")] == 1120
    assert counted[("claude", "", "claude-sonnet-4-5", "output")] == 7


def anthropic_text_stream(gate: asyncio.Event) -> list[bytes | asyncio.Event]:
    return [
        anthropic_start("claude-sonnet-4-5", 25),
        anthropic_block_start(0),
        sse({"type": "ping"}, "ping"),
        anthropic_delta(0, "Hel"),
        gate,  # the rest waits until the agent has seen "Hel"
        anthropic_delta(0, "lo"),
        *anthropic_end(0, "end_turn", 15),
    ]


@pytest.mark.process
async def test_a_stopped_primary_falls_back_to_a_translated_stream_event_by_event(
    upstream, tmp_path, closed_port
):
    claude = Seen()
    gate = asyncio.Event()
    claude.script = anthropic_text_stream(gate)
    base = await upstream(claude.app())
    async with sidecar(tmp_path, fallback_policy(f"http://127.0.0.1:{closed_port}", base)) as proc:
        agent = openai_agent(proc, "gpt")
        stream = await agent.chat.completions.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=50,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = []
        async for chunk in stream:
            chunks.append(chunk)
            if chunk.choices and chunk.choices[0].delta.content == "Hel":
                # Translated as it streams: the upstream has not sent the rest yet.
                gate.set()
    assert gate.is_set()
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop"
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (25, 15)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    [request] = claude.requests
    assert request["stream"] is True and request["max_tokens"] == 50
    assert_upstream_credentials(claude.calls[0]["headers"])


def tool_stream() -> list[bytes | asyncio.Event]:
    block = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    return [
        anthropic_start("claude-sonnet-4-5", 30),
        anthropic_block_start(0),
        anthropic_delta(0, "Let me check."),
        sse({"type": "content_block_stop", "index": 0}, "content_block_stop"),
        anthropic_block_start(1, block),
        *(anthropic_delta(1, partial_json=part) for part in ['{"city": ', '"Par', 'is"}']),
        *anthropic_end(1, "tool_use", 12),
    ]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

CONVERSATION: list[Any] = [
    {"role": "developer", "content": "Use tools."},
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "Weather here?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
]


def direct_policy(base: str) -> str:
    return f"""
version: 1
services:
  claude:
    template: anthropic
    upstream: {base}
    translate: openai->anthropic
"""


@pytest.mark.process
async def test_an_openai_agent_calls_an_anthropic_service_with_tools(upstream, tmp_path):
    claude = Seen()
    claude.content_type = "application/json"
    answer = anthropic_json("claude-sonnet-4-5", {"input_tokens": 40, "output_tokens": 9})
    answer["content"] = [
        {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Paris"}}
    ]
    answer["stop_reason"] = "tool_use"
    claude.script = json_answer(answer)
    base = await upstream(claude.app())
    async with sidecar(tmp_path, direct_policy(base)) as proc:
        agent = openai_agent(proc, "claude")
        completion = await agent.chat.completions.create(
            model="claude-sonnet-4-5",
            messages=CONVERSATION,
            tools=TOOLS,
            tool_choice="required",
            max_completion_tokens=300,
            user="agent-7",
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        [call] = choice.message.tool_calls or []
        assert call.id == "toolu_9"
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris"}

        claude.content_type = "text/event-stream"
        claude.script = tool_stream()
        stream = await agent.chat.completions.create(
            model="claude-sonnet-4-5", messages=CONVERSATION, tools=TOOLS, stream=True
        )
        chunks = [chunk async for chunk in stream]
        # A call that is not translated does not carry the agent's credential either.
        async with (
            aiohttp.ClientSession() as client,
            client.get(
                f"{proc.url}/claude/v1/models", headers={"Authorization": f"Bearer {AGENT_KEY}"}
            ),
        ):
            pass
    *translated, untranslated = claude.calls
    assert untranslated["path"] == "/v1/models"
    assert_upstream_credentials(untranslated["headers"])
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Let me check."
    calls = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or ()]
    assert calls[0].index == 0 and calls[0].id == "toolu_1"
    assert calls[0].function is not None and calls[0].function.name == "get_weather"
    arguments = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert json.loads(arguments) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # The request as Anthropic documents it: system apart, tool_use and tool_result blocks.
    assert claude.requests[0] == {
        "model": "claude-sonnet-4-5",
        "system": "Use tools.",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "Weather here?"},
                    {
                        "type": "image",
                        "source": {
                            "type": "base64",
                            "media_type": "image/png",
                            "data": "iVBORw0KGgo=",
                        },
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_1",
                        "name": "get_weather",
                        "input": {"city": "Oslo"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "call_1", "content": "rain"}],
            },
        ],
        "max_tokens": 300,
        "tools": [
            {
                "name": "get_weather",
                "input_schema": TOOLS[0]["function"]["parameters"],
                "description": "The weather in a city",
            }
        ],
        "tool_choice": {"type": "any"},
        "metadata": {"user_id": "agent-7"},
    }
    for call in translated:
        assert call["path"] == "/v1/messages"
        assert_upstream_credentials(call["headers"])


@pytest.mark.process
async def test_anthropic_errors_reach_the_openai_agent_in_openai_shape(upstream, tmp_path):
    answers = 0

    async def overloaded(request: web.Request) -> web.Response:
        nonlocal answers
        await request.read()
        answers += 1
        if answers > 1:  # a 200 that is not what Anthropic sends
            return web.Response(text="<html>oops</html>", content_type="application/json")
        error = {"type": "error", "error": {"type": "invalid_request_error", "message": "bad x"}}
        return web.json_response(error, status=400)

    app = web.Application()
    app.router.add_post("/v1/messages", overloaded)
    base = await upstream(app)
    async with sidecar(tmp_path, direct_policy(base)) as proc:
        agent = openai_agent(proc, "claude")
        with pytest.raises(openai.BadRequestError) as caught:
            await agent.chat.completions.create(
                model="claude-sonnet-4-5", messages=[{"role": "user", "content": "hi"}]
            )
        # A call that cannot be translated is the sidecar's own refusal.
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                f"{proc.url}/claude/chat/completions",
                json={"model": "m", "n": 2, "messages": []},
            ) as r,
        ):
            assert r.status == 400
            assert r.headers["X-Sidecar-Error"] == "bad_request"
            assert "n other than 1" in (await r.json())["detail"]
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                f"{proc.url}/claude/chat/completions",
                json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
            ) as r,
        ):
            assert r.status == 502
            assert r.headers["X-Sidecar-Error"] == "untranslatable_answer"
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "bad x",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


def reverse_policy(base: str) -> str:
    return f"""
version: 1
services:
  gpt:
    template: openai
    upstream: {base}/v1
    translate: anthropic->openai
"""


@pytest.mark.process
async def test_an_anthropic_agent_calls_an_openai_service(upstream, tmp_path):
    gpt = Seen()
    base = await upstream(gpt.app())
    async with sidecar(tmp_path, reverse_policy(base)) as proc:
        agent = anthropic.AsyncAnthropic(
            base_url=f"{proc.url}/gpt", api_key=AGENT_KEY, max_retries=0, timeout=20
        )
        message = await agent.messages.create(
            model="gpt-4o",
            max_tokens=100,
            system="Be brief.",
            messages=[{"role": "user", "content": "hi"}],
        )
        assert [block.type for block in message.content] == ["text"]
        assert message.content[0].text == "Hello!"  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 5)
        async with agent.messages.stream(
            model="gpt-4o", max_tokens=100, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
        async with aiohttp.ClientSession() as client:
            counted = await tokens(client, proc.admin)
    assert text == "Hello!"
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 3
    assert gpt.requests[0] == {
        "model": "gpt-4o",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "hi"},
        ],
        "max_tokens": 100,
    }
    assert gpt.requests[1]["stream_options"] == {"include_usage": True}
    for call in gpt.calls:
        assert call["path"] == "/v1/chat/completions"
        assert call["headers"]["Authorization"] == f"Bearer {OPENAI_KEY}"
        assert "x-api-key" not in call["headers"] and "anthropic-version" not in call["headers"]
        assert AGENT_KEY not in json.dumps(call["headers"])
    assert counted[("gpt", "", "gpt-4o", "input")] == 12 + 11
    assert counted[("gpt", "", "gpt-4o", "output")] == 5 + 3


def test_translate_must_agree_with_llm_api(tmp_path: Path) -> None:
    write(
        tmp_path,
        "policy.yaml",
        """
        version: 1
        services:
          claude:
            upstream: http://127.0.0.1:1
            llm: {api: openai}
            translate: openai->anthropic
        """,
    )
    problems = errors(tmp_path)
    assert any("translate: openai->anthropic sends anthropic calls upstream" in p for p in problems)


@pytest.mark.process
async def test_an_anthropic_agent_falls_back_to_an_openai_service_streaming(
    upstream, tmp_path, closed_port
):
    gpt = Seen()
    base = await upstream(gpt.app())
    policy = f"""
version: 1
services:
  claude:
    template: anthropic
    upstream: http://127.0.0.1:{closed_port}
    retry: {{attempts: 2, on: [connect-error], backoff: {{initial: 10ms, max: 20ms}}}}
    fallback: [gpt]
  gpt:
    template: openai
    upstream: {base}/v1
    translate: anthropic->openai
    model_map: {{claude-test: gpt-4o}}
"""
    async with sidecar(tmp_path, policy) as proc:
        agent = anthropic.AsyncAnthropic(
            base_url=f"{proc.url}/claude", api_key=AGENT_KEY, max_retries=0, timeout=20
        )
        async with agent.messages.stream(
            model="claude-test",
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
        ) as stream:
            text = "".join([piece async for piece in stream.text_stream])
            final = await stream.get_final_message()
    assert text == "Hello!"
    assert final.model == "gpt-4o"
    assert final.stop_reason == "end_turn"
    [request] = gpt.requests
    assert request["model"] == "gpt-4o" and request["stream"] is True
    [call] = gpt.calls
    assert call["path"] == "/v1/chat/completions"
    assert call["headers"]["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert "anthropic-version" not in call["headers"]
    assert AGENT_KEY not in json.dumps(call["headers"])
    assert ANTHROPIC_KEY not in json.dumps(call["headers"])
