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
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
from aiohttp import web

# bench/ is sys.path[0] when this file runs as a script.
from procs import serve, sidecar_run

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

    async def start() -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", messages)
        ready.append((await serve(app))[1])
        started.set()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
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


async def main(args: argparse.Namespace) -> int:
    upstream, loop, thread = start_upstream()
    anthropic_body = json.dumps(
        {"model": "claude-bench", "max_tokens": 64, "stream": True, "messages": MESSAGES}
    ).encode()
    openai_body = json.dumps({"model": "claude-bench", "stream": True, "messages": MESSAGES})
    env = {**os.environ, "ANTHROPIC_API_KEY": "sk-ant-bench-placeholder"}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-ttft-") as tmp:
        async with sidecar_run(Path(tmp), policy(upstream), env=env, limit=20) as sidecar:
            egress = sidecar.egress
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
