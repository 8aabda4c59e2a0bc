"""Nothing acknowledged is lost: a process is SIGKILLed mid-burst, a new one delivers the rest."""

from __future__ import annotations

import asyncio
import collections
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.helpers import ROOT, eventually

pytestmark = pytest.mark.process


class FlakyReceiver:
    """Answers 500 to the first attempt of each message and 200 to the next ones."""

    def __init__(self) -> None:
        self.seen: collections.Counter[str] = collections.Counter()
        self.delivered: set[str] = set()

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            await request.read()
            # Inbound deliveries carry the message id in X-Sidecar-Message-Id,
            # outbound ones as their Standard Webhooks webhook-id.
            message_id = (
                request.headers.get("X-Sidecar-Message-Id") or request.headers["webhook-id"]
            )
            self.seen[message_id] += 1
            if self.seen[message_id] == 1:
                return web.Response(status=500)
            self.delivered.add(message_id)
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/", handle)
        return app


async def process(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.webhooks.burst_process",
        *args,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.parametrize(
    ("count", "senders", "kill_after"),
    [(1000, "20", 300), (6000, "256", 2000)],
    ids=["burst", "under-load"],
)
async def test_every_acknowledged_event_is_delivered_after_kill_9(
    tmp_path: Path,
    upstream: Callable[[web.Application], Any],
    count: int,
    senders: str,
    kill_after: int,
) -> None:
    """Under load: 256 events in flight at once, so the kill lands amid commit groups
    (the store commits all that arrived while the last commit ran) and attempts."""
    receiver = FlakyReceiver()
    target = await upstream(receiver.app()) + "/"
    data = str(tmp_path / "data")

    burst = await process("accept", data, target, str(count), senders)
    acknowledged: list[str] = []
    assert burst.stdout is not None
    while len(acknowledged) < kill_after:
        line = await asyncio.wait_for(burst.stdout.readline(), 30)
        assert line, (await burst.stderr.read()).decode() if burst.stderr else "no output"
        acknowledged.append(line.decode().strip())
    burst.send_signal(signal.SIGKILL)
    # Whatever it printed before dying was acknowledged too.
    acknowledged += (await burst.stdout.read()).decode().split()
    assert await burst.wait() == -signal.SIGKILL
    assert len(acknowledged) < count, "the kill came after the burst: nothing was tested"
    lost_so_far = set(acknowledged) - receiver.delivered
    assert lost_so_far, "everything was delivered before the kill: nothing was tested"

    worker = await process("deliver", data, target)
    try:
        await eventually(
            lambda: set(acknowledged) <= receiver.delivered,
            f"{len(set(acknowledged) - receiver.delivered)} acknowledged events to be delivered",
            limit=60,
        )
    finally:
        worker.kill()
        await worker.wait()
    assert len(set(acknowledged)) == len(acknowledged)
