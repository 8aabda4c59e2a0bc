"""The SDKs agents use show the sidecar's sentence, and do not retry what will not clear
(issue 21, items 2 and 3).

Each SDK prints only what its ecosystem's error body names: the openai SDK 3.x the
`message` of `error` (or a top-level one), gql the GraphQL `errors`. The openai SDK
1.x is driven from its own virtualenv (`make openai1`), as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import textwrap
from pathlib import Path

import aiohttp
import anthropic
import openai
import pytest
from gql import Client, gql
from gql.transport.aiohttp import AIOHTTPTransport
from gql.transport.exceptions import TransportQueryError

from tests.helpers import sidecar_process

# Where `make openai1` (a prerequisite of `make unit`) puts openai 1.x.
OPENAI1_PYTHON = Path(
    os.environ.get("SIDECAR_OPENAI1_PYTHON", "/tmp/agent-sidecar-openai1/bin/python")
)

POLICY = """\
version: 1
services:
  openai:
    template: openai
    mode: mock
  limited:
    upstream: http://127.0.0.1:9
    llm: {api: openai}
    rate_limit:
      - {rate: 1/h, burst: 1}
  claude:
    template: anthropic
    mode: mock
  shop:
    upstream: http://127.0.0.1:9
    mode: mock
    graphql: {path: /graphql}
    allow:
      - {agents: [admin]}
"""

NO_MOCK = re.compile(r"Service 'openai' is in mock mode and none of its mock answers matches")


def _sentence(text: str) -> str:
    """The refusal's sentence up to its first quote, to find it in any SDK's message."""
    return text.split("'")[0]


@pytest.fixture
async def sidecar(tmp_path: Path):  # type: ignore[no-untyped-def]
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "policy.yaml").write_text(POLICY)
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY")}
    async with sidecar_process(tmp_path / "p", "--data-dir", str(tmp_path / "d"), env=env) as sc:
        yield sc


async def _attempts(sc, service: str, reason: str) -> int:  # type: ignore[no-untyped-def]
    """How many calls of `service` the sidecar answered with `reason`, from /metrics."""
    async with aiohttp.ClientSession() as s, s.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    total = 0
    for line in text.splitlines():
        if (
            line.startswith("sidecar_request_duration_seconds_count{")
            and f'service="{service}"' in line
            and f'reason="{reason}"' in line
        ):
            total += int(float(line.rsplit(" ", 1)[1]))
    return total


@pytest.mark.process
async def test_openai_3_shows_the_sentence_and_does_not_retry(sidecar) -> None:  # type: ignore[no-untyped-def]
    assert openai.__version__.split(".")[0] != "1", "the venv's openai is the 1.x one"
    agent = openai.AsyncOpenAI(base_url=f"{sidecar.url}/openai/v1", api_key="x", max_retries=2)
    with pytest.raises(openai.APIStatusError) as refused:
        await agent.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 501
    assert NO_MOCK.search(str(refused.value)), str(refused.value)
    # x-should-retry: false: one call, not three.
    assert await _attempts(sidecar, "openai", "no_mock") == 1
    await agent.close()


@pytest.mark.process
async def test_anthropic_shows_the_sentence_and_does_not_retry(sidecar) -> None:  # type: ignore[no-untyped-def]
    agent = anthropic.AsyncAnthropic(base_url=f"{sidecar.url}/claude", api_key="x", max_retries=2)
    with pytest.raises(anthropic.APIStatusError) as refused:
        await agent.messages.create(
            model="m", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert refused.value.status_code == 501
    assert "Service 'claude' is in mock mode" in str(refused.value), str(refused.value)
    assert await _attempts(sidecar, "claude", "no_mock") == 1
    await agent.close()


@pytest.mark.process
async def test_gql_shows_the_sentence(sidecar) -> None:  # type: ignore[no-untyped-def]
    transport = AIOHTTPTransport(
        url=f"{sidecar.url}/shop/graphql", headers={"X-Agent-Id": "research-bot"}
    )
    async with Client(transport=transport) as session:
        with pytest.raises(TransportQueryError) as refused:
            await session.execute(gql("{ products { id } }"))
    assert "research-bot" in str(refused.value), str(refused.value)
    assert refused.value.errors is not None
    assert refused.value.errors[0]["extensions"] == {"code": "forbidden"}
    # A refusal that a retry cannot clear says so to any client.
    async with (
        aiohttp.ClientSession() as client,
        client.post(f"{sidecar.url}/shop/graphql", json={"query": "{ products { id } }"}) as r,
    ):
        assert r.headers["X-Sidecar-Error"] == "forbidden"
        assert r.headers["x-should-retry"] == "false"


@pytest.mark.process
async def test_a_rate_limit_stays_retryable(sidecar) -> None:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{sidecar.url}/limited/v1/models") as r:
            assert r.headers["X-Sidecar-Error"] == "upstream_unreachable"
        async with s.get(f"{sidecar.url}/limited/v1/models") as r:
            body = await r.json(content_type=None)
            assert r.headers["X-Sidecar-Error"] == "rate_limited"
            assert "x-should-retry" not in r.headers
    assert body["message"] == body["detail"]
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["message"] == body["detail"]


OPENAI1_SCRIPT = textwrap.dedent(
    """
    import sys, openai
    assert openai.__version__.startswith("1."), openai.__version__
    agent = openai.OpenAI(base_url=sys.argv[1], api_key="x", max_retries=2)
    try:
        agent.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    except openai.APIStatusError as exc:
        print(exc.status_code, str(exc))
    """
)


@pytest.mark.process
@pytest.mark.skipif(
    not OPENAI1_PYTHON.exists(),
    reason=f"openai 1.x is not installed in {OPENAI1_PYTHON.parent.parent}: run `make openai1`",
)
async def test_openai_1_shows_the_sentence_and_does_not_retry(sidecar) -> None:  # type: ignore[no-untyped-def]
    proc = await asyncio.create_subprocess_exec(
        str(OPENAI1_PYTHON),
        "-c",
        OPENAI1_SCRIPT,
        f"{sidecar.url}/openai/v1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PATH": os.environ.get("PATH", "")},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    stdout = out.decode()
    assert proc.returncode == 0, err.decode()
    assert stdout.startswith("501 "), stdout
    assert NO_MOCK.search(stdout), stdout
    assert await _attempts(sidecar, "openai", "no_mock") == 1


def test_the_sidecars_python_is_not_the_openai1_one() -> None:
    assert Path(sys.executable) != OPENAI1_PYTHON
