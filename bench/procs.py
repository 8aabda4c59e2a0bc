"""What the asyncio benchmarks (ttft.py, webhooks.py) start on 127.0.0.1.

- `serve(app)`: an aiohttp app on a port the OS picks; its runner and base URL.
- `sidecar_run(tmp, policy, *args)`: the real `python -m sidecar run` on that policy
  (written into `tmp`/policies), on ports the OS picks, until the block ends; its
  egress (and ingress, when `--ingress` is among `args`) as the process logged them.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
_EGRESS = re.compile(r"egress on (http://\S+?:\d+), admin on (http://\S+?:\d+)")
_INGRESS = re.compile(r"ingress \(inbound webhooks\) on (http://\S+?:\d+)")


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


@dataclass
class SidecarRun:
    proc: asyncio.subprocess.Process
    egress: str = ""
    ingress: str = ""


@contextlib.asynccontextmanager
async def sidecar_run(
    tmp: Path, policy: str, *args: str, env: Mapping[str, str] | None = None, limit: float = 30
) -> AsyncIterator[SidecarRun]:
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(policy)
    listen = ["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "sidecar", "run", "--policies", str(policies), *listen, *args],
        cwd=REPO,
        env=None if env is None else dict(env),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    draining: asyncio.Task[None] | None = None
    try:
        run = await _addresses(SidecarRun(proc), "--ingress" in args, limit)
        # Keep reading its log, so the pipe never fills and blocks it.
        draining = asyncio.create_task(_drain(proc.stderr))
        yield run
    finally:
        proc.terminate()
        await proc.wait()
        if draining is not None:
            await draining


async def _addresses(run: SidecarRun, ingress: bool, limit: float) -> SidecarRun:
    stderr = run.proc.stderr
    assert stderr is not None
    seen: list[str] = []
    deadline = time.monotonic() + limit
    while not run.egress or (ingress and not run.ingress):
        left = deadline - time.monotonic()
        if left <= 0:
            raise SystemExit("sidecar run did not start:\n" + "".join(seen))
        line = (await asyncio.wait_for(stderr.readline(), left)).decode("utf-8", "replace")
        if not line:
            raise SystemExit("sidecar run exited:\n" + "".join(seen))
        seen.append(line)
        if found := _EGRESS.search(line):
            run.egress = found.group(1)
        if found := _INGRESS.search(line):
            run.ingress = found.group(1)
    return run


async def _drain(stream: asyncio.StreamReader | None) -> None:
    if stream is not None:
        while await stream.read(65536):
            pass
