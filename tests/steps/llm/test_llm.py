"""LLM awareness through a real sidecar: tokens per service, agent and model in
/metrics, GenAI attributes on spans, streams that stay streams.

The upstream is a real local aiohttp server speaking the OpenAI and Anthropic
wire formats (tests/steps/llm_upstream.py); the agent is a real HTTP client.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import eventually
from tests.steps.llm_upstream import LLMUpstream, anthropic_stream, openai_stream, sse

TOKENS = "sidecar_llm_tokens_total"


def policy(base: str, *, extra: str = "") -> str:
    return (
        "version: 1\nservices:\n"
        f"  oai:\n    upstream: {base}/v1\n    llm: {{api: openai}}\n{extra}"
        f"  claude:\n    upstream: {base}/v1\n    llm: {{api: anthropic}}\n"
        f"  plain:\n    upstream: {base}\n"
    )


async def tokens(client: aiohttp.ClientSession, admin: str) -> dict[tuple[str, ...], float]:
    """(service, agent, model, kind) -> tokens, from the admin port's /metrics."""
    async with client.get(f"{admin}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, ...], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == TOKENS:
                labels = sample.labels
                key = (labels["service"], labels["agent"], labels["model"], labels["kind"])
                out[key] = sample.value
    return out


async def post(
    client: aiohttp.ClientSession, url: str, body: dict[str, Any], agent: str | None = None
) -> tuple[int, bytes]:
    headers = {"X-Agent-Id": agent} if agent else {}
    async with client.post(url, json=body, headers=headers) as r:
        return r.status, await r.read()


async def read_exactly(response: aiohttp.ClientResponse, got: bytearray, expected: bytes) -> None:
    """Read what the sidecar relays until `got` is as long as `expected` (fails after 10 s)."""

    async def read() -> None:
        while len(got) < len(expected):
            chunk = await response.content.readany()
            assert chunk, f"the answer ended after {bytes(got)!r}"
            got.extend(chunk)

    await asyncio.wait_for(read(), 10)
    assert bytes(got) == expected


async def test_openai_json_answers_count_per_agent_and_model(upstream, start_sidecar, client):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base))
    url = f"{sc.url}/oai/chat/completions"
    messages = [{"role": "user", "content": "hi"}]
    for agent, model in [("a1", "gpt-4o"), ("a1", "gpt-4o"), ("a2", "gpt-4o-mini")]:
        status, body = await post(client, url, {"model": model, "messages": messages}, agent)
        assert status == 200
        assert json.loads(body)["usage"]["prompt_tokens"] == 12  # unchanged for the agent
    assert await tokens(client, sc.admin) == {
        ("oai", "a1", "gpt-4o", "input"): 24,
        ("oai", "a1", "gpt-4o", "output"): 10,
        ("oai", "a2", "gpt-4o-mini", "input"): 12,
        ("oai", "a2", "gpt-4o-mini", "output"): 5,
    }


async def test_a_template_marks_the_service_and_gzip_answers_are_read(
    upstream, start_sidecar, client
):
    llm = LLMUpstream()
    llm.gzip = True
    base = await upstream(llm.app())
    sc = await start_sidecar(
        f"version: 1\nservices:\n  openai:\n    template: openai\n    upstream: {base}/v1\n",
        env={"OPENAI_API_KEY": "sk-test-not-a-secret"},
    )
    async with client.post(
        f"{sc.url}/openai/chat/completions",
        json={"model": "gpt-4o", "messages": []},
        headers={"Accept-Encoding": "gzip", "X-Agent-Id": "a1"},
    ) as r:
        assert r.status == 200
        assert r.headers["Content-Encoding"] == "gzip"  # passed on as the upstream sent it
        await r.read()
    assert await tokens(client, sc.admin) == {
        ("openai", "a1", "gpt-4o", "input"): 12,
        ("openai", "a1", "gpt-4o", "output"): 5,
    }
    async with client.get(f"{sc.admin}/metrics") as r:
        assert "sk-test-not-a-secret" not in await r.text()


async def test_openai_stream_reaches_the_agent_event_by_event_and_counts_its_usage(
    upstream, start_sidecar, client
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base))
    usage = {"prompt_tokens": 31, "completion_tokens": 2, "total_tokens": 33}
    first, second, last, done = openai_stream("gpt-4o", ["Hel", "lo"], usage)
    first_seen, half_seen = asyncio.Event(), asyncio.Event()
    cut = len(last) // 2  # inside the usage event's JSON
    llm.script = [first, first_seen, second, last[:cut], half_seen, last[cut:], done]
    sent = b"".join([first, second, last, done])
    request = {
        "model": "gpt-4o",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "hi"}],
    }
    got = bytearray()
    async with client.post(f"{sc.url}/oai/chat/completions", json=request) as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "text/event-stream"
        # The first event reaches the agent while the upstream still holds the rest.
        await read_exactly(r, got, first)
        first_seen.set()
        # Half an event: the sidecar passes a chunk that ends inside an event on at once.
        await read_exactly(r, got, first + second + last[:cut])
        half_seen.set()
        got.extend(await r.read())
    assert bytes(got) == sent  # byte for byte what the upstream sent
    assert await tokens(client, sc.admin) == {
        ("oai", "", "gpt-4o", "input"): 31,
        ("oai", "", "gpt-4o", "output"): 2,
    }


async def test_anthropic_json_and_stream_count_input_with_cache_and_output(
    upstream, start_sidecar, client
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base))
    url = f"{sc.url}/claude/messages"
    request = {"model": "claude-sonnet-4-5", "max_tokens": 64, "messages": []}
    status, body = await post(client, url, request, "a1")
    assert status == 200 and json.loads(body)["usage"]["input_tokens"] == 20
    async with client.post(
        url, json={**request, "stream": True}, headers={"X-Agent-Id": "a1"}
    ) as r:
        streamed = await r.read()
    assert streamed == b"".join(anthropic_stream("claude-sonnet-4-5", 25, 15))
    # JSON: 20 input + 100 written to + 1000 read from the cache; stream: 25 in, 15 out.
    assert await tokens(client, sc.admin) == {
        ("claude", "a1", "claude-sonnet-4-5", "input"): 20 + 100 + 1000 + 25,
        ("claude", "a1", "claude-sonnet-4-5", "output"): 7 + 15,
    }


async def test_garbage_and_unknown_answers_pass_unchanged_and_count_nothing(
    upstream, start_sidecar, client
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base))
    url = f"{sc.url}/oai/chat/completions"
    cases = [
        ("application/json", [b'{"usage": {"prompt_tokens": 5', b", garbage \xff\xfe"]),
        (
            "text/event-stream",
            [b"data: {not json\n\n", b'data: {"usage": {"prompt_tokens": x}}\n\n'],
        ),
        ("text/event-stream", [b'data: {"usage": ["prompt_tokens", 5]}\n\n']),
        ("text/plain", [b'{"usage": {"prompt_tokens": 5, "completion_tokens": 1}}']),
    ]
    for content_type, parts in cases:
        llm.content_type = content_type
        llm.script = list(parts)
        status, body = await post(client, url, {"model": "gpt-4o", "messages": []})
        assert status == 200
        assert body == b"".join(parts)
    assert await tokens(client, sc.admin) == {}


async def test_a_streamed_upload_is_not_read_and_the_answer_names_the_model(
    upstream, start_sidecar, client
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base))

    async def chunked():  # no Content-Length: the sidecar does not hold the body
        yield json.dumps({"model": "gpt-4o", "messages": []}).encode()

    async with client.post(
        f"{sc.url}/oai/chat/completions",
        data=chunked(),
        headers={"Content-Type": "application/json"},
    ) as r:
        assert r.status == 200
        await r.read()
    assert llm.requests == [{"model": "gpt-4o", "messages": []}]
    # The model the answer names (the request's was not read).
    assert await tokens(client, sc.admin) == {
        ("oai", "", "gpt-4o", "input"): 12,
        ("oai", "", "gpt-4o", "output"): 5,
    }


async def test_stream_usage_asks_openai_for_usage_when_the_agent_did_not(
    upstream, start_sidecar, client
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(
        policy(base).replace("{api: openai}", "{api: openai, stream_usage: true}")
    )
    url = f"{sc.url}/oai/chat/completions"
    plain = {"model": "gpt-4o", "stream": True, "messages": []}
    refused = {**plain, "stream_options": {"include_usage": False}}
    for request in (plain, refused):
        async with client.post(url, json=request) as r:
            assert r.status == 200
            await r.read()
    assert llm.requests[0]["stream_options"] == {"include_usage": True}
    assert llm.requests[1]["stream_options"] == {"include_usage": False}  # the agent's choice
    assert await tokens(client, sc.admin) == {
        ("oai", "", "gpt-4o", "input"): 11,
        ("oai", "", "gpt-4o", "output"): 3,
    }


async def test_a_service_without_llm_is_not_read(upstream, start_sidecar, client):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base))
    llm.script = [sse({"model": "m", "usage": {"prompt_tokens": 1, "completion_tokens": 1}})]
    status, _ = await post(client, f"{sc.url}/plain/raw", {"model": "m"})
    assert status == 200
    assert await tokens(client, sc.admin) == {}


async def test_spans_carry_gen_ai_attributes(upstream, start_sidecar, client):
    from tests.otlp_receiver import Receiver

    receiver = Receiver()
    collector = await upstream(receiver.app())
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base), env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector})
    request = {"model": "claude-sonnet-4-5", "max_tokens": 64, "stream": True, "messages": []}
    async with client.post(f"{sc.url}/claude/messages", json=request) as r:
        assert r.status == 200
        await r.read()
    status, _ = await post(client, f"{sc.url}/oai/chat/completions", {"model": "gpt-4o"}, "a1")
    assert status == 200
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    servers = {s.attributes["sidecar.service"]: s for s in receiver.spans if s.kind == "server"}
    claude = servers["claude"].attributes
    assert claude["gen_ai.system"] == "anthropic"
    assert claude["gen_ai.operation.name"] == "chat"
    assert claude["gen_ai.request.model"] == "claude-sonnet-4-5"
    assert claude["gen_ai.response.model"] == "claude-sonnet-4-5"
    assert claude["gen_ai.usage.input_tokens"] == 25
    assert claude["gen_ai.usage.output_tokens"] == 15
    oai = servers["oai"].attributes
    assert oai["gen_ai.system"] == "openai"
    assert oai["gen_ai.request.model"] == "gpt-4o"
    assert (oai["gen_ai.usage.input_tokens"], oai["gen_ai.usage.output_tokens"]) == (12, 5)


async def test_token_limits_admit_while_tokens_are_left_and_charge_the_usage(
    upstream, start_sidecar, client
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    limits = "    rate_limit:\n      - {tokens: 20/h, burst: 20, per: agent}\n"
    sc = await start_sidecar(policy(base, extra=limits))
    url = f"{sc.url}/oai/chat/completions"
    request = {"model": "gpt-4o", "messages": []}
    # 20 tokens: the first answer costs 17 (12 in, 5 out), the second is let through
    # with 3 left and puts the bucket 14 tokens in debt, the third waits ~42 minutes.
    for _ in range(2):
        status, _ = await post(client, url, request, "a1")
        assert status == 200
    async with client.post(url, json=request, headers={"X-Agent-Id": "a1"}) as r:
        assert r.status == 429
        assert r.headers["X-Sidecar-Error"] == "rate_limited"
        assert int(r.headers["Retry-After"]) > 2000
        problem = await r.json(content_type=None)
        assert "token limit" in problem["detail"]
    assert len(llm.requests) == 2  # the refused call never reached the upstream
    status, _ = await post(client, url, request, "a2")  # another agent's bucket is full
    assert status == 200
    # Call limits are untouched by tokens: the Anthropic service has none at all.
    status, _ = await post(client, f"{sc.url}/claude/messages", {"model": "c"}, "a1")
    assert status == 200


async def test_a_token_limit_needs_llm(start_sidecar, tmp_path):
    from sidecar.policy.loader import PolicyError, load_policy

    (tmp_path / "p.yaml").write_text(
        "version: 1\nservices:\n  s:\n    upstream: http://127.0.0.1:1\n"
        "    rate_limit: {tokens: 100/min}\n"
    )
    try:
        load_policy(str(tmp_path))
    except PolicyError as err:
        assert "needs llm:" in str(err)
    else:
        raise AssertionError("a token limit without llm: was accepted")


async def test_an_answer_cut_short_counts_the_usage_it_reported(upstream, start_sidecar, client):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(policy(base))
    start, *_ = anthropic_stream("claude-x", 25, 15)
    llm.script = [start, asyncio.Event()]  # message_start, then nothing until the agent leaves
    request = {"model": "claude-x", "stream": True, "messages": []}
    got = bytearray()
    async with client.post(f"{sc.url}/claude/messages", json=request) as r:
        await read_exactly(r, got, start)
        r.close()  # the agent hangs up mid-stream

    async def counted() -> bool:
        return await tokens(client, sc.admin) == {
            ("claude", "", "claude-x", "input"): 25,
            ("claude", "", "claude-x", "output"): 1,  # as message_start reports it
        }

    await eventually(counted, "the usage of message_start counted")
