"""Benchmark: webhooks through the real `sidecar run`, bounded to seconds.

What runs (all on 127.0.0.1, on free ports, under a temporary directory):
  sidecar   `python -m sidecar run` with one inbound webhook (GitHub signatures,
            routed to the receiver) and one outbound group (Standard Webhooks
            signing, one endpoint: the receiver), its queue in SQLite (WAL,
            synchronous=FULL) in a temporary --data-dir, or in Redis with --store.
  receiver  a raw asyncio HTTP/1.1 server in this process that answers 200 and
            notes when each event arrived.
  load      raw asyncio keep-alive clients in this process, one connection per
            sender: signed GitHub events to the ingress listener, agents' events to
            the egress /_webhooks/<name>. Raw, not aiohttp: aiohttp's client and server
            cost the bench more CPU per event than the sidecar spends, and the bench
            shares the machine with it (with aiohttp the bench was the bottleneck).

Passes, one after the other against the same sidecar (each waits for its
deliveries): inbound with 1, 16 and 64 senders sending back to back
(`--senders`), outbound with 16, then inbound paced at `--rate` events/s.

Reported per pass: events acknowledged per second (200 inbound, 202 outbound:
each one durably stored before its answer) and the p99 of the time to that
answer; the delivery lag p50/p99, from sending the event to the sidecar until
the receiver had it (the clock is this process's, on both ends); the backlog
(acknowledged, not yet delivered) when the load stopped and the rate it drained
at; and the sidecar's CPU time (user + system, from /proc) from the first
request to the last delivery, per event acknowledged: intake and delivery both.
Deliveries still missing `--drain` seconds after the load ends are counted as missing.

Run: .venv/bin/python bench/webhooks.py [--seconds 3] [--senders 1,16,64] [--store redis://...]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import os
import resource
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# bench/ is sys.path[0] when this file runs as a script.
from procs import sidecar_run

REPO = Path(__file__).resolve().parent.parent
SECRET = "bench-github-secret"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@dataclass
class Receiver:
    """The delivery target: answers 200 to each POST and notes when each event arrived.

    A raw asyncio protocol, not an aiohttp server: at thousands of deliveries a second
    the bench's own HTTP handling would cost more CPU than the sidecar it measures.
    """

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

    def arrive(self, body: bytes) -> None:
        # The bench's own bodies: {"key": "<pass>-<n>", ...}; no JSON parse needed.
        start = body.find(b'"key": "')
        if start < 0:
            return
        start += 8
        key = body[start : body.index(b'"', start)].decode()
        self.arrived.setdefault(key, time.perf_counter())
        self.more.set()

    async def serve(self) -> tuple[asyncio.Server, str]:
        server = await asyncio.get_running_loop().create_server(
            lambda: _ReceiverProtocol(self), "127.0.0.1", 0
        )
        port = server.sockets[0].getsockname()[1]
        return server, f"http://127.0.0.1:{port}"


_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"


class _ReceiverProtocol(asyncio.Protocol):
    """HTTP/1.1 keep-alive, Content-Length bodies (what the sidecar's deliveries send)."""

    def __init__(self, receiver: Receiver) -> None:
        self.receiver = receiver
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        while True:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            length = _content_length(buffer[:end])
            if len(buffer) < end + 4 + length:
                break
            self.receiver.arrive(buffer[end + 4 : end + 4 + length])
            buffer = buffer[end + 4 + length :]
            assert self.transport is not None
            self.transport.write(_OK)
        self.buffer = buffer


def _content_length(head: bytes) -> int:
    at = head.lower().find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    return int(head[at + 17 : head.find(b"\r\n", at + 2)].strip() or 0)


class Sender:
    """One keep-alive HTTP/1.1 connection sending POSTs one after the other.

    Raw asyncio streams: an aiohttp client costs the bench several times the CPU of a
    request to the sidecar, and the bench shares the machine with it.
    """

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.path = parts.path.encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, headers: dict[str, str], body: bytes) -> int:
        """The answer's status, once its body was read."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.writer.write(
            b"POST %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n%s\r\n%s"
            % (self.path, self.host.encode(), len(body), lines.encode(), body)
        )
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = _content_length(head[:-2])
        if length:
            await self.reader.readexactly(length)
        if b"\r\nconnection: close" in head.lower():
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = self.reader = None


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
    senders: int = 0
    sent: dict[str, float] = field(default_factory=dict)  # key -> when its request left
    acks: list[float] = field(default_factory=list)  # seconds from request to its answer
    acknowledged: int = 0
    refused: int = 0
    seconds: float = 0.0
    cpu: float = 0.0  # the sidecar's CPU seconds from the first request to the last delivery
    backlog: int = 0  # acknowledged, not yet delivered, when the load stopped
    drain: float = 0.0  # deliveries per second from then until the last one


async def load(
    run: Pass,
    url: str,
    inbound: bool,
    seconds: float,
    width: int,
    rate: float | None = None,
) -> None:
    """`width` clients sending back to back, or together paced to `rate` events/s."""
    started = time.perf_counter()
    deadline = started + seconds
    counter = iter(range(10**9))

    async def one_client() -> None:
        sender = Sender(url)
        try:
            while True:
                n = next(counter)
                if rate is not None:
                    at = started + n / rate
                    if at >= deadline:
                        return
                    await asyncio.sleep(max(0.0, at - time.perf_counter()))
                elif time.perf_counter() >= deadline:
                    return
                key = f"{run.name}-{n}"
                body = json.dumps({"key": key, "type": "bench.event", "pad": "x" * 200}).encode()
                headers = github(body, key) if inbound else {"Content-Type": "application/json"}
                sent = run.sent[key] = time.perf_counter()
                try:
                    status = await sender.post(headers, body)
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    sender.close()
                    status = 0
                if status in (200, 202):
                    run.acknowledged += 1
                    run.acks.append(time.perf_counter() - sent)
                else:
                    run.refused += 1
                    del run.sent[key]
        finally:
            sender.close()

    await asyncio.gather(*(one_client() for _ in range(width)))
    run.seconds = time.perf_counter() - started


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """utime + stime of a process, or of one of its threads (Linux)."""
    stat = Path(f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat")
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def measure(
    receiver: Receiver,
    pid: int,
    run: Pass,
    url: str,
    inbound: bool,
    args: argparse.Namespace,
    rate: float | None = None,
) -> Pass:
    cpu = cpu_seconds(pid)
    await load(run, url, inbound, args.seconds, run.senders, rate)
    stopped = time.perf_counter()
    keys = set(run.sent)
    run.backlog = len(keys - receiver.arrived.keys())
    await receiver.wait_for(keys, args.drain)
    run.cpu = cpu_seconds(pid) - cpu
    last = max((receiver.arrived[k] for k in keys if k in receiver.arrived), default=stopped)
    if run.backlog and last > stopped:
        run.drain = (run.backlog - len(keys - receiver.arrived.keys())) / (last - stopped)
    return run


async def store_only(args: argparse.Namespace) -> int:
    """The queue alone, in this process: CPU per event that no HTTP, no client and no
    receiver blur. Per --senders width: that many accepts at once until --events were
    stored, then claims and delivered-records until all were; CPU (user + system, every
    thread: the SQLite writer's too) per event for each half, and intake's events/s."""
    sys.path.insert(0, str(REPO))
    from sidecar.webhooks.queue import Attempt, Direction, Outcome, Target

    def cpu() -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime

    def thread_cpu(store: Any) -> float:
        """The SQLite writer thread's share (0 for Redis): what the GIL and fsync cost there."""
        writer = getattr(store, "_writer", None)
        if writer is None or writer.thread.native_id is None:
            return 0.0
        return cpu_seconds(os.getpid(), writer.thread.native_id)

    target = [Target("http://127.0.0.1:9/events", "http://127.0.0.1:9/events")]
    headers = [("content-type", "application/json"), ("x-github-event", "push")]
    body = json.dumps({"key": "k", "type": "bench.event", "pad": "x" * 200}).encode()
    print(f"webhook store alone: {args.events} events per width, queue: {args.store or 'sqlite'}")
    print(
        f"{'senders':>7} {'accepted/s':>10} {'accept CPU':>11} {'in writer':>10} "
        f"{'claim+finish CPU':>17}"
    )
    for width in (int(n) for n in args.senders.split(",")):
        with tempfile.TemporaryDirectory(prefix="sidecar-bench-store-") as tmp:
            if args.store:
                from sidecar.webhooks.redis_store import RedisStore

                store: Any = await RedisStore.open(
                    args.store, prefix=f"bench:{os.getpid()}:{width}"
                )
            else:
                from sidecar.webhooks.sqlite_store import SqliteStore

                store = await SqliteStore.open(tmp)

            async def sender(store: Any, numbers: Iterator[int]) -> None:
                for n in numbers:
                    await store.accept(
                        direction=Direction.inbound,
                        source="github",
                        event_type="push",
                        headers=headers,
                        body=body,
                        targets=target,
                        dedup_id=f"d-{n}",
                        dedup_window=600.0,
                    )

            started, wall, in_writer = cpu(), time.perf_counter(), thread_cpu(store)
            numbers = iter(range(args.events))
            await asyncio.gather(*(sender(store, numbers) for _ in range(width)))
            accepted, wall = cpu() - started, time.perf_counter() - wall
            in_writer = thread_cpu(store) - in_writer
            ok = Attempt(at=time.time(), status_code=200, error=None, duration=0.01)
            started, done = cpu(), 0
            while done < args.events:
                due = await store.claim(256, 256)
                if not due:
                    break
                await asyncio.gather(*(store.finish(d, ok, Outcome.delivered) for d in due))
                done += len(due)
            finished = cpu() - started
            await store.close()
        print(
            f"{width:>7} {args.events / wall:>10.0f} {accepted / args.events * 1e6:>9.1f}us "
            f"{in_writer / args.events * 1e6:>8.1f}us "
            f"{finished / max(done, 1) * 1e6:>15.1f}us"
        )
    return 0


async def main(args: argparse.Namespace) -> int:
    if args.store_only:
        return await store_only(args)
    receiver = Receiver()
    server, target = await receiver.serve()
    senders = [int(n) for n in args.senders.split(",")]
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-webhooks-") as tmp:
        extra = ["--ingress", "127.0.0.1:0", "--data-dir", str(Path(tmp) / "data")]
        async with sidecar_run(Path(tmp), policy(target, args.store), *extra) as sidecar:
            pid = sidecar.proc.pid
            inbound = f"{sidecar.ingress}/hooks/github"
            passes: list[Pass] = []
            for width in senders:
                run = Pass(f"in-{width}", width)
                passes.append(await measure(receiver, pid, run, inbound, True, args))
            if not args.inbound_only:
                run = Pass("out-16", 16)
                outbound = f"{sidecar.egress}/_webhooks/events"
                passes.append(await measure(receiver, pid, run, outbound, False, args))
                run = Pass(f"in-{args.rate:g}/s", max(senders))
                passes.append(await measure(receiver, pid, run, inbound, True, args, args.rate))
    server.close()
    await server.wait_closed()
    store = args.store.split("@")[-1] if args.store else "sqlite (WAL, synchronous=FULL)"
    print(
        f"webhooks bench: {args.seconds:g}s per pass, queue: {store}; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'pass':<10} {'acked/s':>8} {'acked':>6} {'refused':>7} {'ack p99':>8} "
        f"{'lag p50':>8} {'lag p99':>8} {'backlog':>7} {'drain/s':>8} {'missing':>7} "
        f"{'CPU/event':>10}"
    )
    for run in passes:
        lags = [
            (receiver.arrived[k] - t) * 1000 for k, t in run.sent.items() if k in receiver.arrived
        ]
        missing = run.acknowledged - len(lags)
        per_event = run.cpu / run.acknowledged * 1000 if run.acknowledged else float("nan")
        print(
            f"{run.name:<10} {run.acknowledged / run.seconds:>8.0f} {run.acknowledged:>6} "
            f"{run.refused:>7} {percentile(run.acks, 99) * 1000:>6.1f}ms "
            f"{percentile(lags, 50):>6.0f}ms {percentile(lags, 99):>6.0f}ms {run.backlog:>7} "
            f"{run.drain:>8.0f} {max(0, missing):>7} {per_event:>8.2f}ms"
        )
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="load time per direction")
    parser.add_argument(
        "--senders", default="1,16,64", help="inbound passes: this many senders back to back"
    )
    parser.add_argument(
        "--rate", type=float, default=1000.0, help="the paced pass's events/s (inbound)"
    )
    parser.add_argument("--drain", type=float, default=10.0, help="wait for deliveries after")
    parser.add_argument("--store", default=None, help="redis://... to bench the Redis queue")
    parser.add_argument(
        "--inbound-only",
        action="store_true",
        help="only the --senders passes (no outbound, no paced)",
    )
    parser.add_argument(
        "--store-only",
        action="store_true",
        help="the queue alone in this process (no sidecar, no HTTP): CPU per event",
    )
    parser.add_argument("--events", type=int, default=4000, help="--store-only: per width")
    sys.exit(asyncio.run(main(parser.parse_args())))
