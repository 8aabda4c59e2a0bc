"""Budgets and token limits count streamed chat completions, through the real `sidecar
run` process with the openai SDK: the sidecar asks for the usage the agent did not,
hides what that adds, and estimates where no usage comes at all."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from tests.helpers import SidecarProcess, sidecar_process
from tests.steps.llm_upstream import LLMUpstream, openai_stream

pytestmark = pytest.mark.process

MESSAGES: list[Any] = [{"role": "user", "content": "Write a haiku about otters."}]
WORDS = ["Otters ", "float ", "and ", "dream."]


@pytest.fixture
async def sidecar(upstream, tmp_path: Path) -> AsyncIterator[tuple[SidecarProcess, LLMUpstream]]:
    """`llm` reports usage when asked (14 tokens a stream), `mute` never does; both have a
    budget, `limited` a token limit smaller than one answer."""
    llm = LLMUpstream()
    base = await upstream(llm.app())
    mute = LLMUpstream()
    mute.script = openai_stream("gpt-4o", WORDS, None)  # ignores stream_options
    mute_base = await upstream(mute.app())
    (tmp_path / "p.yaml").write_text(
        f"""version: 1
services:
  llm:
    upstream: {base}
    llm: {{api: openai}}
    budget: {{tokens: 1000/day}}
  mute:
    upstream: {mute_base}
    llm: {{api: openai}}
    budget: {{tokens: 1000/day}}
  limited:
    upstream: {base}
    llm: {{api: openai}}
    rate_limit: [{{tokens: 10/h, burst: 10}}]
"""
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    async with sidecar_process(tmp_path, "--data-dir", str(tmp_path / "data"), env=env) as proc:
        yield proc, llm


def _client(proc: SidecarProcess, service: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=f"{proc.url}/{service}/v1",
        api_key="sk-agent-placeholder",
        default_headers={"X-Agent-Id": "writer"},
        max_retries=0,
    )


async def _stream(client: openai.AsyncOpenAI, **extra: Any) -> list[Any]:
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, **extra
    )
    return [chunk async for chunk in stream]


async def _spent(proc: SidecarProcess, service: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(f"{proc.admin}/services") as r:
        budgets = (await r.json())["services"][service]["budget"]
    return float(budgets[0]["spent"])


async def test_a_stream_without_include_usage_is_counted_and_looks_as_asked(sidecar):
    proc, llm = sidecar
    async with _client(proc, "llm") as client:
        chunks = await _stream(client)
    # The agent gets the stream it asked for: text chunks only, no usage anywhere...
    assert [c.choices[0].delta.content for c in chunks] == ["Hel", "lo", "!"]
    assert all(c.usage is None for c in chunks)
    # ...while the upstream was asked for usage, and the budget charged what it reported.
    assert llm.requests[-1]["stream_options"] == {"include_usage": True}
    assert await _spent(proc, "llm") == 14


async def test_the_stream_is_the_bytes_the_upstream_sends_without_usage(sidecar):
    proc, _ = sidecar
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            f"{proc.url}/llm/v1/chat/completions",
            json={"model": "gpt-4o", "messages": MESSAGES, "stream": True},
            headers={"X-Agent-Id": "writer"},
        ) as r,
    ):
        body = await r.read()
    assert body == b"".join(openai_stream("gpt-4o", ["Hel", "lo", "!"], None))
    # An agent that asked for usage itself gets it, as before.
    async with _client(proc, "llm") as client:
        chunks = await _stream(client, stream_options={"include_usage": True})
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 14
    assert await _spent(proc, "llm") == 28


async def test_an_explicit_include_usage_false_is_counted_too(sidecar):
    proc, llm = sidecar
    async with _client(proc, "llm") as client:
        chunks = await _stream(client, stream_options={"include_usage": False})
    assert all(c.usage is None and c.choices for c in chunks)
    assert llm.requests[-1]["stream_options"] == {"include_usage": True}
    assert await _spent(proc, "llm") == 14


async def test_a_token_limit_counts_a_stream(sidecar):
    proc, _ = sidecar
    async with _client(proc, "limited") as client:
        await _stream(client)  # 14 tokens: the bucket of 10 is in debt
        with pytest.raises(openai.RateLimitError) as refused:
            await _stream(client)
    assert refused.value.response.headers["X-Sidecar-Error"] == "rate_limited"


async def test_without_any_usage_the_text_is_estimated(sidecar):
    """31 characters of request text and 23 of answer: 8 + 6 tokens at 4 characters each."""
    proc, _ = sidecar
    async with _client(proc, "mute") as client:
        chunks = await _stream(client)
    assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == "".join(WORDS)
    assert await _spent(proc, "mute") == 8 + 6
