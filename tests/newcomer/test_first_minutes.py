"""The first minutes of a newcomer: what `make run` says, the sidecar typed by hand,
`sidecar schema | head`, and `sidecar record` saying what it wrote (issue 21, item 7)."""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import ROOT, eventually, sidecar_process

KEYS = ("OPENAI_API_KEY", "GITHUB_TOKEN")


def _no_keys() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in KEYS}


async def _shell(script: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        script,
        cwd=ROOT,
        env=env or dict(os.environ),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_make_says_what_it_compiles_and_how_long(tmp_path: Path) -> None:
    # -n: what make would run and print, nothing run (a venv that does not exist).
    code, out, err = await _shell(f"make -n -B compiled VENV={tmp_path}/venv")
    assert code == 0, err
    assert "compiling the hot path to C with mypyc" in out
    assert "about two minutes the first time" in out
    assert "compiled in" in out
    assert "installing the sidecar with its dev tools" in out


async def test_the_readmes_by_hand_line_loads_the_example_policies() -> None:
    readme = (ROOT / "README.md").read_text()
    [line] = [
        chunk
        for chunk in readme.split("`")
        if chunk.startswith(". examples/placeholder-keys.sh && ")
    ]
    words = shlex.split(line.split("&&", 1)[1])
    assert words[:2] == [".venv/bin/sidecar", "run"]
    # The same line, with `validate --resolve-secrets` instead of serving: every
    # ${env:} the example policies name must be set by the placeholders.
    policies = words[words.index("--policies") + 1]
    script = (
        f"{line.split('&&', 1)[0]} && "
        f"{shlex.quote(sys.executable)} -m sidecar validate --resolve-secrets {policies}"
    )
    code, out, err = await _shell(script, env=_no_keys())
    assert code == 0, err
    assert out.startswith("ok: ")
    # The Makefile's `run` reads the same file.
    assert ". ./$(PLACEHOLDER_KEYS)" in (ROOT / "Makefile").read_text()


async def test_schema_into_head_ends_without_a_traceback() -> None:
    script = f"{shlex.quote(sys.executable)} -m sidecar schema | head -1"
    _, out, err = await _shell(script)
    assert out == "{\n"
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


@pytest.mark.process
async def test_record_says_where_cassettes_go_and_how_many(tmp_path: Path, upstream) -> None:  # type: ignore[no-untyped-def]
    async def hello(request: web.Request) -> web.Response:
        return web.json_response({"hello": request.path})

    app = web.Application()
    app.router.add_get("/{tail:.*}", hello)
    base = await upstream(app)
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "p.yaml").write_text(f"version: 1\nservices:\n  echo:\n    upstream: {base}\n")
    cassettes = tmp_path / "cassettes"
    async with sidecar_process(
        policies,
        "--cassettes",
        str(cassettes),
        "--data-dir",
        str(tmp_path / "d"),
        command_name="record",
    ) as sc:
        assert f"service echo records its cassettes to {cassettes / 'echo'}" in sc.output
        async with aiohttp.ClientSession() as client:
            for path in ("/echo/a", "/echo/b"):
                async with client.get(sc.url + path) as r:
                    assert r.status == 200
        await eventually(lambda: len(list((cassettes / "echo").glob("*.json"))) == 2, "2 files")
        assert await sc.stop() == 0
    assert f"service echo: wrote 2 cassette(s) to {cassettes / 'echo'}" in sc.output
