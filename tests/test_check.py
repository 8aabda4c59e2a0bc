"""`sidecar check` against real local upstreams, through the real CLI."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "sk-check-canary-5b1f0e"


async def _start(app: web.Application) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _sidecar(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SIDECAR_CHECK_TOKEN": TOKEN},
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.process
async def test_check_reports_each_service_and_never_the_secret(tmp_path: Path) -> None:
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.headers.get("Authorization") != f"Bearer {TOKEN}":
            return web.Response(status=401)
        return web.json_response({"data": []})

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, text="bad key")

    good_app = web.Application()
    good_app.router.add_route("*", "/{tail:.*}", models)
    bad_app = web.Application()
    bad_app.router.add_route("*", "/{tail:.*}", refuse)
    good, good_port = await _start(good_app)
    bad, bad_port = await _start(bad_app)
    closed_port = _free_port()
    auth = "auth: {type: bearer, token: '${env:SIDECAR_CHECK_TOKEN}'}"
    (tmp_path / "services.yaml").write_text(
        "version: 1\nservices:\n"
        f"  good:\n    upstream: http://127.0.0.1:{good_port}/v1\n    {auth}\n"
        "    check: {path: /models, method: GET, expect: [200]}\n"
        f"  bad:\n    upstream: http://127.0.0.1:{bad_port}\n    {auth}\n"
        f"  gone:\n    upstream: http://127.0.0.1:{closed_port}\n    {auth}\n"
    )
    try:
        code, out, err = await _sidecar("check", "--policies", str(tmp_path), "--json")
        assert code == 1
        report = json.loads(out)
        by_name = {r["service"]: r for r in report["services"]}
        assert report["ok"] is False
        assert by_name["good"]["ok"] is True and by_name["good"]["status"] == 200
        assert set(by_name["good"]["ms"]) == {"dns", "tcp", "probe"}
        assert seen == ["/v1/models"]  # the base path kept, the probe path under it
        assert by_name["bad"]["ok"] is False and by_name["bad"]["status"] == 401
        assert by_name["bad"]["stage"] == "probe"
        assert by_name["gone"]["ok"] is False and by_name["gone"]["stage"] == "tcp"
        assert TOKEN not in out + err

        code, out, err = await _sidecar("check", "good", "--policies", str(tmp_path))
        assert code == 0
        assert out.startswith("ok   good  HTTP 200")
        assert "\033[" not in out  # not a terminal: no colour
        code, out, err = await _sidecar("check", "bad", "gone", "--policies", str(tmp_path))
        assert code == 1
        # Columns aligned: the service names padded to the longest.
        assert "FAIL bad   probe: credential not accepted (HTTP 401)" in out
        assert "FAIL gone  tcp:" in out
        assert TOKEN not in out + err

        code, out, err = await _sidecar("check", "nope", "--policies", str(tmp_path))
        assert code == 1 and "unknown service 'nope'" in err
    finally:
        await good.cleanup()
        await bad.cleanup()


@pytest.mark.process
async def test_check_skips_offline_services_and_probes_the_templates_path(tmp_path: Path) -> None:
    seen: list[str] = []

    async def models(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.path != "/v1/models":
            return web.Response(status=404)
        return web.json_response({"data": []})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", models)
    runner, port = await _start(app)
    closed_port = _free_port()
    (tmp_path / "services.yaml").write_text(
        "version: 1\nservices:\n"
        # The template's own probe (the models list), under the base path /v1.
        f"  llm:\n    template: openai\n    upstream: http://127.0.0.1:{port}/v1\n"
        "    auth: {type: bearer, token: '${env:SIDECAR_CHECK_TOKEN}'}\n"
        # Offline services: their upstreams are down, and they never call them.
        f"  mocked-service:\n    upstream: http://127.0.0.1:{closed_port}\n    mode: mock\n"
        f"  replayed:\n    upstream: http://127.0.0.1:{closed_port}\n    mode: replay\n"
    )
    try:
        code, out, err = await _sidecar("check", "--policies", str(tmp_path), "--json")
        assert code == 0, out + err
        by_name = {r["service"]: r for r in json.loads(out)["services"]}
        assert by_name["llm"]["status"] == 200 and seen == ["/v1/models"]
        assert by_name["mocked-service"]["stage"] == "skipped"
        assert by_name["mocked-service"]["ms"] == {}
        assert by_name["replayed"]["ok"] is True

        code, out, err = await _sidecar("check", "--policies", str(tmp_path))
        assert code == 0, out + err
        lines = out.splitlines()
        assert lines[0].startswith("ok   llm             HTTP 200")
        assert lines[1].startswith("skip mocked-service  mode: mock, the upstream is never called")
        # Every line's third column starts at the same place: after the longest name.
        column = len("skip mocked-service  ")
        assert all(line[column - 1] == " " and line[column] != " " for line in lines), lines
    finally:
        await runner.cleanup()


@pytest.mark.process
async def test_check_json_is_json_when_the_policy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("version: 1\nservices:\n  x: {upstrem: http://a}\n")
    code, out, _ = await _sidecar("check", "--policies", str(tmp_path), "--json")
    assert code == 1
    report = json.loads(out)
    assert report["ok"] is False and report["services"] == []
    assert any("broken.yaml:3" in e and "upstrem" in e for e in report["errors"]), report


def test_every_built_in_template_has_a_probe_that_expects_success() -> None:
    from sidecar.policy.templates import catalog

    found = catalog(None)
    assert found.templates
    for template in found.templates.values():
        check = template.service.get("check")
        assert check is not None, template.name
        # 200 from a cheap call of the API; where the API has none that needs no argument,
        # the status it gives only once the credential was accepted (a validation error).
        assert check.get("expect") in ([200], [400]), template.name
        assert check["path"] != "/", template.name
