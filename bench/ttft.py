"""Benchmark: the first-token latency the sidecar adds to a streamed LLM answer.

What runs (all on 127.0.0.1, on free ports, under a temporary directory):
  upstream  an aiohttp server on its own thread and event loop that answers
            POST /v1/messages with an Anthropic SSE stream (message_start at once,
            then the text deltas, message_delta and message_stop).
  sidecar   `python -m sidecar run` with two services on that upstream:
            `claude` (the anthropic template: credential, llm token accounting)
            and `claude-openai` (the same with `translate: openai->anthropic`).
  client    one aiohttp client, one call at a time on keep-alive connections (not a
            load test), the three paths interleaved:
            the time from sending the request to the end of the first SSE event.

Reported: p50/p99 of the time to the first event, direct, through the sidecar,
and through the sidecar with translation, and the p50/p99 each path adds over
direct. Bounded: `--calls` per path (200), and `--limit` seconds overall (25).

Run: .venv/bin/python bench/ttft.py [--calls 200] [--limit 25]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
_BOUND = re.compile(r"egress on (http://\S+?:\d+), admin on (http://\S+?:\d+)")
MESSAGES = [{"role": "user", "content": "hi"}]


def sse(event: str, data: object) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()


FIRST = sse(
    "message_start",
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-bench",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 10, "output_tokens": 1},
        },
    },
)
REST = b"".join(
    [
        sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        *(
            sse(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
            )
            for word in ("Hello", " there", "!")
        ),
        sse("content_block_stop", {"type": "content_block_stop", "index": 0}),
        sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": 3},
            },
        ),
        sse("message_stop", {"type": "message_stop"}),
    ]
)


async def messages(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await response.write(FIRST)
    await response.write(REST)
    await response.write_eof()
    return response


def start_upstream() -> tuple[str, asyncio.AbstractEventLoop, threading.Thread]:
    """The upstream on its own loop, so it never waits for the measuring client."""
    loop = asyncio.new_event_loop()
    ready: list[str] = []
    started = threading.Event()

    async def serve() -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", messages)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ready.append(f"http://127.0.0.1:{runner.addresses[0][1]}")
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(serve())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    return ready[0], loop, thread


def policy(upstream: str) -> str:
    return (
        "version: 1\nservices:\n"
        f"  claude:\n    template: anthropic\n    upstream: {upstream}\n"
        f"  claude-openai:\n    template: anthropic\n    upstream: {upstream}\n"
        "    translate: openai->anthropic\n"
    )


async def first_event(client: aiohttp.ClientSession, url: str, body: bytes) -> float:
    """Seconds from sending the request to the end of the first SSE event; the rest is read."""
    start = time.perf_counter()
    headers = {"Content-Type": "application/json", "x-api-key": "bench"}
    async with client.post(url, data=body, headers=headers) as response:
        if response.status != 200:
            raise RuntimeError(f"{url} answered {response.status}: {await response.text()}")
        got = b""
        while b"\n\n" not in got:
            chunk = await response.content.readany()
            if not chunk:
                raise RuntimeError(f"{url} ended before its first event")
            got += chunk
        elapsed = time.perf_counter() - start
        await response.read()
    return elapsed


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def addresses(proc: asyncio.subprocess.Process, limit: float = 20) -> str:
    assert proc.stderr is not None
    seen = ""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        line = await asyncio.wait_for(proc.stderr.readline(), deadline - time.monotonic())
        if not line:
            break
        seen += line.decode("utf-8", "replace")
        found = _BOUND.search(seen)
        if found:
            return found.group(1)
    raise RuntimeError(f"the sidecar did not start:\n{seen}")


async def drain(stream: asyncio.StreamReader | None) -> None:
    if stream is not None:
        while await stream.read(65536):
            pass


async def main(args: argparse.Namespace) -> int:
    upstream, loop, thread = start_upstream()
    anthropic_body = json.dumps(
        {"model": "claude-bench", "max_tokens": 64, "stream": True, "messages": MESSAGES}
    ).encode()
    openai_body = json.dumps({"model": "claude-bench", "stream": True, "messages": MESSAGES})
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-ttft-") as tmp:
        policies = Path(tmp) / "policies"
        policies.mkdir()
        (policies / "policy.yaml").write_text(policy(upstream))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--policies",
            str(policies),
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            cwd=REPO,
            env={**os.environ, "ANTHROPIC_API_KEY": "sk-ant-bench-placeholder"},
            stderr=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
        )
        draining: asyncio.Task[None] | None = None
        try:
            egress = await addresses(proc)
            draining = asyncio.create_task(drain(proc.stderr))
            paths = [
                ("direct", f"{upstream}/v1/messages", anthropic_body),
                ("sidecar", f"{egress}/claude/v1/messages", anthropic_body),
                ("translated", f"{egress}/claude-openai/chat/completions", openai_body.encode()),
            ]
            results: dict[str, list[float]] = {name: [] for name, _, _ in paths}
            deadline = time.monotonic() + args.limit
            connector = aiohttp.TCPConnector(limit=1)
            async with aiohttp.ClientSession(connector=connector) as client:
                for _name, url, body in paths:
                    for _ in range(10):  # warm-up: the connection, the pools, the caches
                        await first_event(client, url, body)
                # Interleaved, so a hiccup of the machine hits every path alike.
                for _ in range(args.calls):
                    if time.monotonic() > deadline:
                        break
                    for name, url, body in paths:
                        results[name].append(await first_event(client, url, body))
        finally:
            proc.terminate()
            await proc.wait()
            if draining is not None:
                await draining
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    direct = results["direct"]
    print(f"time to first SSE event, {len(direct)} sequential calls per path, one at a time")
    print(f"{'path':<11} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10}")
    base50, base99 = percentile(direct, 50), percentile(direct, 99)
    for name, values in results.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        added = (
            ""
            if name == "direct"
            else f"{(p50 - base50) * 1e3:>10.2f} {(p99 - base99) * 1e3:>10.2f}"
        )
        print(f"{name:<11} {p50 * 1e3:>8.2f} {p99 * 1e3:>8.2f} {added}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="calls per path")
    parser.add_argument("--limit", type=float, default=25, help="seconds for the timed calls")
    sys.exit(asyncio.run(main(parser.parse_args())))
