"""No stray files at the root, and what the bench and `make run` leave behind is
ignored by git (issue 21, item 10)."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.skipif(
    shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout"
)

# What a `make run`, `make bench` or a proxy started by hand writes into the checkout.
LEFT_BEHIND = [
    "caddy.log",
    "cd.pid",
    "nginx.log",
    "sidecar-data/webhooks.sqlite3",
    "bench/out/results.json",
    ".venv/bin/python",
    "sidecar/hot_path__mypyc.cpython-311-x86_64-linux-gnu.so",
    "sidecar/__pycache__/cli.cpython-311.pyc",
]


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)


def test_no_logs_or_pids_are_committed_at_the_root() -> None:
    tracked = _git("ls-files").stdout.splitlines()
    stray = [p for p in tracked if "/" not in p and p.endswith((".log", ".pid"))]
    assert stray == []


def test_what_the_bench_and_make_run_leave_is_ignored() -> None:
    done = _git("check-ignore", "--no-index", *LEFT_BEHIND)
    ignored = set(done.stdout.splitlines())
    assert ignored == set(LEFT_BEHIND), f"not ignored: {sorted(set(LEFT_BEHIND) - ignored)}"
