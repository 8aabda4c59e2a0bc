"""`sidecar check` probes each database: connect, the sidecar's login, SELECT 1, version."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .pg_server import DATABASE, PASSWORD, USER, PostgresServer

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]


def check(policies: Path) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "sidecar", "check", "--policies", str(policies), "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    return done.returncode, done.stdout + done.stderr


def test_check_logs_in_and_reports_the_version(postgres: PostgresServer, tmp_path: Path) -> None:
    body = f"""
        version: 1
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{postgres.port}/{DATABASE}
            auth: {{username: {USER}, password: "${{file:{tmp_path}/pw}}"}}
        """
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "policy.yaml").write_text(textwrap.dedent(body))
    (tmp_path / "pw").write_text(PASSWORD)
    code, out = check(tmp_path / "p")
    assert code == 0, out
    result = json.loads(out)["services"][0]
    assert result["ok"] and result["server_version"].startswith("15")
    assert set(result["ms"]) == {"tcp", "login", "query"}
    (tmp_path / "pw").write_text("wrong-" + PASSWORD)
    code, out = check(tmp_path / "p")
    assert code == 1
    result = json.loads(out)["services"][0]
    assert result["stage"] == "login" and "28P01" in result["error"]
    assert PASSWORD not in out


def test_run_stops_when_a_database_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (tmp_path / "policy.yaml").write_text(
            "version: 1\ndatabases:\n  shop:\n"
            f"    listen: 127.0.0.1:{port}\n"
            "    upstream: postgres://127.0.0.1:1/shop\n"
            "    auth: {username: u, password: p}\n"
        )
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar",
                "run",
                "--policies",
                str(tmp_path),
                "--listen",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 1
    assert f"database 'shop': cannot listen on 127.0.0.1:{port}: address already in use" in (
        done.stderr
    )
