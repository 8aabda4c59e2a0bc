"""Benchmark: the cost of AWS SigV4 signing per call, as a ratio to a bearer token.

One run, on loopback: an nginx upstream (one worker) answering a fixed body,
and two `sidecar run` processes in turn, each with one service that differs
only in its auth: `bearer` and `aws_sigv4` (service s3, UNSIGNED-PAYLOAD, as
an S3 GET is signed). wrk drives each for the same time with the same
connections, in alternating turns. The upstream refuses a call without the credential (401), so a
sidecar that skipped the signing would fail the check. Goal: sigv4 >= 0.8x.

Run: .venv/bin/python bench/sigv4.py [--seconds 2] [--rounds 3] [--connections 32]
(The full side-by-side bench is bench/run.py; this one reuses its helpers.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run as bench

POLICIES = {
    "bearer": '{type: bearer, token: "${env:BENCH_TOKEN}"}',
    "aws_sigv4": (
        "{type: aws_sigv4, service: s3, region: us-east-1, "
        'access_key_id: AKIABENCH0000000000X, secret_access_key: "${env:BENCH_TOKEN}"}'
    ),
}
# Either credential, as each sidecar sends it; anything else is refused.
AUTH_CHECK = (
    '            if ($http_authorization !~ "^(Bearer '
    + bench.TOKEN
    + '|AWS4-HMAC-SHA256 Credential=AKIABENCH0000000000X/)") { return 401; }'
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=2, help="of each turn")
    parser.add_argument("--rounds", type=int, default=3, help="turns of each auth")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    wrk, nginx = shutil.which("wrk"), shutil.which("nginx") or "/usr/sbin/nginx"
    if wrk is None:
        print("wrk is not installed", file=sys.stderr)
        return 1
    procs = bench.Processes()
    results: dict[str, float] = {}
    cpu_us: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="sigv4-bench-") as tmp:
        work = Path(tmp)
        try:
            port = bench.free_port()
            (work / "upstream").mkdir()
            conf = work / "upstream" / "nginx.conf"
            bench.render(
                bench.BENCH_DIR / "nginx-upstream.conf.template",
                conf,
                {
                    "PORT": str(port),
                    "BODY": bench.UPSTREAM_BODY,
                    "AUTH_CHECK": AUTH_CHECK,
                    "PREFIX": str(work / "upstream"),
                },
            )
            argv = [nginx, "-p", str(work / "upstream"), "-c", str(conf)]
            argv += ["-e", str(work / "upstream" / "error.log")]
            proc = procs.start(argv, cpus=None, log=work / "upstream" / "stdout.log")
            url = f"http://127.0.0.1:{port}{bench.REQUEST_PATH}"
            bench.wait_ready(
                url,
                proc,
                work / "upstream" / "error.log",
                "upstream",
                {"Authorization": f"Bearer {bench.TOKEN}"},
            )
            started = {
                name: start(procs, work, name, auth, port) for name, auth in POLICIES.items()
            }
            # Short turns, alternating, summed: a shared machine's load drifts, and
            # this way each auth sees the same drift.
            totals = {name: [0.0, 0.0, 0.0] for name in POLICIES}
            for _ in range(args.rounds):
                for name, (url, pid) in started.items():
                    before = cpu_seconds(pid)
                    requests, seconds = measure(procs, work, name, url, wrk, args)
                    totals[name][0] += requests
                    totals[name][1] += seconds
                    totals[name][2] += cpu_seconds(pid) - before
            results = {name: req / sec for name, (req, sec, _) in totals.items()}
            cpu_us = {name: cpu / req * 1e6 for name, (req, _, cpu) in totals.items()}
        finally:
            procs.stop_all()
    ratio = results["aws_sigv4"] / results["bearer"]
    # The sidecar's own CPU per call: what its req/s would be on a core of its own,
    # hardly moved by what else runs on the machine.
    cpu_ratio = cpu_us["bearer"] / cpu_us["aws_sigv4"]
    for name, rps in results.items():
        print(f"{name:10} {rps:10.0f} req/s {cpu_us[name]:8.1f} us CPU/call")
    print(
        f"aws_sigv4 / bearer = {ratio:.2f}x req/s, {cpu_ratio:.2f}x by CPU per call (goal >= 0.8x)"
    )
    print(
        json.dumps(
            {
                "rps": results,
                "cpu_us": cpu_us,
                "ratio": round(ratio, 3),
                "cpu_ratio": round(cpu_ratio, 3),
            }
        )
    )
    return 0


def start(
    procs: bench.Processes, work: Path, name: str, auth: str, upstream_port: int
) -> tuple[str, int]:
    home = work / name
    (home / "policies").mkdir(parents=True)
    (home / "policies" / "bench.yaml").write_text(
        f"version: 1\nservices:\n  {bench.SERVICE}:\n"
        f"    upstream: http://127.0.0.1:{upstream_port}\n    auth: {auth}\n"
    )
    port, admin = bench.free_port(), bench.free_port()
    argv = [sys.executable, "-m", "sidecar", "run", "--policies", str(home / "policies")]
    argv += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
    env = bench.sidecar_env({"BENCH_TOKEN": bench.TOKEN, "PYTHONPATH": os.getcwd()})
    proc = procs.start(argv, cpus=None, log=home / "sidecar.log", env=env)
    bench.wait_ready(f"http://127.0.0.1:{admin}/readyz", proc, home / "sidecar.log", name)
    url = f"http://127.0.0.1:{port}/{bench.SERVICE}{bench.REQUEST_PATH}"
    bench.check_answer(url, name, {})
    return url, proc.pid


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    procs: bench.Processes, work: Path, name: str, url: str, wrk: str, args: argparse.Namespace
) -> tuple[float, float]:
    """(requests, seconds) of one wrk turn."""
    log = work / f"wrk-{name}.log"
    script = bench.BENCH_DIR / "report.lua"
    run = [wrk, "-t2", f"-c{args.connections}", f"-d{args.seconds}s", "-s", str(script), url]
    proc = procs.start(run, cpus=None, log=log)
    proc.wait(timeout=args.seconds + 30)
    procs.stop(proc)
    for line in log.read_text().splitlines():
        if line.startswith("BENCH_JSON "):
            stats = json.loads(line.removeprefix("BENCH_JSON "))
            if stats["errors"]["status"]:
                raise SystemExit(f"{name}: non-2xx answers: {stats['errors']}")
            return float(stats["requests"]), stats["duration_us"] / 1e6
    raise SystemExit(f"{name}: wrk gave no report:\n{log.read_text()}")


if __name__ == "__main__":
    sys.exit(main())
