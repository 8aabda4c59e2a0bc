"""Benchmark: the sidecar side by side with nginx, in one run, on loopback.

What runs (all on 127.0.0.1, on free ports, under a temporary directory):
  upstream  nginx, 1 worker, answering every path with a small fixed JSON body
  direct    wrk -> upstream                    (the floor: what the load side can do)
  nginx     wrk -> nginx keep-alive proxy, 1 worker -> upstream   (the reference proxy)
  sidecar   wrk -> `sidecar run` -> upstream    (the proxy under test)
  + any extra targets, e.g. the sidecar with `--sidecar-env KEY=VAL` set.
Each target gets a pass with many connections (throughput) and one with a single
connection (added latency, with no queueing to hide it).

CPU pinning, for a 2-core machine (override with --load-cpus / --proxy-cpus):
  load core  (first CPU we may use):  the upstream nginx and wrk
  proxy core (second CPU):            the proxy under test, one at a time
The proxy under test gets a core to itself, so its req/s is what one core of it
can do; the sidecar is a single process on one event loop, and nginx is given
one worker, so both proxies get exactly the same resources. The upstream and
wrk share the other core: the `direct` row shows how much that core can drive,
and the per-core busy figures show which side was the bottleneck in each pass.

Run: .venv/bin/python bench/run.py [--quick] [--duration S] [--sidecar-env K=V ...]
Results: a table on stdout and bench/out/results.json.
"""

from __future__ import annotations

import argparse
import contextlib
import enum
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
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
SERVICE = "bench"
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
    SIDECAR = "sidecar"


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


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with _HTTP.open(url, timeout=2.0) as resp:
            status: int = resp.status
            return status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last = "no answer"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode}:\n{tail(log)}")
        try:
            status, _ = http_get(url)
            if status == 200:
                return
            last = f"HTTP {status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise BenchError(f"{what} not ready after {READY_TIMEOUT_S:.0f}s ({last}):\n{tail(log)}")


def check_answer(url: str, what: str) -> None:
    """A proxy that answers fast with the wrong thing (404, 502) must not be timed."""
    status, body = http_get(url)
    if status != 200 or body != UPSTREAM_BODY.encode():
        raise BenchError(f"{what}: GET {url} gave HTTP {status}, body {body[:200]!r}")


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
    for sign in ("Failed to export", "Exception while exporting", "Queue is full"):
        if sign in text:
            print(f"   note: {what} log says {sign!r}; some spans were lost", file=sys.stderr)


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


class Bench:
    def __init__(self, settings: Settings, workdir: Path, procs: Processes) -> None:
        self.settings = settings
        self.workdir = workdir
        self.procs = procs
        self.upstream_port = 0
        self.sink_port = 0

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        proc, log = self._start_nginx(
            "upstream",
            BENCH_DIR / "nginx-upstream.conf.template",
            {"PORT": str(self.upstream_port), "BODY": UPSTREAM_BODY},
            cpus=self.settings.load_cpus,
        )
        url = f"http://127.0.0.1:{self.upstream_port}{REQUEST_PATH}"
        wait_ready(url, proc, log, "upstream nginx")
        check_answer(url, "upstream nginx")

    @contextlib.contextmanager
    def serve(self, target: Target) -> Iterator[str]:
        """Start what the target needs and yield the URL wrk should hit."""
        if target.kind is Kind.DIRECT:
            yield f"http://127.0.0.1:{self.upstream_port}{REQUEST_PATH}"
            return
        if target.kind is Kind.NGINX:
            port = free_port()
            proc, log = self._start_nginx(
                target.name,
                BENCH_DIR / "nginx-proxy.conf.template",
                {"PORT": str(port), "UPSTREAM_PORT": str(self.upstream_port)},
                cpus=self.settings.proxy_cpus,
                env=target.env,
            )
            url = f"http://127.0.0.1:{port}/{SERVICE}{REQUEST_PATH}"
            ready_url = url
        else:
            proc, log, url, ready_url = self._start_sidecar(target)
        try:
            wait_ready(ready_url, proc, log, target.name)
            check_answer(url, target.name)
            if target.tracing:
                check_tracing(log, target.name, before_run=True)
            yield url
            if proc.poll() is not None:
                raise BenchError(f"{target.name} died during the run:\n{tail(log)}")
            if target.tracing:
                check_tracing(log, target.name, before_run=False)
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

    def _start_sidecar(self, target: Target) -> tuple[subprocess.Popen[bytes], Path, str, str]:
        home = self.workdir / target.name
        policies = home / "policies"
        policies.mkdir(parents=True)
        (policies / "bench.yaml").write_text(
            "version: 1\n"
            "services:\n"
            f"  {SERVICE}:\n"
            f"    upstream: http://127.0.0.1:{self.upstream_port}\n"
        )
        port, admin = free_port(), free_port()
        argv = [str(self.settings.sidecar_bin), "run", "--policies", str(policies)]
        argv += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
        # SIDECAR_* from the caller's shell would silently change what is measured;
        # the flags above say everything. Target env (OTEL_* etc.) goes on top.
        env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_")}
        if target.tracing:
            env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = self._otlp_sink()
        env.update(target.env)
        log = home / "sidecar.log"
        proc = self.procs.start(argv, cpus=self.settings.proxy_cpus, log=log, env=env)
        url = f"http://127.0.0.1:{port}/{SERVICE}{REQUEST_PATH}"
        return proc, log, url, f"http://127.0.0.1:{admin}/readyz"

    def _otlp_sink(self) -> str:
        """An OTLP/HTTP endpoint that accepts every export: nginx answering 200, on the
        load core, so the sidecar pays for making and sending spans, not a collector."""
        if not self.sink_port:
            self.sink_port = free_port()
            proc, log = self._start_nginx(
                "otlp-sink",
                BENCH_DIR / "nginx-upstream.conf.template",
                {"PORT": str(self.sink_port), "BODY": ""},
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
        argv += [f"--timeout={WRK_REQUEST_TIMEOUT_S}s", "-s", str(BENCH_DIR / "report.lua")]
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


def comparisons(
    targets: Sequence[Target], results: Sequence[Measurement], levels: Sequence[int]
) -> dict[str, Any]:
    """Each sidecar's req/s over nginx's, and each proxy's latency over direct at 1 conn.

    Over direct, the added latency includes two hops between cores (wrk -> proxy ->
    upstream, and back), which nginx pays too; so for a sidecar the figure to watch
    is also given over nginx: what the sidecar costs beyond a proxy that costs ~nothing.
    """
    rps_ratio: dict[str, dict[str, float]] = {}
    added_p50: dict[str, float] = {}
    added_p99: dict[str, float] = {}
    p50_over_nginx: dict[str, float] = {}
    direct_1, nginx_1 = find(results, "direct", 1), find(results, "nginx", 1)
    for t in targets:
        mine_1 = find(results, t.name, 1)
        if t.kind is not Kind.DIRECT and direct_1 and mine_1:
            added_p50[t.name] = round(mine_1.p50_ms - direct_1.p50_ms, 3)
            added_p99[t.name] = round(mine_1.p99_ms - direct_1.p99_ms, 3)
        if t.kind is not Kind.SIDECAR:
            continue
        if nginx_1 and mine_1:
            p50_over_nginx[t.name] = round(mine_1.p50_ms - nginx_1.p50_ms, 3)
        for c in levels:
            mine, ref = find(results, t.name, c), find(results, "nginx", c)
            if mine and ref and ref.rps:
                rps_ratio.setdefault(t.name, {})[str(c)] = round(mine.rps / ref.rps, 3)
    # Tracing on vs off: the same sidecar, with and without span export.
    tracing: dict[str, Any] = {}
    for t in targets:
        if not t.tracing:
            continue
        rps = {}
        for c in levels:
            on, off = find(results, t.name, c), find(results, "sidecar", c)
            if on and off and off.rps:
                rps[str(c)] = round(on.rps / off.rps, 3)
        on_1, off_1 = find(results, t.name, 1), find(results, "sidecar", 1)
        entry: dict[str, Any] = {"rps_over_sidecar_by_connections": rps}
        if on_1 and off_1:
            entry["added_p50_ms_at_1_connection"] = round(on_1.p50_ms - off_1.p50_ms, 3)
            entry["added_p99_ms_at_1_connection"] = round(on_1.p99_ms - off_1.p99_ms, 3)
        tracing[t.name] = entry
    return {
        "tracing_overhead": tracing,
        "rps_over_nginx_by_connections": rps_ratio,
        "added_p50_ms_over_direct_at_1_connection": added_p50,
        "added_p99_ms_over_direct_at_1_connection": added_p99,
        "added_p50_ms_over_nginx_at_1_connection": p50_over_nginx,
    }


def pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.0f}%"


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
    print()
    for name, by_conns in comp["rps_over_nginx_by_connections"].items():
        parts = ", ".join(f"{r:.3f} at {c} conn" for c, r in by_conns.items())
        print(f"{name} req/s / nginx req/s: {parts}")
    for name, p50 in comp["added_p50_ms_over_direct_at_1_connection"].items():
        p99 = comp["added_p99_ms_over_direct_at_1_connection"][name]
        line = f"{name} added latency over direct at 1 conn: p50 {p50:+.3f} ms, p99 {p99:+.3f} ms"
        over_nginx = comp["added_p50_ms_over_nginx_at_1_connection"].get(name)
        if over_nginx is not None:
            line += f" (p50 {over_nginx:+.3f} ms over nginx)"
        print(line)
    for name, entry in comp.get("tracing_overhead", {}).items():
        parts = ", ".join(
            f"{r:.3f} at {c} conn" for c, r in entry["rps_over_sidecar_by_connections"].items()
        )
        line = f"{name} (tracing on) req/s / sidecar req/s: {parts or '-'}"
        if "added_p50_ms_at_1_connection" in entry:
            line += (
                f"; added at 1 conn: p50 {entry['added_p50_ms_at_1_connection']:+.3f} ms, "
                f"p99 {entry['added_p99_ms_at_1_connection']:+.3f} ms"
            )
        print(line)
    for m in results:
        if m.error_count:
            print(f"WARNING: {m.target} at {m.connections} conn had errors: {m.errors}")
    for name, why in failures.items():
        print(f"FAILED: {name}: {why}", file=sys.stderr)


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
        Target(name="sidecar", kind=Kind.SIDECAR),
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
    p.add_argument("--target", action="append", default=[], help="run only these (repeatable)")
    p.add_argument("--load-cpus", help="taskset list for upstream and wrk (default: 1st CPU)")
    p.add_argument("--proxy-cpus", help="taskset list for the proxy (default: 2nd CPU)")
    p.add_argument("--no-pin", action="store_true", help="do not pin anything")
    p.add_argument("--sidecar-bin", type=Path, default=REPO / ".venv" / "bin" / "sidecar")
    p.add_argument("--nginx", default=shutil.which("nginx") or "/usr/sbin/nginx")
    p.add_argument("--wrk", default=shutil.which("wrk") or "wrk")
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
        sidecar_bin=args.sidecar_bin,
    )
    targets = build_targets(parse_env(args.sidecar_env))
    if args.target:
        unknown = set(args.target) - {t.name for t in targets}
        if unknown:
            raise SystemExit(
                f"unknown --target {sorted(unknown)}; have {[t.name for t in targets]}"
            )
        targets = [t for t in targets if t.name in args.target]

    for sig in (signal.SIGTERM, signal.SIGHUP):
        # An ignored signal stays ignored: under nohup, a closed terminal must not
        # abort the run.
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_interrupted)

    results: list[Measurement] = []
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
                with bench.serve(target) as url:
                    results.extend(bench.measure(target, url))
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

    comp = comparisons(targets, results, settings.connection_levels)
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
            "git": tool_version(["git", "-C", str(REPO), "describe", "--always", "--dirty"]),
            "settings": {**asdict(settings), "sidecar_bin": str(settings.sidecar_bin)},
            "upstream_body_bytes": len(UPSTREAM_BODY),
            "cpu_busy_before_start": idle,
            "targets": [
                {"name": t.name, "kind": t.kind.value, "env": dict(t.env)} for t in targets
            ],
        },
        "results": [asdict(m) for m in results],
        "comparisons": comp,
        "failures": failures,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if failures or any(m.error_count for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
