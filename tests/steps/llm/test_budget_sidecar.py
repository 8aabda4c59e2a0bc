"""Budgets and shared token limits through the real sidecar, with a local OpenAI-format
upstream: 429 budget_exhausted, spend that survives kill -9, and two sidecar processes
sharing one Redis."""

from __future__ import annotations

import json
import signal
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import sidecar_process
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401
from tests.steps.llm_upstream import LLMUpstream

REQUEST = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}


def policy(base: str, service: str) -> str:
    return f"""
        version: 1
        services:
          llm:
            upstream: {base}
            llm: {{api: openai}}
        {service}
        """


async def chat(
    client: aiohttp.ClientSession, url: str, agent: str = "a", service: str = "llm", **extra: Any
) -> tuple[int, dict[str, str], bytes]:
    async with client.post(
        f"{url}/{service}/v1/chat/completions",
        json={**REQUEST, **extra},
        headers={"X-Agent-Id": agent},
    ) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def metric(client: aiohttp.ClientSession, admin: str, name: str) -> dict[str, float]:
    async with client.get(f"{admin}/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, _, value = line.rpartition(" ")
            out[labels[len(name) :]] = float(value)
    return out


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # The in-process sidecar's data dir (budgets.db), never the working directory.
    path = tmp_path / "data"
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(path))
    return path


async def test_a_spent_budget_answers_429_budget_exhausted_with_when_it_resets(
    upstream, start_sidecar, client, data_dir
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    budget = "    budget: {tokens: 20/day, per: agent}"
    sc = await start_sidecar(policy(base, budget))
    # Each answer costs 17 tokens (12 in, 5 out): the second is admitted with 3 left.
    for _ in range(2):
        status, _, body = await chat(client, sc.url)
        assert status == 200 and json.loads(body)["usage"]["prompt_tokens"] == 12
    status, headers, body = await chat(client, sc.url)
    assert status == 429
    assert headers["Content-Type"] == "application/problem+json"
    assert headers["X-Sidecar-Error"] == "budget_exhausted"
    assert 1 <= int(headers["Retry-After"]) <= 86400
    problem = json.loads(body)
    assert problem["reason"] == "budget_exhausted" and problem["service"] == "llm"
    assert problem["budget"] == "tokens 20/day per agent"
    assert (problem["limit"], problem["spent"], problem["window"]) == (20, 34, "day")
    assert problem["resets_at"].endswith("T00:00:00Z")
    assert problem["resets_at"] in problem["detail"]
    assert len(llm.requests) == 2  # the refused call never reached the upstream
    # Another agent's budget is its own.
    assert (await chat(client, sc.url, agent="b"))[0] == 200
    spent = await metric(client, sc.admin, "sidecar_llm_budget_spent_total")
    assert spent == {'{budget="tokens 20/day per agent",service="llm"}': 51.0}
    refused = await metric(client, sc.admin, "sidecar_llm_budget_exhausted_total")
    assert refused == {'{budget="tokens 20/day per agent",service="llm"}': 1.0}
    assert (data_dir / "budgets.db").exists()


async def test_a_cost_budget_prices_each_model_and_shows_in_services(
    upstream, start_sidecar, client, data_dir
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    service = """
            prices:
              gpt-4o: {input: 1/1K, output: 2/1K}
              default: {input: 10/1K, output: 10/1K}
            budget: {cost: 0.05/hour}
        """
    sc = await start_sidecar(policy(base, service))
    # gpt-4o: 12 * 0.001 + 5 * 0.002 = 0.022 a call; a model not in the table: 0.17.
    assert (await chat(client, sc.url))[0] == 200
    async with client.get(f"{sc.admin}/services") as resp:
        view = (await resp.json())["services"]["llm"]["budget"]
    assert view[0]["budget"] == "cost 0.05/hour per service"
    assert view[0]["spent"] == pytest.approx(0.022)
    assert view[0]["remaining"] == pytest.approx(0.028)
    assert (await chat(client, sc.url, agent="b", model="llama3"))[0] == 200
    status, _, body = await chat(client, sc.url, agent="c")
    assert status == 429
    assert json.loads(body)["spent"] == pytest.approx(0.192)


def write_policy(directory: Path, text: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "policy.yaml").write_text(textwrap.dedent(text))
    return directory


@pytest.mark.process
async def test_a_budget_stays_spent_after_kill_9_and_a_restart(upstream, client, tmp_path):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    policies = write_policy(
        tmp_path / "policies",
        f"""
        version: 1
        services:
          llm:
            upstream: {base}
            llm: {{api: openai, stream_usage: true}}
            budget: {{tokens: 30/month, per: agent}}
        """,
    )
    data = str(tmp_path / "data")
    async with sidecar_process(policies, "--data-dir", data) as first:
        assert (await chat(client, first.url))[0] == 200  # 17 tokens (JSON)
        # A streamed answer (14 tokens, its usage in the last event) charged before it ends.
        status, _, body = await chat(client, first.url, stream=True)
        assert status == 200 and body.endswith(b"data: [DONE]\n\n")
        assert (await chat(client, first.url))[0] == 429
        first.proc.send_signal(signal.SIGKILL)
        await first.proc.wait()
    async with sidecar_process(policies, "--data-dir", data) as second:
        status, _, body = await chat(client, second.url)
        assert status == 429
        assert json.loads(body)["spent"] == 31
        assert (await chat(client, second.url, agent="b"))[0] == 200
    assert len(llm.requests) == 3


@pytest.mark.process
async def test_two_sidecar_processes_share_token_limits_and_budgets_in_redis(
    upstream, client, tmp_path, redis_server
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    url = redis_server.url
    policies = write_policy(
        tmp_path / "policies",
        f"""
        version: 1
        services:
          budgeted:
            upstream: {base}
            llm: {{api: openai}}
            budget: {{tokens: 20/day, per: agent, backend: "{url}"}}
          limited:
            upstream: {base}
            llm: {{api: openai}}
            rate_limit:
              - {{tokens: 20/h, burst: 20, backend: "{url}"}}
        """,
    )
    async with (
        sidecar_process(policies, "--data-dir", str(tmp_path / "d1")) as one,
        sidecar_process(policies, "--data-dir", str(tmp_path / "d2")) as two,
    ):
        for service in ("budgeted", "limited"):
            # 17 tokens through the first sidecar, 17 more through the second (admitted
            # with 3 left), then neither admits the next call.
            assert (await chat(client, one.url, service=service))[0] == 200
            assert (await chat(client, two.url, service=service))[0] == 200
            for sidecar in (one, two):
                status, headers, _ = await chat(client, sidecar.url, service=service)
                assert status == 429
                expected = "budget_exhausted" if service == "budgeted" else "rate_limited"
                assert headers["X-Sidecar-Error"] == expected
        # Per agent: another agent's budget is untouched, in both sidecars.
        assert (await chat(client, two.url, agent="b", service="budgeted"))[0] == 200
    assert len(llm.requests) == 5


async def test_a_spent_budget_lets_the_fallback_serve(upstream, start_sidecar, client, data_dir):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          llm:
            upstream: {base}
            llm: {{api: openai}}
            budget: {{tokens: 10/hour}}
            fallback: [spare]
          spare:
            upstream: {base}
            llm: {{api: openai}}
        """
    )
    status, first, _ = await chat(client, sc.url)  # 17 tokens: over the 10
    assert status == 200 and "X-Sidecar-Served-By" not in first
    status, second, _ = await chat(client, sc.url)
    assert status == 200 and second["X-Sidecar-Served-By"] == "spare"


async def test_the_backend_password_never_shows(
    upstream, start_sidecar, client, data_dir, closed_port, caplog
):
    llm = LLMUpstream()
    base = await upstream(llm.app())
    backend = f"redis://:hunter2-secret@127.0.0.1:{closed_port}/0"
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          llm:
            upstream: {base}
            llm: {{api: openai}}
            budget: {{tokens: 1M/day, backend: "{backend}", fail_open: false}}
          tok:
            upstream: {base}
            llm: {{api: openai}}
            rate_limit: [{{tokens: 1000000/h, backend: "{backend}"}}]
        """
    )
    # The token limit lets calls through while Redis is down (fail_open by default).
    assert (await chat(client, sc.url, service="tok"))[0] == 200
    status, headers, body = await chat(client, sc.url)
    # Redis is down: the budget refuses (fail_open: false), saying so.
    assert status == 429 and headers["X-Sidecar-Error"] == "rate_limited"
    assert b"store that keeps the budget" in body
    seen = [body.decode()]
    for path in ("/services", "/config", "/metrics"):
        async with client.get(f"{sc.admin}{path}") as resp:
            seen.append(await resp.text())
    seen.append(caplog.text)
    for text in seen:
        assert "hunter2" not in text
    assert "unavailable" in caplog.text  # the warning names host:port only
    assert len(llm.requests) == 1
