"""boto3's bedrock-runtime and anthropic's AnthropicBedrock through the `bedrock` template.

The fake Bedrock checks every signature with botocore; the agents hold keys
it does not know. Token usage is counted from both answer shapes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import aiohttp
import anthropic
import boto3
from aiohttp import web
from botocore.config import Config

from sidecar.steps.llm.llm_usage import Scanner, kind_of
from tests.cloud.fake_bedrock import FakeBedrock, frame
from tests.conftest import RunningSidecar, StartSidecar
from tests.steps.llm.test_llm import tokens

KEY_ID = "AKIASIDECARBEDROCK01"
SECRET = "bedrock/secret+key-of-the-sidecar"
MODEL = "anthropic.claude-sonnet-4-5-20250929-v1:0"
Upstreams = Callable[[web.Application], Awaitable[str]]


async def start(
    start_sidecar: StartSidecar, upstream: Upstreams
) -> tuple[RunningSidecar, FakeBedrock]:
    fake = FakeBedrock(key_id=KEY_ID, secret=SECRET)
    base = await upstream(fake.app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          bedrock:
            template: bedrock
            upstream: {base}
        """,
        env={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET},
    )
    return sidecar, fake


async def test_boto3_bedrock_runtime_invoke_and_converse(
    start_sidecar: StartSidecar, upstream: Upstreams
) -> None:
    sidecar, fake = await start(start_sidecar, upstream)
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=f"{sidecar.url}/bedrock",
        region_name="us-east-1",
        aws_access_key_id="AKIAAGENTWRONGKEY000",
        aws_secret_access_key="agent-wrong-secret",
        config=Config(retries={"max_attempts": 1}),
    )
    client.meta.events.register(
        "before-send.*", lambda request, **_: request.headers.__setitem__("X-Agent-Id", "bot")
    )
    body = {
        "anthropic_version": "bedrock-2023-05-31",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hello"}],
    }

    def calls() -> tuple[dict[str, object], dict[str, object]]:
        invoked = client.invoke_model(modelId=MODEL, body=json.dumps(body))
        conversed = client.converse(
            modelId=MODEL, messages=[{"role": "user", "content": [{"text": "Hi"}]}]
        )
        return json.loads(invoked["body"].read()), conversed

    invoked, conversed = await asyncio.to_thread(calls)
    assert fake.refused == []
    assert invoked["content"] == [{"type": "text", "text": "Hello from Bedrock"}]
    assert conversed["output"] == {
        "message": {"role": "assistant", "content": [{"text": "Hi there"}]}
    }
    # The model id's ':' travels as %3A and was signed double-encoded, as AWS wants.
    assert fake.seen[0]["path"] == f"/model/{MODEL.replace(':', '%3A')}/invoke"
    async with aiohttp.ClientSession() as http:
        counted = await tokens(http, sidecar.admin)
    # Both shapes counted under the model the path names: InvokeModel's usage.input_tokens
    # (12 in, 5 out) and Converse's usage.inputTokens (7 in, 3 out).
    assert counted[("bedrock", "bot", MODEL, "input")] == 12 + 7
    assert counted[("bedrock", "bot", MODEL, "output")] == 5 + 3


async def test_streamed_answers_are_counted(
    start_sidecar: StartSidecar, upstream: Upstreams
) -> None:
    sidecar, fake = await start(start_sidecar, upstream)
    client = boto3.client(
        "bedrock-runtime",
        endpoint_url=f"{sidecar.url}/bedrock",
        region_name="us-east-1",
        aws_access_key_id="AKIAAGENTWRONGKEY000",
        aws_secret_access_key="agent-wrong-secret",
        config=Config(retries={"max_attempts": 1}),
    )
    body = {"anthropic_version": "bedrock-2023-05-31", "max_tokens": 64, "messages": []}

    def calls() -> tuple[str, str]:
        streamed = client.invoke_model_with_response_stream(modelId=MODEL, body=json.dumps(body))
        text = ""
        for event in streamed["body"]:
            chunk = json.loads(event["chunk"]["bytes"])
            if chunk["type"] == "content_block_delta":
                text += chunk["delta"]["text"]
        conversed = client.converse_stream(
            modelId=MODEL, messages=[{"role": "user", "content": [{"text": "Hi"}]}]
        )
        said = "".join(
            e["contentBlockDelta"]["delta"]["text"]
            for e in conversed["stream"]
            if "contentBlockDelta" in e
        )
        return text, said

    assert await asyncio.to_thread(calls) == ("Streamed hello", "Hi")
    assert fake.refused == []
    async with aiohttp.ClientSession() as http:
        counted = await tokens(http, sidecar.admin)
    # InvokeModel's stream (21 in, 4 out) and ConverseStream's metadata event (9 in, 2 out).
    assert counted[("bedrock", "", MODEL, "input")] == 21 + 9  # no X-Agent-Id: agent ""
    assert counted[("bedrock", "", MODEL, "output")] == 4 + 2


async def test_anthropic_bedrock_client(start_sidecar: StartSidecar, upstream: Upstreams) -> None:
    sidecar, fake = await start(start_sidecar, upstream)
    client = anthropic.AsyncAnthropicBedrock(
        base_url=f"{sidecar.url}/bedrock",
        aws_region="us-east-1",
        aws_access_key="AKIAAGENTWRONGKEY000",
        aws_secret_key="agent-wrong-secret",
        max_retries=0,
    )
    message = await client.messages.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "Hello"}]
    )
    await client.close()
    assert fake.refused == []
    assert message.content[0].text == "Hello from Bedrock"  # type: ignore[union-attr]
    assert message.usage.input_tokens == 12


async def test_a_wrong_sidecar_key_is_refused_by_the_fake(
    start_sidecar: StartSidecar, upstream: Upstreams
) -> None:
    # The fake's check can fail: the same call signed with another secret is refused.
    fake = FakeBedrock(key_id=KEY_ID, secret="another-secret")
    base = await upstream(fake.app())
    sidecar = await start_sidecar(
        f"""
        version: 1
        services:
          bedrock: {{template: bedrock, upstream: "{base}"}}
        """,
        env={"AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET},
    )
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{sidecar.url}/bedrock/model/{MODEL}/invoke", json={"messages": []}) as resp,
    ):
        assert resp.status == 403
    assert fake.refused == ["signature does not match"]


def test_event_stream_frames_are_cut_across_chunks() -> None:
    data = b"".join(
        [
            frame("messageStart", {"role": "assistant"}),
            frame("metadata", {"usage": {"inputTokens": 5, "outputTokens": 7}}),
        ]
    )
    scanner = Scanner("eventstream")
    for i in range(len(data)):  # one byte at a time
        scanner.feed(data[i : i + 1])
    usage = scanner.finish()
    assert (usage.input, usage.output) == (5, 7)
    assert kind_of("application/vnd.amazon.eventstream") == "eventstream"
