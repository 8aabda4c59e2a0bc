"""Benchmark: webhooks through the real `sidecar run`, bounded to seconds.

What runs (all on 127.0.0.1, on free ports, under a temporary directory):
  sidecar   `python -m sidecar run` with one inbound webhook (GitHub signatures,
            routed to the receiver) and one outbound group (Standard Webhooks
            signing, one endpoint: the receiver), its queue in SQLite (WAL,
            synchronous=FULL) in a temporary --data-dir, or in Redis with --store.
  receiver  an aiohttp server in this process that answers 200 and notes when
            each event arrived.
  load      aiohttp clients in this process, `--concurrency` requests in flight:
            first signed GitHub events to the ingress listener for `--seconds`,
            then agents' events to the egress /_webhooks/<name> for `--seconds`.

Reported, per direction: events acknowledged per second (200 inbound, 202
outbound: each one durably stored before its answer), and the end-to-end
delivery latency p50/p99, from sending the event to the sidecar until the
receiver had it (the clock is this process's, on both ends). Deliveries still
missing `--drain` seconds after the load ends are counted as missing.

Run: .venv/bin/python bench/webhooks.py [--seconds 3] [--concurrency 32] [--store redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import sys
import tempfile
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web

# bench/ is sys.path[0] when this file runs as a script.
from procs import serve, sidecar_run

SECRET = "bench-github-secret"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Receiver:
    arrived: dict[str, float] = field(default_factory=dict)
    more: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, keys: set[str], limit: float) -> None:
        """Until every key arrived, or `limit` seconds passed."""
        deadline = time.perf_counter() + limit
        while not keys <= self.arrived.keys():
            self.more.clear()
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            try:
                async with asyncio.timeout(left):
                    await self.more.wait()
            except TimeoutError:
                return

    def app(self) -> web.Application:
        async def events(request: web.Request) -> web.Response:
            event = json.loads(await request.read())
            self.arrived.setdefault(event["key"], time.perf_counter())
            self.more.set()
            return web.Response()

        app = web.Application()
        app.router.add_post("/events", events)
        return app


def policy(receiver: str, store: str | None) -> str:
    backend = f'store: {{backend: "{store}", prefix: "bench:{os.getpid()}"}}' if store else ""
    return textwrap.dedent(
        f"""
        version: 1
        webhooks:
          {backend}
          inbound:
            github:
              path: /hooks/github
              verify: {{type: github, secrets: ["{SECRET}"]}}
              routes:
                - deliver_to: ["{receiver}/events"]
          outbound:
            events:
              signing: {{secrets: ["{WHSEC}"]}}
              endpoints:
                - {{name: receiver, url: "{receiver}/events", allow_private: true}}
        """
    )


def github(body: bytes, delivery: str) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": "push",
        "Content-Type": "application/json",
    }


@dataclass
class Pass:
    name: str
    sent: dict[str, float] = field(default_factory=dict)  # key -> when its request left
    acknowledged: int = 0
    refused: int = 0
    seconds: float = 0.0


async def load(
    client: aiohttp.ClientSession, run: Pass, url: str, inbound: bool, seconds: float, width: int
) -> None:
    deadline = time.perf_counter() + seconds
    counter = iter(range(10**9))

    async def one_client() -> None:
        while time.perf_counter() < deadline:
            key = f"{run.name}-{next(counter)}"
            body = json.dumps({"key": key, "type": "bench.event", "pad": "x" * 200}).encode()
            headers = github(body, key) if inbound else {"Content-Type": "application/json"}
            run.sent[key] = time.perf_counter()
            async with client.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status in (200, 202):
                    run.acknowledged += 1
                else:
                    run.refused += 1

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(width)))
    run.seconds = time.perf_counter() - started


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def main(args: argparse.Namespace) -> int:
    receiver = Receiver()
    runner, target = await serve(receiver.app())
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-webhooks-") as tmp:
        extra = ["--ingress", "127.0.0.1:0", "--data-dir", str(Path(tmp) / "data")]
        async with sidecar_run(Path(tmp), policy(target, args.store), *extra) as sidecar:
            egress, ingress = sidecar.egress, sidecar.ingress
            passes: list[Pass] = []
            connector = aiohttp.TCPConnector(limit=args.concurrency)
            async with aiohttp.ClientSession(connector=connector) as client:
                for name, url, inbound in (
                    ("inbound", f"{ingress}/hooks/github", True),
                    ("outbound", f"{egress}/_webhooks/events", False),
                ):
                    run = Pass(name)
                    await load(client, run, url, inbound, args.seconds, args.concurrency)
                    passes.append(run)
                    await receiver.wait_for(set(run.sent), args.drain)
    await runner.cleanup()
    store = args.store.split("@")[-1] if args.store else "sqlite (WAL, synchronous=FULL)"
    print(
        f"webhooks bench: {args.seconds:g}s per direction, {args.concurrency} in flight, "
        f"queue: {store}"
    )
    print(
        f"{'direction':<10} {'acked/s':>9} {'acked':>7} {'refused':>7} {'missing':>7} "
        f"{'p50 ms':>8} {'p99 ms':>8}"
    )
    for run in passes:
        latencies = [
            (receiver.arrived[k] - t) * 1000 for k, t in run.sent.items() if k in receiver.arrived
        ]
        missing = run.acknowledged - len(latencies)
        print(
            f"{run.name:<10} {run.acknowledged / run.seconds:>9.0f} {run.acknowledged:>7} "
            f"{run.refused:>7} {max(0, missing):>7} {percentile(latencies, 50):>8.1f} "
            f"{percentile(latencies, 99):>8.1f}"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="load time per direction")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight")
    parser.add_argument("--drain", type=float, default=10.0, help="wait for deliveries after")
    parser.add_argument("--store", default=None, help="redis://... to bench the Redis queue")
    sys.exit(asyncio.run(main(parser.parse_args())))
