"""Offline modes need no keys: a mocked or replaying service never calls its upstream,
so the credential it would inject is not read (issue 21, item 1)."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, sidecar_process

KEYS = ("OPENAI_API_KEY", "GITHUB_TOKEN")


def _no_keys() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in KEYS}


def readme_replay_line() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.startswith("sidecar replay "))
    return shlex.split(line.partition("#")[0])


@pytest.mark.process
async def test_the_readmes_replay_line_starts_without_keys(tmp_path: Path) -> None:
    words = readme_replay_line()
    assert words[:2] == ["sidecar", "replay"]
    policies, args = words[2], words[3:]
    # Its cassettes and data in the test's directory, not in the checkout.
    if "--cassettes" in args:
        args[args.index("--cassettes") + 1] = str(tmp_path / "cassettes")
    args += ["--data-dir", str(tmp_path / "data")]
    async with (
        sidecar_process(ROOT / policies, *args, env=_no_keys(), command_name="replay") as sc,
        aiohttp.ClientSession() as client,
        client.post(f"{sc.url}/openai/v1/chat/completions", json={"model": "m"}) as r,
    ):
        assert r.status == 501
        assert r.headers["X-Sidecar-Error"] == "no_recording"
    assert "is not set" not in sc.output


@pytest.mark.process
async def test_a_mocked_template_service_needs_no_key(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "services:\n"
        "  openai:\n"
        "    template: openai\n"
        "    mode: mock\n"
        "    mock:\n"
        "      - {match: {path: /v1/models}, body: {data: []}}\n"
    )
    async with (
        sidecar_process(tmp_path, "--data-dir", str(tmp_path / "d"), env=_no_keys()) as sc,
        aiohttp.ClientSession() as client,
        client.get(f"{sc.url}/openai/v1/models") as r,
    ):
        assert r.status == 200
        assert r.headers["X-Sidecar-Mock"] == "true"
        assert await r.json() == {"data": []}


async def test_a_live_service_still_needs_its_key(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "services:\n"
        "  mocked:\n"
        "    template: openai\n"
        "    prefix: /mocked\n"
        "    mode: mock\n"
        "  live:\n"
        "    template: openai\n"
        "    prefix: /live\n"
    )
    from sidecar.policy.loader import PolicyError, load_policy

    try:
        load_policy(str(tmp_path), env={})
    except PolicyError as exc:
        errors = [str(p) for p in exc.problems]
    else:
        raise AssertionError("a live service without its key loaded")
    # Once, for the live service: the mocked one shares the reference but needs no value.
    assert len(errors) == 1, errors
    assert "environment variable OPENAI_API_KEY is not set" in errors[0]
