"""deploy/: the Prometheus alerting rules pass `promtool check rules`, and every metric and
label they and the Grafana dashboard use is in a live sidecar's /metrics."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import echo_app
from tests.console.traffic import (
    ENDPOINT_OK,
    RECEIVER_OK,
    SIGNING,
    Sink,
    busy_policy,
    dead_letter,
    drive,
    failing_app,
    scrape,
)
from tests.helpers import ROOT, eventually
from tests.steps.llm_upstream import LLMUpstream

RULES = ROOT / "deploy" / "prometheus" / "sidecar-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "agent-sidecar.json"
# Labels Prometheus adds to every series it scrapes: never in /metrics itself.
TARGET_LABELS = {"job", "instance"}


def test_promtool_checks_the_alerting_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make system-deps` installs Debian's prometheus"
    done = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 9 rules found" in done.stdout


def expressions() -> list[str]:
    rules = yaml.safe_load(RULES.read_text())
    out = [r["expr"] for group in rules["groups"] for r in group["rules"]]
    dashboard = json.loads(DASHBOARD.read_text())
    out += [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    out += [a["expr"] for a in dashboard["annotations"]["list"]]
    out += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    return out


def used(expr: str) -> tuple[set[str], set[str]]:
    """The metric names and label names a PromQL expression uses."""
    metrics = set(re.findall(r"\bsidecar_[a-z0-9_]+\b", expr))
    labels = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)\s*\"", expr))
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {name.strip() for name in group.split(",") if name.strip()}
    for call in re.findall(r"label_values\(\s*\w+\s*,\s*(\w+)\s*\)", expr):
        labels.add(call)
    return metrics, labels - TARGET_LABELS


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(path))
    return path


async def test_every_metric_and_label_of_deploy_is_exported(
    upstream, start_sidecar, client, data_dir
):
    echo = await upstream(echo_app())
    gone = web_gone()
    alerts = f"""
    alerts:
      evaluate_every: 50ms
      receivers:
        ops: {{format: slack, url: "{echo}/slack"{RECEIVER_OK}}}
      rules:
        - {{name: flaky-breaker, kind: breaker_open, send_to: [ops]}}
    """
    policy = busy_policy(
        echo=echo,
        flaky=await upstream(failing_app()),
        llm=await upstream(LLMUpstream().app()),
        sink=await upstream(Sink().app()),
        extra=alerts,
    )
    # A cached service, and an endpoint that answers 410 (its delivery waits: a pending age).
    policy = policy.replace(
        "services:\n",
        f"services:\n  cached:\n    upstream: {echo}\n    cache: {{}}\n",
        1,
    )
    policy = policy.replace(
        "  outbound:\n",
        f'  outbound:\n    away:\n      endpoints: [{{name: gone, url: "{await upstream(gone)}/x"'
        f'{ENDPOINT_OK}}}]\n      signing: {{secrets: ["{SIGNING}"]}}\n',
        1,
    )
    sc = await start_sidecar(policy, env={"API_TOKEN": "t"})
    await drive(client, sc.url)
    for _ in range(2):
        async with client.get(f"{sc.url}/cached/x") as r:
            assert r.status == 200
    async with client.post(f"{sc.url}/_webhooks/away", json={"type": "t"}) as r:
        assert r.status == 202
    await dead_letter(client, sc.admin)
    await eventually(lambda: sc.alert_engine.sent, "the breaker alert to fire")
    sc.write("policy.yaml", "version: 1\nservices: {x: {upstream: ftp://x}}\n")
    assert not (await sc.sidecar.reload("test")).ok

    samples = await scrape(client, sc.admin)
    labels_of: dict[str, set[str]] = {}
    for name, labels in samples:
        labels_of.setdefault(name, set()).update(k for k, _ in labels)
    missing = []
    for expr in expressions():
        metrics, labels = used(expr)
        assert metrics, expr
        for metric in metrics:
            if metric not in labels_of:
                missing.append(f"metric {metric} (in {expr!r})")
        have = set().union(*(labels_of.get(m, set()) for m in metrics))
        for label in labels - have:
            missing.append(f"label {label} of {sorted(metrics)} (in {expr!r})")
    assert missing == []


def web_gone():
    from aiohttp import web

    async def handle(request: web.Request) -> web.Response:
        return web.Response(status=410)

    app = web.Application()
    app.router.add_post("/{tail:.*}", handle)
    return app
