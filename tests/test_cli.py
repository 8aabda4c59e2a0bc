"""The `sidecar` command as platform teams and containers run it: a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sidecar.policy.yamlpos import load_document
from tests.conftest import echo_app

ROOT = Path(__file__).resolve().parents[1]


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
        cwd=ROOT,
    )


def spawn(*args: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sidecar", *args],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_validate_ok_and_errors(tmp_path: Path) -> None:
    done = sidecar("validate", str(ROOT / "policies"))
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ok: ")

    (tmp_path / "bad.yaml").write_text(
        "version: 1\nservices:\n  x:\n    upstream: http://x\n    timout: {total: 1s}\n"
    )
    done = sidecar("validate", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"{tmp_path}/bad.yaml:5:5: unknown key 'timout' (did you mean 'timeout'?)"
    )


def test_validate_resolve_secrets(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\nservices:\n  x:\n    upstream: http://x\n"
        "    auth: {type: bearer, token: '${env:SIDECAR_TEST_TOKEN}'}\n"
    )
    assert sidecar("validate", str(tmp_path)).returncode == 0
    done = sidecar("validate", "--resolve-secrets", str(tmp_path))
    assert done.returncode == 1
    assert "environment variable SIDECAR_TEST_TOKEN is not set" in done.stderr


def test_schema_describes_every_key_and_accepts_examples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    done = sidecar("schema")
    assert done.returncode == 0
    schema = json.loads(done.stdout)
    service = schema["$defs"]["Service"]["properties"]
    assert {"upstream", "prefix", "auth", "rate_limit", "retry", "circuit_breaker"} <= set(service)
    for path in sorted((ROOT / "policies").glob("*.yaml")):
        # Read as YAML 1.2 editors do (`on:` is a key, not True), like the sidecar.
        jsonschema.validate(load_document(path.read_text(), str(path)).data, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "services": {"x": {"upstrem": "http://x"}}}, schema)


async def test_run_serves_reloads_on_sighup_and_stops_on_sigterm(tmp_path: Path, upstream) -> None:
    base = await upstream(echo_app())
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(f"version: 1\nservices:\n  a:\n    upstream: {base}\n")
    listen, admin = free_port(), free_port()
    env = {
        **os.environ,
        "SIDECAR_POLICIES": str(policies),
        "SIDECAR_LISTEN": f"127.0.0.1:{listen}",
        "SIDECAR_ADMIN": f"127.0.0.1:{admin}",
    }
    proc = spawn("run", env=env)
    try:
        await wait_http(f"http://127.0.0.1:{admin}/readyz", 200)
        assert await get_status(f"http://127.0.0.1:{listen}/a/x") == 200
        assert await get_status(f"http://127.0.0.1:{listen}/b/x") == 404
        (policies / "p.yaml").write_text(f"version: 1\nservices:\n  b:\n    upstream: {base}\n")
        proc.send_signal(signal.SIGHUP)
        await wait_http(f"http://127.0.0.1:{listen}/b/x", 200)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        output = proc.stdout.read() if proc.stdout else ""
    assert "loaded (signal)" in output


def test_run_refuses_a_broken_policy_at_start(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nservices:\n  a: {upstream: nope}\n")
    done = sidecar(
        "run",
        "--policies",
        str(tmp_path),
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--admin",
        f"127.0.0.1:{free_port()}",
    )
    assert done.returncode == 1
    assert f"{tmp_path}/p.yaml:3:17: upstream must start with http:// or https://" in done.stderr


async def get_status(url: str) -> int:
    import asyncio

    def fetch() -> int:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return int(r.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)
        except OSError:
            return 0

    return await asyncio.to_thread(fetch)


async def wait_http(url: str, want: int, limit: float = 20) -> None:
    import asyncio

    deadline = time.monotonic() + limit
    while (got := await get_status(url)) != want:
        if time.monotonic() > deadline:
            raise AssertionError(f"{url} answered {got}, wanted {want}")
        await asyncio.sleep(0.1)
