"""CPU time per proxied call, measured in-process: trustworthy on a busy, shared machine.

wrk and run.py measure throughput, which needs idle cores. This measures what
throughput is made of: the proxy's CPU seconds per call (`time.process_time()`,
user + system, of this process only), which other processes on the machine
hardly change. The load side runs in a child process (this same file with
--child): a tiny asyncio upstream answering fixed bytes like the bench's nginx
(401 without the bench's bearer token) and a client driving keep-alive GETs
over raw sockets, one connection (sequential) or many (concurrent). Only the
proxy under test runs in this process, so its CPU is all that is counted.

Targets:
  sidecar      the real Sidecar (listener, egress, chain, metrics) with run.py's realistic policy
  sidecar-min  the same with run.py's minimal policy (bearer only)
  sidecar-console  `sidecar`, with its admin port open and /api/console polled every 2 s
  listener     the sidecar's listener alone, the app answering a fixed Response
  probe        a bare uvloop + httptools proxy with one kept-alive upstream connection per
               agent connection, injecting the token: the floor for this stack

Run: .venv/bin/python bench/cpu_per_call.py [--only sidecar,probe] [--profile sidecar]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from functools import cache
from pathlib import Path
from typing import Any, NamedTuple

import httptools
import uvloop

# bench/ is sys.path[0] when this file runs as a script: the policies are run.py's own.
from run import (
    AGENT_HEADER,
    AGENT_KEY,
    AGENT_KEY_HASH,
    ALLOW_RULES,
    JWT_AUDIENCE,
    JWT_ISSUER,
    LLM_SERVICE,
    OPENAPI_DOCUMENT,
    POST_BODY,
    SERVICE,
    SSE_BODY,
    SSE_PATH,
    SSE_REQUEST,
    TOKEN,
    UPSTREAM_BODY,
    Policy,
    sidecar_policy,
)

PATH = f"/{SERVICE}/v1/ping"
_BODY = UPSTREAM_BODY.encode()
_OK = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: @DATE@\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%b"
    % (len(_BODY), _BODY)
)


@cache
def _ok(second: int) -> bytes:
    """_OK dated `second`, as nginx dates its answers: a cache must find them fresh."""
    from email.utils import formatdate

    return _OK.replace(b"@DATE@", formatdate(second, usegmt=True).encode())


_UNAUTHORIZED = b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
_SSE = SSE_BODY.encode()
_SSE_ANSWER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: %d\r\n\r\n%b"
    % (len(_SSE), _SSE)
)
_SSE_HEAD = b"POST " + SSE_PATH.encode()
_BEARER = f"Bearer {TOKEN}".encode()


# -- the load side (child process) -----------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """Answers each GET head it reads; bodies are never sent by the proxies here."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.rest = b""

    def data_received(self, data: bytes) -> None:
        *heads, self.rest = (self.rest + data).split(b"\r\n\r\n")
        self.transport.write(b"".join(_answer(h) for h in heads))


def _answer(head: bytes) -> bytes:
    if _BEARER not in head:
        return _UNAUTHORIZED
    # The request's body (a POST's) precedes the next head in the stream.
    return _SSE_ANSWER if _SSE_HEAD in head else _ok(int(time.time()))


class _Client(asyncio.Protocol):
    """One agent connection: a request, its whole answer, the next request."""

    def __init__(
        self, request: bytes, expected: bytes, counts: dict[str, int], done: asyncio.Future[None]
    ) -> None:
        self.request = request
        self.expected = expected
        self.counts = counts
        self.done = done
        self.buf = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def send(self) -> None:
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = self.buf[: end + 2].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15 : head.find(b"\r\n", at)]) if at >= 0 else 0
            if len(self.buf) < end + 4 + length:
                return
            body = self.buf[end + 4 : end + 4 + length]
            ok = head.startswith(b"http/1.1 200") and body == self.expected
            self.buf = self.buf[end + 4 + length :]
            self.counts["ok" if ok else "bad"] += 1
            self.counts["left"] -= 1
            if self.counts["left"] > 0:
                if self.counts["left"] >= self.counts["connections"]:
                    self.send()
            elif not self.done.done():
                self.done.set_result(None)


class _Sink(asyncio.Protocol):
    """An OTLP/HTTP collector that reads each export and answers 200, like run.py's sink."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")


def _request(port: int, load: Load) -> bytes:
    head = f"{load.path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{AGENT_HEADER}: bench-agent\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in load.headers.items())
    if load.body is None:
        return f"GET {head}\r\n".encode()
    return b"POST %bContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        head.encode(),
        len(load.body),
        load.body,
    )


class Load(NamedTuple):
    """What the client sends to a target, and the answer it must get."""

    path: str = PATH
    headers: dict[str, str] = {}
    body: bytes | None = None
    expected: bytes = _BODY


async def _drive(
    port: int, connections: int, calls: int, request: bytes, expected: bytes
) -> tuple[int, int, float]:
    loop = asyncio.get_running_loop()
    counts = {"ok": 0, "bad": 0, "left": calls, "connections": connections}
    done: asyncio.Future[None] = loop.create_future()
    clients = []
    for _ in range(connections):
        _, client = await loop.create_connection(
            lambda: _Client(request, expected, counts, done), "127.0.0.1", port
        )
        clients.append(client)
    start = time.perf_counter()
    for client in clients:
        client.send()
    await done
    wall = time.perf_counter() - start
    for client in clients:
        client.transport.close()
    return counts["ok"], counts["bad"], wall


async def _child() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, "127.0.0.1", 0)
    sink = await loop.create_server(_Sink, "127.0.0.1", 0)
    ports = server.sockets[0].getsockname()[1], sink.sockets[0].getsockname()[1]
    print(f"UPSTREAM {ports[0]} {ports[1]}", flush=True)
    reader = asyncio.StreamReader(limit=1 << 20)  # a line holds a whole SSE answer
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := (await reader.readline()).decode().split():
        port, connections, calls = map(int, line[:3])
        request, expected = bytes.fromhex(line[3]), bytes.fromhex(line[4])
        ok, bad, wall = await _drive(port, connections, calls, request, expected)
        print(f"DONE {ok} {bad} {wall:.6f}", flush=True)


# -- the proxies under test (this process) --------------------------------------------------

Action = Callable[[], Awaitable[None]]
# A started target: its port, how to stop it, and how to finish its background work
# (the span exporter's queue), so that each pass is charged with the work it caused.
Start = Callable[[int, int, Path], Awaitable[tuple[int, Action, Action]]]


# The console page's poll, from a process of its own (its CPU is not the proxy's).
_POLL = """
import sys, time, urllib.request
while True:
    urllib.request.urlopen(sys.argv[1]).read()
    time.sleep(float(sys.argv[2]))
"""
CONSOLE_POLL_SECONDS = 2.0  # what console.js does


async def _nothing() -> None:
    pass


async def _start_sidecar(
    policy: Policy,
    upstream: int,
    tmp: Path,
    *,
    name: str,
    env: dict[str, str] | None = None,
    validate: bool = False,
    service_extra: str = "",
    agents: str | None = None,
    console: bool = False,
) -> tuple[int, Action, Action]:
    import json

    from sidecar.app import compose, serve
    from sidecar.runtime import Sidecar

    directory = tmp / name
    directory.mkdir()
    openapi = None
    if validate:
        (directory / "openapi.json").write_text(json.dumps(OPENAPI_DOCUMENT))
        openapi = "openapi.json"
    if agents == "jwt":
        (directory / "jwks.json").write_text(_jwt()[0])
        agents = (
            f"agents:\n  verify:\n    type: jwt\n    jwks: ${{file:{directory / 'jwks.json'}}}\n"
            f"    issuer: {JWT_ISSUER}\n    audience: {JWT_AUDIENCE}\n"
        )
    (directory / "policy.yaml").write_text(
        sidecar_policy(
            policy, upstream, openapi=openapi, service_extra=service_extra, agents=agents
        )
    )
    # Composed as `sidecar run` composes it (the alert rules on its timer).
    sidecar = compose(Sidecar(str(directory), env={"BENCH_TOKEN": TOKEN, **(env or {})}))
    writer = None
    if sidecar.telemetry.access_log:
        from sidecar.telemetry import access

        # As `sidecar run --access-log` does, into a file rather than this script's stdout.
        writer = access.configure((tmp / f"{name}.access.log").open("w"))
    result = await sidecar.reload("startup")
    assert result.ok, result.errors
    admin = ("127.0.0.1", 0) if console else None
    bound, *rest = await serve(sidecar, listen=("127.0.0.1", 0), admin=admin)
    poller = None
    if rest:
        url = f"http://127.0.0.1:{rest[0].addresses[0][1]}/api/console"
        poller = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _POLL, url, str(CONSOLE_POLL_SECONDS)
        )

    async def stop() -> None:
        if poller is not None:
            poller.kill()
            await poller.wait()
        for runner in (bound, *rest):
            await runner.cleanup()
        await sidecar.close()
        if writer is not None:
            writer.stop()

    async def flush() -> None:
        # The span exporter's queue only: the SDK provider (webhook spans, idle here)
        # would add its own flush's work to every pass.
        spans = getattr(sidecar.telemetry, "spans", None)  # None too before issue 26
        if spans is not None:
            await asyncio.to_thread(spans.force_flush)

    return bound.addresses[0][1], stop, flush


async def _start_listener(upstream: int, sink: int, tmp: Path) -> tuple[int, Action, Action]:
    from sidecar.http.listener import Request, Response, serve

    headers = [("Server", "nginx/1.22.1"), ("Content-Type", "application/json")]

    async def app(request: Request) -> Response:
        return Response(status=200, headers=list(headers), body=_BODY)

    listener = await serve(app, "127.0.0.1", 0)
    return listener.addresses[0][1], listener.cleanup, _nothing


class _ProbeUpstream(asyncio.Protocol):
    def __init__(self, agent: _Probe) -> None:
        self.agent = agent
        self.parser = httptools.HttpResponseParser(self)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: list[bytes] = []
        self.body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"content-length", b"connection", b"transfer-encoding"):
            self.headers.append(b"%b: %b\r\n" % (name, value))

    def on_body(self, data: bytes) -> None:
        self.body.append(data)

    def on_message_complete(self) -> None:
        body = b"".join(self.body)
        head = b"HTTP/1.1 %d OK\r\n%bContent-Length: %d\r\n\r\n" % (
            self.parser.get_status_code(),
            b"".join(self.headers),
            len(body),
        )
        self.agent.answered.set_result(head + body)


class _Probe(asyncio.Protocol):
    """A bare proxy: parse, rewrite, one await for the upstream's whole answer, write."""

    def __init__(self, upstream: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.port = upstream
        self.parser = httptools.HttpRequestParser(self)
        self.up: _ProbeUpstream | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers = [b"Host: 127.0.0.1:%d\r\n" % self.port, b"Authorization: %b\r\n" % _BEARER]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in (b"host", b"authorization", b"x-agent-id", b"connection"):
            self.headers.append(b"%b: %b\r\n" % (name, value))

    def on_message_complete(self) -> None:
        target = self.url[len(SERVICE) + 1 :]
        head = b"%b %b HTTP/1.1\r\n%b\r\n" % (
            self.parser.get_method(),
            target,
            b"".join(self.headers),
        )
        self.loop.create_task(self.forward(head))

    async def forward(self, head: bytes) -> None:
        if self.up is None:
            _, self.up = await self.loop.create_connection(
                lambda: _ProbeUpstream(self), "127.0.0.1", self.port
            )
        self.answered: asyncio.Future[bytes] = self.loop.create_future()
        self.up.transport.write(head)
        self.transport.write(await self.answered)


async def _start_probe(upstream: int, sink: int, tmp: Path) -> tuple[int, Action, Action]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Probe(upstream), "127.0.0.1", 0)

    async def stop() -> None:
        server.close()

    return server.sockets[0].getsockname()[1], stop, _nothing


@cache
def _jwt() -> tuple[str, str]:
    """A JWK Set and a token it verifies (ES256, valid for a day)."""
    import json

    import jwt
    from cryptography.hazmat.primitives.asymmetric import ec

    private = ec.generate_private_key(ec.SECP256R1())
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
    jwk["kid"] = "bench"
    now = int(time.time())
    claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "bench-agent"}
    claims |= {"iat": now, "exp": now + 24 * 3600}
    token = jwt.encode(claims, private, algorithm="ES256", headers={"kid": "bench"})
    return json.dumps({"keys": [jwk]}), token


def _tracing(sink: int, *, ratio: float | None = None) -> dict[str, str]:
    # Traces only: with the base endpoint alone, the OTLP metrics export (every 60 s, on
    # its own thread) would sometimes run inside a measured pass, ~4.5k instructions a call.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{sink}",
        "OTEL_METRICS_EXPORTER": "none",
    }
    if ratio is not None:
        env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
        env["OTEL_TRACES_SAMPLER_ARG"] = str(ratio)
    return env


def _sidecar(name: str, policy: Policy = Policy.REALISTIC, **options: Any) -> Start:
    def start(up: int, sink: int, tmp: Path) -> Awaitable[tuple[int, Action, Action]]:
        env = options.get("env")
        rest = {k: v for k, v in options.items() if k != "env"}
        return _start_sidecar(policy, up, tmp, name=name, env=env(sink) if env else None, **rest)

    return start


TARGETS: dict[str, Start] = {
    "sidecar": _sidecar("sidecar"),
    "sidecar-min": _sidecar("sidecar-min", Policy.MINIMAL),
    # The realistic policy with the admin port open and the console polling it.
    "sidecar-console": _sidecar("sidecar-console", console=True),
    "listener": _start_listener,
    "probe": _start_probe,
    # The features of issue 26, each over `sidecar` (or `sidecar-post` for validation).
    "sidecar+tracing": _sidecar("sidecar+tracing", env=lambda sink: _tracing(sink)),
    "sidecar+tracing@10%": _sidecar(
        "sidecar+tracing@10%", env=lambda sink: _tracing(sink, ratio=0.1)
    ),
    "sidecar+log": _sidecar("sidecar+log", env=lambda sink: {"SIDECAR_ACCESS_LOG": "1"}),
    "sidecar-post": _sidecar("sidecar-post"),
    "sidecar+validate": _sidecar("sidecar+validate", validate=True),
    "sidecar+agent-key": _sidecar(
        "sidecar+agent-key", agents=f"agents:\n  keys:\n    bench-agent: {AGENT_KEY_HASH}\n"
    ),
    "sidecar+jwt": _sidecar("sidecar+jwt", agents="jwt"),
    "sidecar+allow": _sidecar("sidecar+allow", service_extra=ALLOW_RULES),
    "sidecar+cache": _sidecar("sidecar+cache", service_extra="    cache: {}\n"),
    "sidecar-sse": _sidecar("sidecar-sse"),
    "sidecar+llm": _sidecar("sidecar+llm", service_extra=LLM_SERVICE),
}
_POST = Load(body=POST_BODY.encode())
_SSE_LOAD = Load(path=f"/{SERVICE}{SSE_PATH}", body=SSE_REQUEST.encode(), expected=_SSE)
# What each target is sent, when not a GET of PATH.
LOADS: dict[str, Callable[[], Load]] = {
    "sidecar-post": lambda: _POST,
    "sidecar+validate": lambda: _POST,
    "sidecar+agent-key": lambda: Load(headers={"X-Agent-Token": AGENT_KEY}),
    "sidecar+jwt": lambda: Load(headers={"X-Agent-Token": _jwt()[1]}),
    "sidecar-sse": lambda: _SSE_LOAD,
    "sidecar+llm": lambda: _SSE_LOAD,
}


def _load(name: str) -> Load:
    return LOADS.get(name, Load)()


# -- measuring -------------------------------------------------------------------------------


class _Load:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    async def run(
        self, port: int, connections: int, calls: int, load: Load, settle: Action = _nothing
    ) -> tuple[float, float, float]:
        """CPU seconds (user, system) this process spent, and the wall time, for `calls`."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        # getrusage: microsecond resolution (os.times counts 10 ms ticks).
        before = resource.getrusage(resource.RUSAGE_SELF)
        request = _request(port, load).hex()
        line = f"{port} {connections} {calls} {request} {load.expected.hex()}\n"
        self.proc.stdin.write(line.encode())
        answer = (await self.proc.stdout.readline()).decode().split()
        await settle()
        after = resource.getrusage(resource.RUSAGE_SELF)
        _, ok, bad, wall = answer
        if int(bad) or int(ok) != calls:
            raise SystemExit(f"{bad} bad answers of {calls}: the proxy under test is broken")
        return after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime, float(wall)


def _us(seconds: float, calls: int) -> float:
    return seconds / calls * 1e6


async def _measure(args: argparse.Namespace) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--child",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    _, upstream, sink = (await proc.stdout.readline()).split()
    load = _Load(proc)
    passes = (("seq", 1, args.calls // 4), ("conc", args.connections, args.calls))
    with tempfile.TemporaryDirectory() as tmp:
        started = {
            name: await TARGETS[name](int(upstream), int(sink), Path(tmp)) for name in args.only
        }
        for name, (port, _, flush) in started.items():
            # Warm: pools, caches, children.
            await load.run(port, args.connections, 2000, _load(name), flush)
        # As `sidecar run` does once it serves (cli.py): what lives for the process's
        # life is out of the collector's sight.
        gc.collect()
        gc.freeze()
        gc.set_threshold(20_000, 50, 100)
        # Rounds interleave the targets, so a busier moment of the machine falls on all.
        rows: dict[tuple[str, str], list[tuple[float, float, float]]] = defaultdict(list)
        for _ in range(args.rounds):
            for name, (port, _, flush) in started.items():
                for label, connections, calls in passes:
                    if args.mark:
                        os.getppid()  # callgrind dumps its counts here (--instructions)
                    # The spans of this pass are exported within it (flush): its CPU counts.
                    user, system, wall = await load.run(
                        port, connections, calls, _load(name), flush
                    )
                    if args.mark:
                        os.getppid()
                    rows[name, label].append((_us(user, calls), _us(system, calls), wall / calls))
        print(f"{'target':<12} {'pass':<5} {'us/call min':>11} {'median':>7}", end="")
        print(f" {'user':>6} {'sys':>6} {'calls/s':>8}")
        for (name, label), found in rows.items():
            totals = sorted(u + s for u, s, _ in found)
            user, system, wall = min(found, key=lambda r: r[0] + r[1])
            print(
                f"{name:<12} {label:<5} {totals[0]:>11.1f} {statistics.median(totals):>7.1f}"
                f" {user:>6.1f} {system:>6.1f} {1 / wall:>8.0f}"
            )
        for name in args.profile:
            await _profile(load, started[name][0], args, _load(name))
        for _, stop, _ in started.values():
            await stop()
    assert proc.stdin is not None
    proc.stdin.close()
    await proc.wait()


# Self time grouped by where the code lives, so a change shows up in its layer.
_GROUPS = (
    ("sidecar/http/listener", "listener"),
    ("sidecar/http/egress", "egress"),
    ("sidecar/http/router", "router"),
    ("sidecar/http/pool", "pool"),
    ("sidecar/http/upstream", "upstream"),
    ("sidecar/http/http1", "http1"),
    ("sidecar/telemetry", "telemetry"),
    ("sidecar/steps", "steps"),
    ("sidecar/", "sidecar (other)"),
    ("multidict", "multidict"),
    ("prometheus_client", "prometheus"),
    ("asyncio", "asyncio"),
)


async def _profile(load: _Load, port: int, args: argparse.Namespace, request: Load) -> None:
    try:
        import pyinstrument
    except ImportError:
        pyinstrument = None
    if pyinstrument is not None and not args.cprofile:
        # A sampler: time inside C calls (socket writes, multidict) stays with its caller,
        # and the overhead does not drown the small functions.
        from pyinstrument.stack_sampler import get_stack_sampler

        # Sampled by this process's CPU time, not wall time: time the kernel spends
        # elsewhere (the load process, other users) must not land on the socket writes.
        get_stack_sampler().timer_func = time.process_time
        sampler = pyinstrument.Profiler(interval=0.0001, async_mode="disabled")
        sampler.start()
        await load.run(port, args.connections, args.calls, request)
        sampler.stop()
        print(sampler.output_text(unicode=False, color=False, show_all=False))
        return
    profile = cProfile.Profile()
    profile.enable()
    await load.run(port, args.connections, args.calls, request)
    profile.disable()
    stats = pstats.Stats(profile)
    if os.environ.get("CPU_PER_CALL_PSTATS"):
        stats.dump_stats(os.environ["CPU_PER_CALL_PSTATS"])
    groups: dict[str, float] = defaultdict(float)
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    for (file, _, _), (_, _, tottime, _, _) in raw.items():
        total += tottime
        group = next((g for key, g in _GROUPS if key in file), None)
        if group is None:
            group = "builtins/C" if file == "~" else "other"
        groups[group] += tottime
    print(f"\nprofile ({args.calls} concurrent calls, cProfile inflates absolute figures):")
    for group, seconds in sorted(groups.items(), key=lambda g: -g[1]):
        print(f"  {group:<16} {seconds / total:6.1%}")
    print()
    stats.sort_stats("tottime").print_stats(args.top)


def _instructions(argv: list[str], args: argparse.Namespace) -> None:
    """Run this script under callgrind and report instructions per call: a count that
    the machine's other load does not change, unlike any time. Slow (~30x)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        rest = [a for a in argv if a != "--instructions"]
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            # A dump (and a reset of the counts) at each getppid(): --mark calls it
            # right before and after each timed pass.
            "--dump-before=getppid",
            sys.executable,
            __file__,
            *rest,
            "--mark",
        ]
        # A fixed hash seed: str hashes (dict and set probes) are then the same every run.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL, env=env)
        # Dump 1 is everything up to the first pass, then pass, gap, pass, gap...
        dumps = sorted(Path(tmp).glob("callgrind.out.*"), key=lambda p: int(p.suffix[1:]))
        totals = []
        for dump in dumps:
            summary = next(
                line
                for line in dump.read_text().splitlines()
                if line[:9] in ("summary: ", "totals: ")
            )
            totals.append(int(summary.split()[1]))
    passes = [
        (name, label, calls)
        for _ in range(args.rounds)
        for name in args.only
        for label, calls in (("seq", args.calls // 4), ("conc", args.calls))
    ]
    print(f"{'target':<12} {'pass':<5} {'instructions/call':>18}")
    for (name, label, calls), total in zip(passes, totals[1::2], strict=False):
        print(f"{name:<12} {label:<5} {total / calls:>18,.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", default="probe,listener,sidecar-min,sidecar")
    parser.add_argument("--calls", type=int, default=8000, help="per concurrent pass")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", default="", help="targets to profile after timing")
    parser.add_argument("--cprofile", action="store_true", help="cProfile, not pyinstrument")
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument(
        "--instructions", action="store_true", help="instructions per call, under callgrind"
    )
    parser.add_argument("--mark", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        uvloop.run(_child())
        return
    args.only = [t for t in args.only.split(",") if t]
    args.profile = [t for t in args.profile.split(",") if t]
    unknown = set(args.only + args.profile) - TARGETS.keys()
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")
    if args.instructions:
        _instructions(sys.argv[1:], args)
        return
    uvloop.run(_measure(args))


if __name__ == "__main__":
    main()
