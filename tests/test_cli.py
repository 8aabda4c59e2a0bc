"""The `sidecar` command as platform teams and containers run it: a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

from sidecar.policy.yamlpos import load_document
from tests.conftest import echo_app
from tests.helpers import eventually, sidecar_process

pytestmark = pytest.mark.process

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


def test_validate_reports_a_control_character_at_its_place(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nservices:\n  a:\n    upstream: http://x\0y\n")
    done = sidecar("validate", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        f"{tmp_path}/p.yaml:4:23: invalid YAML: character U+0000 is not allowed"
    ]


def test_validate_reports_every_error_of_every_file(tmp_path: Path) -> None:
    # A misspelt key used to hide the rest of its service's errors.
    (tmp_path / "a.yaml").write_text(
        "version: 1\nservices:\n  x:\n    upstream: ftp://x\n    timout: {total: 1s}\n"
    )
    (tmp_path / "b.yaml").write_text(
        "version: 1\nservices:\n  bad name:\n    upstrem: http://y\n"
        "    auth: {type: bearer, tokn: t}\n  z:\n    upstream: http://z\n"
        "    headers: {set: {X-A: 1}, remove: [a b]}\n"
    )
    (tmp_path / "c.yaml").write_text("version: 1\nagents: {headr: X-Who}\n\x1b\n")
    done = sidecar("validate", str(tmp_path))
    assert done.returncode == 1
    a, b, c = (f"{tmp_path}/{name}.yaml" for name in "abc")
    assert done.stderr.splitlines() == [
        f"{a}:4:15: upstream must start with http:// or https://",
        f"{a}:5:5: unknown key 'timout' (did you mean 'timeout'?)",
        f"{b}:3:3: service name 'bad name' may hold only letters, digits, _ . -",
        # Not also "'upstream' is required": the hint names it.
        f"{b}:4:5: unknown key 'upstrem' (did you mean 'upstream'?)",
        f"{b}:5:26: unknown key 'tokn' (did you mean 'token'?)",
        f"{b}:8:26: Input should be a valid string",
        f"{b}:8:39: 'a b' is not a valid HTTP header name",
        f"{c}:3:1: invalid YAML: character U+001B is not allowed",
    ]


async def test_reload_reports_a_control_character_at_its_place(
    tmp_path: Path, upstream, client
) -> None:
    base = await upstream(echo_app())
    (tmp_path / "p.yaml").write_text(f"version: 1\nservices:\n  a:\n    upstream: {base}\n")
    async with sidecar_process(tmp_path) as proc:
        (tmp_path / "p.yaml").write_text(f"version: 1\nservices:\n  a:\n    upstream: {base}\0\n")
        async with client.post(f"{proc.admin}/reload") as r:
            assert r.status == 422
            body = await r.json()
        column = len(f"    upstream: {base}") + 1
        assert body["errors"] == [
            f"{tmp_path}/p.yaml:4:{column}: invalid YAML: character U+0000 is not allowed"
        ]
        assert await status(client, f"{proc.url}/a/x") == 200  # the last good policy serves
        assert await proc.stop(signal.SIGTERM) == 0
    assert "Traceback" not in proc.output


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


async def test_run_serves_reloads_on_sighup_and_stops_on_sigterm(
    tmp_path: Path, upstream, client
) -> None:
    base = await upstream(echo_app())
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(f"version: 1\nservices:\n  a:\n    upstream: {base}\n")
    # The policy directory from the environment, as a container sets it.
    env = {**os.environ, "SIDECAR_POLICIES": str(policies)}
    async with sidecar_process(None, env=env) as proc:
        assert await status(client, f"{proc.url}/a/x") == 200
        assert await status(client, f"{proc.url}/b/x") == 404
        (policies / "p.yaml").write_text(f"version: 1\nservices:\n  b:\n    upstream: {base}\n")
        proc.proc.send_signal(signal.SIGHUP)

        async def b_served() -> bool:
            return await status(client, f"{proc.url}/b/x") == 200

        await eventually(b_served, "service b served after SIGHUP")
        assert await proc.stop(signal.SIGTERM) == 0
    assert "loaded (signal)" in proc.output


def test_run_refuses_a_broken_policy_at_start(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("version: 1\nservices:\n  a: {upstream: nope}\n")
    done = sidecar(
        "run",
        "--policies",
        str(tmp_path),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
    )
    assert done.returncode == 1
    assert f"{tmp_path}/p.yaml:3:17: upstream must start with http:// or https://" in done.stderr


async def status(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as r:
        await r.read()
        return r.status
