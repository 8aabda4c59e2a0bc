"""Start-up failures and shutdown of the real `sidecar run` process.

A start-up that cannot serve says so in one line per cause and exits non-zero;
SIGTERM makes /readyz 503 at once while calls in flight finish; a second
signal ends the process without waiting for the drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import ROOT, eventually, sidecar_process

pytestmark = pytest.mark.process


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`sidecar run ARGS` on OS-picked ports (later flags win), to its exit."""
    ports = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "run", *ports, *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else dict(os.environ),
        cwd=ROOT,
    )


def only_error_line(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stderr
    assert "Traceback" not in done.stderr
    assert "last good policy" not in done.stderr, "there was none"
    [line] = [line for line in done.stderr.splitlines() if " ERROR " in line]
    return line


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A loopback port something else already listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


@pytest.fixture
def policies(tmp_path: Path) -> Path:
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "p.yaml").write_text("version: 1\nservices:\n  a: {upstream: 'http://a'}\n")
    return directory


@pytest.mark.parametrize("flag", ["--listen", "--admin"])
def test_a_port_in_use_is_one_clear_line(flag: str, taken_port: int, policies: Path) -> None:
    done = run("--policies", str(policies), flag, f"127.0.0.1:{taken_port}")
    line = only_error_line(done)
    assert line.endswith(
        f"sidecar: cannot listen on 127.0.0.1:{taken_port}: address already in use"
    )


def test_a_missing_policy_directory_is_a_start_up_failure(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    line = only_error_line(run("--policies", str(missing)))
    assert "sidecar: cannot start, policy rejected: " in line
    assert f"{missing}:" in line
    assert "Traceback" not in line


def test_an_unset_env_secret_is_a_start_up_failure(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nservices:\n  a:\n    upstream: http://a\n"
        "    auth: {type: bearer, token: '${env:SIDECAR_TEST_UNSET_TOKEN}'}\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "SIDECAR_TEST_UNSET_TOKEN"}
    line = only_error_line(run("--policies", str(tmp_path), env=env))
    assert line.endswith(
        f"sidecar: cannot start, policy rejected: {tmp_path}/p.yaml:5:26: "
        "environment variable SIDECAR_TEST_UNSET_TOKEN is not set"
    )


class Held:
    """An upstream whose answers wait until the test releases them."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.arrived.set()
            await self.release.wait()
            return web.Response(text="finished")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


async def fetch(client: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with client.get(url) as r:
        return r.status, await r.text()


async def held_policy(upstream, tmp_path: Path, held: Held) -> tuple[Path, str]:
    """A policy with one service `slow` on the held upstream; the path to call."""
    base = await upstream(held.app())
    (tmp_path / "p.yaml").write_text(
        f"version: 1\nservices:\n  slow:\n    upstream: {base}\n    timeout: {{total: 300s}}\n"
    )
    return tmp_path, "/slow/work"


async def test_sigterm_makes_readyz_503_while_the_call_in_flight_finishes(
    upstream, client, tmp_path
) -> None:
    held = Held()
    policies, path = await held_policy(upstream, tmp_path, held)
    async with sidecar_process(policies, "--drain", "120") as proc:
        call = asyncio.create_task(fetch(client, proc.url + path))
        await eventually(held.arrived.is_set, "the call to reach the upstream")
        proc.proc.send_signal(signal.SIGTERM)

        async def not_ready() -> bool:
            async with client.get(f"{proc.admin}/readyz") as r:
                return r.status == 503 and (await r.json())["status"] == "draining"

        await eventually(not_ready, "/readyz to answer 503 while draining")
        assert not call.done(), "the call in flight is not cut"
        held.release.set()
        assert await call == (200, "finished")
        # It exits by itself once the drain is over (stop() signals only a live process).
        await asyncio.wait_for(proc.proc.wait(), 60)
        assert await proc.stop() == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
async def test_a_second_signal_exits_without_waiting_for_the_drain(
    sig: signal.Signals, upstream, client, tmp_path
) -> None:
    held = Held()
    policies, path = await held_policy(upstream, tmp_path, held)
    try:
        async with sidecar_process(policies, "--drain", "300") as proc:
            call = asyncio.create_task(fetch(client, proc.url + path))
            await eventually(held.arrived.is_set, "the call to reach the upstream")
            proc.proc.send_signal(sig)
            await eventually(lambda: "stopping:" in proc.output, "the drain to begin")
            # The drain would last 300 s; stop() gives up long before that.
            code = await proc.stop(sig, limit=30)
            assert code != 0
            assert f"{sig.name} again: exiting now" in proc.output
            with contextlib.suppress(aiohttp.ClientError):
                await call
    finally:
        held.release.set()
