"""Benchmark: pgbench -S directly, through pgbouncer and through the sidecar, in one run.

What runs (all on 127.0.0.1, on free ports, under a temporary directory):
  postgres   a PostgreSQL from /usr/lib/postgresql/*/bin (initdb, pg_ctl), a SCRAM
             user, `pgbench -i` data (scale 1).
  pgbouncer  one process, pool_mode = transaction (or --mode), default_pool_size =
             --pool, logging in upstream with the same user and password.
  sidecar    `python -m sidecar run` with one `databases:` entry, the same pool size and
             mode, and a realistic policy: allow rules on the pgbench tables,
             read_only, a per-agent rate limit far above the load, metrics on.
  load       `pgbench -S` (select-only) with --clients connections, one thread, for
             --seconds against each target in turn, with per-transaction logs.

Reported: transactions/s and p50/p99 latency of each target, the sidecar process's
CPU time per transaction (user + system, from /proc: steadier than transactions/s on
a shared machine), the sidecar's
transactions/s as a share of pgbouncer's and of direct, and the p50 the sidecar
adds over pgbouncer's. The issue's goals: at least 0.5x pgbouncer's
transactions/s, at most 0.15 ms of p50 added.

Run: .venv/bin/python bench/pgbench.py [--seconds 5] [--clients 8] [--pool 4]
     [--protocol simple|extended|prepared] [--mode transaction|session]
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.databases.pg_server import (  # noqa: E402
    DATABASE,
    PASSWORD,
    USER,
    PostgresServer,
    free_port,
    pg_bin,
)


def wait_port(port: int, limit: float = 20) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise SystemExit(f"nothing listens on port {port}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pgbench(
    port: int,
    args: argparse.Namespace,
    logs: Path,
    label: str,
    user: str = "bench-agent",
    pid: int | None = None,
) -> dict[str, float] | None:
    prefix = logs / label
    cpu_before = cpu_seconds(pid) if pid is not None else 0.0
    done = subprocess.run(
        [
            pg_bin("pgbench") or "pgbench",
            "-h", "127.0.0.1", "-p", str(port), "-U", user, DATABASE,
            "-S", "-n", "-c", str(args.clients), "-j", "1", "-T", str(args.seconds),
            "-M", args.protocol, "-l", "--log-prefix", str(prefix),
        ],
        env={**os.environ, "PGPASSWORD": PASSWORD, "PGSSLMODE": "disable"},
        capture_output=True,
        text=True,
        timeout=args.seconds + 60,
    )  # fmt: skip
    if done.returncode != 0:
        # pgbouncer before 1.21 cannot run prepared statements in transaction mode.
        first = (done.stderr.strip().splitlines() or ["?"])[0]
        print(f"  {label}: pgbench failed: {first}", file=sys.stderr)
        return None
    cpu = cpu_seconds(pid) - cpu_before if pid is not None else 0.0
    tps = float(re.search(r"tps = ([0-9.]+)", done.stdout).group(1))  # type: ignore[union-attr]
    latencies: list[int] = []
    for path in glob.glob(f"{prefix}*"):
        with open(path) as f:
            latencies.extend(int(line.split()[2]) for line in f if line.strip())
    latencies.sort()
    n = len(latencies)
    return {
        "tps": tps,
        # CPU time of the process in the middle, per transaction: steadier than tps on a
        # shared machine.
        "cpu_us": cpu / n * 1e6 if n and pid is not None else 0.0,
        "p50": latencies[n // 2] / 1000 if n else 0.0,
        "p99": latencies[min(n - 1, n * 99 // 100)] / 1000 if n else 0.0,
    }


def start_pgbouncer(pg: PostgresServer, pool: int, mode: str, clients: int) -> tuple[Any, int]:
    port = free_port()
    ini = pg.root / "pgbouncer.ini"
    ini.write_text(
        f"""[databases]
{DATABASE} = host=127.0.0.1 port={pg.port} dbname={DATABASE} user={USER} password={PASSWORD}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = {mode}
default_pool_size = {pool}
max_client_conn = {clients + 10}
logfile = {pg.root}/pgbouncer.log
pidfile = {pg.root}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
"""
    )
    if os.geteuid() == 0:
        shutil.chown(ini, "postgres", "postgres")
    binary = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
    proc = subprocess.Popen(
        [*(["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []), binary, str(ini)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(port)
    return proc, port


def start_sidecar(pg: PostgresServer, pool: int, mode: str, tmp: Path) -> tuple[Any, int]:
    port = free_port()
    policies = tmp / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        f"""version: 1
databases:
  {DATABASE}:
    listen: 127.0.0.1:{port}
    upstream: postgres://127.0.0.1:{pg.port}/{DATABASE}
    tls: {{mode: disable}}
    auth: {{username: {USER}, password: "{PASSWORD}"}}
    pool: {{mode: {mode}, size: {pool}}}
    statement_timeout: 30s
    read_only: true
    max_rows: 10000
    rate_limit: [{{rate: 1000000/s, per: agent}}]
    allow:
      - {{agents: ["bench-*"], tables: [public.pgbench_accounts, public.pgbench_branches,
          public.pgbench_tellers, public.pgbench_history], statements: [select]}}
"""
    )
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "sidecar", "run", "--policies", str(policies),
            "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    wait_port(port)
    return proc, port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--protocol", default="simple", choices=["simple", "extended", "prepared"])
    parser.add_argument("--mode", default="transaction", choices=["transaction", "session"])
    args = parser.parse_args()

    pg = PostgresServer()
    procs: list[Any] = []
    try:
        pg.init()
        subprocess.run(
            [pg_bin("pgbench") or "pgbench", "-i", "-s", "1", "-q", "-h", "127.0.0.1",
             "-p", str(pg.port), "-U", USER, DATABASE],
            env={**os.environ, "PGPASSWORD": PASSWORD},
            check=True,
            capture_output=True,
            timeout=120,
        )  # fmt: skip
        logs = Path(tempfile.mkdtemp(prefix="sidecar-pgbench-"))
        bouncer, bouncer_port = start_pgbouncer(pg, args.pool, args.mode, args.clients)
        procs.append(bouncer)
        sidecar, sidecar_port = start_sidecar(pg, args.pool, args.mode, logs)
        procs.append(sidecar)
        results = {
            "direct": pgbench(pg.port, args, logs, "direct", USER),
            "pgbouncer": pgbench(bouncer_port, args, logs, "pgbouncer"),
            "sidecar": pgbench(sidecar_port, args, logs, "sidecar", pid=sidecar.pid),
        }
        shutil.rmtree(logs, ignore_errors=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        pg.close()

    print(
        f"pgbench -S, {args.clients} clients, 1 thread, {args.seconds}s each, -M {args.protocol}; "
        f"pool {args.pool} ({args.mode} mode)"
    )
    for name, r in results.items():
        if r is None:
            print(f"  {name:<10} failed")
        else:
            cpu = f"   {r['cpu_us']:.0f} us CPU/tx" if r["cpu_us"] else ""
            print(
                f"  {name:<10} {r['tps']:>9.0f} tps   p50 {r['p50']:.3f} ms   "
                f"p99 {r['p99']:.3f} ms{cpu}"
            )
    bouncer, side, direct = results["pgbouncer"], results["sidecar"], results["direct"]
    if side is None or direct is None:
        raise SystemExit(1)
    if bouncer is None:
        print(f"  sidecar/direct {side['tps'] / direct['tps']:.2f}x tps")
        return
    print(
        f"  sidecar/pgbouncer {side['tps'] / bouncer['tps']:.2f}x tps (goal >= 0.5x), "
        f"sidecar/direct {side['tps'] / direct['tps']:.2f}x; p50 added over pgbouncer "
        f"{side['p50'] - bouncer['p50']:+.3f} ms (goal <= 0.15 ms)"
    )


if __name__ == "__main__":
    main()
