"""Shared test helpers: polling that fails loudly, and the real `sidecar run` process.

- `eventually(check, what, limit)` polls a condition (sync or async) and raises
  AssertionError naming `what` when `limit` seconds pass without it holding.
- `sidecar_process(...)` runs `python -m sidecar run` on ports the OS picks
  (`127.0.0.1:0`), reads the addresses it bound from its log, waits for
  /readyz, and always kills it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


def probe(code: str) -> Any:
    """What a fresh interpreter running `code` in the checkout printed last, as JSON: for
    what a process loads or starts (modules, threads), which this one has long done."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


Check = Callable[[], bool | Awaitable[bool]]


async def eventually(check: Check, what: str, limit: float = 10.0, every: float = 0.02) -> None:
    """Poll until `check()` is true; an AssertionError naming `what` once `limit` s passed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while True:
        outcome = check()
        if inspect.isawaitable(outcome):
            outcome = await outcome
        if outcome:
            return
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {limit:g}s waiting for: {what}")
        await asyncio.sleep(every)


_BOUND = re.compile(r"egress on (http://\S+?:\d+), admin on (http://\S+?:\d+)")


@dataclass
class SidecarProcess:
    proc: asyncio.subprocess.Process
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    url: str = ""  # egress, as the process logged it
    admin: str = ""
    _readers: list[asyncio.Task[None]] = field(default_factory=list)

    @property
    def output(self) -> str:
        return "".join(self.stderr)

    async def stop(self, sig: int = signal.SIGTERM, limit: float = 20) -> int:
        """Send `sig`, wait for the exit and for every line it wrote; the exit code."""
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), limit)
        await asyncio.gather(*self._readers)
        return code


async def _drain(stream: asyncio.StreamReader | None, into: list[str]) -> None:
    # Read all the time, so a chatty process never blocks on a full pipe.
    if stream is None:
        return
    async for line in stream:
        into.append(line.decode("utf-8", "replace"))


@contextlib.asynccontextmanager
async def sidecar_process(
    policies: Path | str | None,
    *args: str,
    env: Mapping[str, str] | None = None,
    limit: float = 20,
    command_name: str = "run",
) -> AsyncIterator[SidecarProcess]:
    """`sidecar run --policies DIR` on OS-picked ports, ready to serve; killed on exit.

    `policies` None: the process finds them itself (SIDECAR_POLICIES). `env` replaces
    the environment (pass `{**os.environ, ...}` to extend it). `command_name` "record"
    or "replay" runs that shortcut, which takes DIR as its argument.
    """
    command = [sys.executable, "-m", "sidecar", command_name]
    if policies is not None:
        command += ["--policies", str(policies)] if command_name == "run" else [str(policies)]
    command += ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", *args]
    proc = await asyncio.create_subprocess_exec(
        *command,
        cwd=ROOT,
        env=dict(os.environ if env is None else env),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    running = SidecarProcess(proc)
    running._readers = [
        asyncio.create_task(_drain(proc.stdout, running.stdout)),
        asyncio.create_task(_drain(proc.stderr, running.stderr)),
    ]
    try:

        def bound() -> bool:
            if proc.returncode is not None:
                code = proc.returncode
                raise AssertionError(f"sidecar run exited with {code}:\n{running.output}")
            found = _BOUND.search(running.output)
            if found:
                running.url, running.admin = found.groups()
            return found is not None

        await eventually(bound, "sidecar run to log the addresses it bound", limit)
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                async with session.get(f"{running.admin}/readyz") as r:
                    return r.status == 200

            await eventually(ready, f"{running.admin}/readyz to answer 200", limit)
        yield running
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for reader in running._readers:
            reader.cancel()
        await asyncio.gather(*running._readers, return_exceptions=True)


async def stop_task(task: asyncio.Future[object]) -> None:
    """Cancel a task and wait until it has really finished."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
