"""The admin port's token, its refusal to start exposed, the console's headers, and a
canary search of every console page and admin answer for the policy's secrets."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import sys
from pathlib import Path

import pytest

from sidecar.admin import _ROUTES
from tests.conftest import echo_app
from tests.console.traffic import (
    CANARY_ADMIN,
    CANARY_SLACK,
    CANARY_TOKEN,
    RECEIVER_OK,
    SIGNING,
    Sink,
    busy_policy,
    drive,
    failing_app,
)
from tests.helpers import ROOT, sidecar_process
from tests.steps.llm_upstream import LLMUpstream

# What would load something from another host: src/href/url()/fetch/import of a URL.
ELSEWHERE = re.compile(r"""(src=|href=|url\(|fetch\(|import\s|@import\s)\s*["']?(https?:)?//""")
ADMIN = """
admin:
  token: "${env:ADMIN_TOKEN}"
"""


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(path))
    return path


def concrete(path: str) -> str:
    return path.replace("{id}", "msg_x").replace("{name}", "sink")


async def test_a_wrong_token_gets_401_on_every_admin_path(
    upstream, start_sidecar, client, data_dir
):
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n{ADMIN}",
        env={"ADMIN_TOKEN": CANARY_ADMIN},
    )
    wrong = {"Authorization": "Bearer not-the-token"}
    for method, path, _ in _ROUTES:
        async with client.request(method, sc.admin + concrete(path), headers=wrong) as r:
            assert r.status == 401, (method, path)
            assert r.headers["X-Sidecar-Error"] == "unauthenticated"
            assert CANARY_ADMIN not in await r.text()
    # Without a token: only the probes answer; a browser is asked for it (Basic).
    for method, path, _ in _ROUTES:
        async with client.request(method, sc.admin + concrete(path)) as r:
            if path in ("/healthz", "/readyz"):
                assert r.status == 200
            else:
                assert r.status == 401, (method, path)
                assert r.headers.getall("WWW-Authenticate")[0].startswith("Basic ")
    good = {"Authorization": f"Bearer {CANARY_ADMIN}"}
    async with client.get(f"{sc.admin}/api/console", headers=good) as r:
        assert r.status == 200
    async with client.post(f"{sc.admin}/reload", headers=good) as r:
        assert r.status == 200
    basic = base64.b64encode(f"ops:{CANARY_ADMIN}".encode()).decode()
    async with client.get(f"{sc.admin}/", headers={"Authorization": f"Basic {basic}"}) as r:
        assert r.status == 200 and "<title>agent-sidecar console</title>" in await r.text()


@pytest.mark.process
async def test_a_non_loopback_admin_without_a_token_refuses_to_start(tmp_path):
    (tmp_path / "p.yaml").write_text("version: 1\nservices:\n  api: {upstream: 'http://x'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_ADMIN_TOKEN")}
    env["SIDECAR_DATA_DIR"] = str(tmp_path / "data")
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "sidecar", "run", "--policies", str(tmp_path)),
        *("--listen", "127.0.0.1:0", "--admin", "0.0.0.0:0"),
        cwd=ROOT,
        env=env,
        stderr=asyncio.subprocess.PIPE,
    )
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    message = err.decode()
    assert "the admin listener 0.0.0.0:0 is not a loopback address and no admin token" in message
    assert "SIDECAR_ADMIN_TOKEN" in message and "Traceback" not in message


@pytest.mark.process
async def test_a_non_loopback_admin_with_a_token_serves_only_with_it(tmp_path, client):
    (tmp_path / "p.yaml").write_text("version: 1\nservices:\n  api: {upstream: 'http://x'}\n")
    token_file = tmp_path / "admin-token"
    token_file.write_text(CANARY_ADMIN + "\n")
    env = {**os.environ, "SIDECAR_ADMIN_TOKEN_FILE": str(token_file)}
    env["SIDECAR_DATA_DIR"] = str(tmp_path / "data")
    async with sidecar_process(tmp_path, "--admin", "0.0.0.0:0", env=env) as proc:
        admin = "http://127.0.0.1:" + proc.admin.rpartition(":")[2]
        async with client.get(f"{admin}/metrics") as r:
            assert r.status == 401
        headers = {"Authorization": f"Bearer {CANARY_ADMIN}"}
        async with client.get(f"{admin}/metrics", headers=headers) as r:
            assert r.status == 200


async def test_the_console_is_never_framed_and_loads_only_its_own_files(
    upstream, start_sidecar, client, data_dir
):
    base = await upstream(echo_app())
    sc = await start_sidecar(f"version: 1\nservices:\n  api: {{upstream: '{base}'}}\n")
    for path, kind in (
        ("/", "text/html"),
        ("/console.js", "text/javascript"),
        ("/console.css", "text/css"),
    ):
        async with client.get(sc.admin + path) as r:
            assert r.status == 200 and r.content_type == kind
            assert r.headers["X-Frame-Options"] == "DENY"
            csp = r.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
            assert "script-src 'self'" in csp and "'unsafe-inline'" not in csp
            text = await r.text()
            # Nothing from elsewhere: no CDN, no font service; works offline.
            assert not ELSEWHERE.search(text), ELSEWHERE.search(text)


async def test_no_secret_in_any_console_page_or_admin_answer(
    upstream, start_sidecar, client, data_dir
):
    sink = Sink()
    alerts = f"""
    alerts:
      receivers:
        ops: {{format: slack, url: "${{env:SLACK_URL}}"{RECEIVER_OK}}}
      rules:
        - {{name: flaky-breaker, kind: breaker_open, send_to: [ops]}}
      evaluate_every: 100ms
    admin:
      token: "${{env:ADMIN_TOKEN}}"
    """
    sink_url = await upstream(sink.app())
    policy = busy_policy(
        echo=await upstream(echo_app()),
        flaky=await upstream(failing_app()),
        llm=await upstream(LLMUpstream().app()),
        sink=sink_url,
        extra=alerts,
    )
    env = {
        "API_TOKEN": CANARY_TOKEN,
        "ADMIN_TOKEN": CANARY_ADMIN,
        "SLACK_URL": sink_url + CANARY_SLACK,
    }
    sc = await start_sidecar(policy, env=env)
    await drive(client, sc.url)
    auth = {"Authorization": f"Bearer {CANARY_ADMIN}"}
    # Wait for the breaker alert's notification to be queued, so its queue shows too.
    for _ in range(100):
        if sc.alert_engine.sent:
            break
        await asyncio.sleep(0.05)
    assert sc.alert_engine.sent
    texts = []
    for method, path, _ in _ROUTES:
        if method != "GET" or "{" in path:
            continue
        async with client.get(sc.admin + path, headers=auth) as r:
            assert r.status == 200, path
            texts.append(await r.text())
    seen = "\n".join(texts)
    assert "flaky-breaker" in seen and "_alerts.ops" in seen  # the alert and its queue show
    for canary in (CANARY_TOKEN, CANARY_ADMIN, CANARY_SLACK, "canary-slack-path", SIGNING):
        assert canary not in seen, canary


@pytest.mark.process
async def test_the_probes_listener_answers_readiness_and_nothing_else(tmp_path, client):
    # As the image and the Kubernetes manifests run it: admin on loopback, probes on all
    # interfaces, and no token anywhere; it starts, and the probes show nothing else.
    (tmp_path / "p.yaml").write_text("version: 1\nservices:\n  api: {upstream: 'http://x'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDECAR_ADMIN_TOKEN")}
    env["SIDECAR_DATA_DIR"] = str(tmp_path / "data")
    async with sidecar_process(tmp_path, "--probes", "0.0.0.0:0", env=env) as proc:
        found = re.search(r"probes on http://0\.0\.0\.0:(\d+)", proc.output)
        assert found, proc.output
        probes = f"http://127.0.0.1:{found.group(1)}"
        async with client.get(f"{probes}/readyz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ready"
        async with client.get(f"{probes}/healthz") as r:
            assert r.status == 200
        for method, path in (
            ("GET", "/"),
            ("GET", "/metrics"),
            ("GET", "/config"),
            ("GET", "/api/console"),
            ("POST", "/reload"),
        ):
            async with client.request(method, probes + path) as r:
                assert r.status == 404, path
        async with client.get(f"{proc.admin}/api/console") as r:
            assert r.status == 200  # the console, on loopback
