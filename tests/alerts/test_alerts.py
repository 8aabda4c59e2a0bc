"""Alert rules through a real sidecar: a breaker opening reaches a Slack receiver once,
then resolved once; Alertmanager's for/repeat; each rule kind; PagerDuty and Standard
Webhooks bodies; the ALERTS-style gauge; and the policy errors with FILE:LINE:COL."""

from __future__ import annotations

import asyncio
import json
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web
from standardwebhooks import Webhook

from sidecar.telemetry.pools import PoolSnapshot
from tests.console.traffic import ENDPOINT_OK, RECEIVER_OK, SIGNING, scrape
from tests.helpers import eventually


@dataclass
class Receiver:
    """An alert receiver on loopback: answers `status`, records what it was sent."""

    status: int = 200
    bodies: list[dict] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    attempts: int = 0  # every request, refused ones too

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            self.attempts += 1
            if self.status >= 300:
                return web.Response(status=self.status)
            self.raw.append(body)
            self.bodies.append(json.loads(body))
            self.headers.append(dict(request.headers))
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app


@dataclass
class Flaky:
    """An upstream that fails until `healthy`."""

    healthy: bool = False

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            return web.Response(status=200 if self.healthy else 500)

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def receiver_yaml(name: str, url: str, fmt: str = "slack", more: str = "") -> str:
    return f'{name}: {{format: {fmt}, url: "{url}"{more}{RECEIVER_OK}}}'


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(path))
    return path


def breaker_policy(flaky: str, receivers: str, rules: str, every: str = "50ms") -> str:
    return f"""
version: 1
services:
  pay:
    upstream: {flaky}
    circuit_breaker: {{min_requests: 2, failure_ratio: 0.5, window: 30s, open_for: 300ms}}
alerts:
  evaluate_every: {every}
  receivers:
{textwrap.indent(receivers, "    ")}
  rules:
{textwrap.indent(rules, "    ")}
"""


async def settle(sc, rounds: int = 5) -> None:
    """Let the engine evaluate `rounds` more times (no sleeping on a guess)."""
    engine = sc.alert_engine
    start = engine.evaluations
    await eventually(lambda: engine.evaluations >= start + rounds, "alert evaluations", 10)


async def test_a_breaker_opening_reaches_slack_once_then_resolved_once(
    upstream, start_sidecar, client, data_dir
):
    flaky, slack = Flaky(), Receiver()
    sc = await start_sidecar(
        breaker_policy(
            await upstream(flaky.app()),
            receiver_yaml("ops", f"{await upstream(slack.app())}/services/T/B/x"),
            "- {name: pay-breaker, kind: breaker_open, severity: critical, repeat: 1h, "
            "send_to: [ops]}",
        )
    )
    for _ in range(2):
        async with client.get(f"{sc.url}/pay/charge") as r:
            assert r.status == 500
    await eventually(lambda: len(slack.bodies) >= 1, "the firing message", 10)
    await settle(sc)
    assert len(slack.bodies) == 1  # held open for many evaluations: still one message
    [firing] = slack.bodies
    assert set(firing) == {"text"}
    assert "FIRING" in firing["text"] and "*pay-breaker*" in firing["text"]
    assert "(pay)" in firing["text"] and "circuit breaker of service pay is open" in firing["text"]
    samples = await scrape(client, sc.admin)
    key = frozenset(
        {
            "alertname": "pay-breaker",
            "alertstate": "firing",
            "service": "pay",
            "severity": "critical",
        }.items()
    )
    assert samples["sidecar_alerts", key] == 1.0
    breaker = "sidecar_circuit_breaker_state"
    assert samples[breaker, frozenset({"service": "pay", "state": "open"}.items())] == 1.0
    assert samples[breaker, frozenset({"service": "pay", "state": "closed"}.items())] == 0.0
    async with client.get(f"{sc.admin}/api/console") as r:
        [shown] = (await r.json())["alerts"]
    assert (shown["alertname"], shown["state"], shown["subject"]) == (
        "pay-breaker",
        "firing",
        "pay",
    )

    flaky.healthy = True

    async def closed() -> bool:
        # After open_for the next call is the half-open probe; its success closes the breaker.
        async with client.get(f"{sc.url}/pay/charge") as r:
            return r.status == 200

    await eventually(closed, "the breaker to let a probe through", 10, every=0.1)
    await eventually(lambda: len(slack.bodies) >= 2, "the resolved message", 10)
    await settle(sc)
    assert len(slack.bodies) == 2
    assert "RESOLVED" in slack.bodies[1]["text"] and "*pay-breaker*" in slack.bodies[1]["text"]
    samples = await scrape(client, sc.admin)
    assert not [k for k in samples if k[0] == "sidecar_alerts"]
    assert samples[breaker, frozenset({"service": "pay", "state": "closed"}.items())] == 1.0


async def test_for_keeps_an_alert_pending_and_repeat_sends_it_again(
    upstream, start_sidecar, client, data_dir
):
    flaky, slack = Flaky(), Receiver()
    sc = await start_sidecar(
        breaker_policy(
            await upstream(flaky.app()),
            receiver_yaml("ops", await upstream(slack.app())),
            "- {name: pay-breaker, kind: breaker_open, for: 10m, repeat: 30m, send_to: [ops]}",
            every="1h",  # evaluated by hand below, on a clock the test moves
        )
    )
    engine = sc.alert_engine
    now = [1_000_000.0]
    engine._clock = lambda: now[0]
    # The breaker's own clock is real: keep it open (open_for far away) while we move ours.
    for _ in range(2):
        async with client.get(f"{sc.url}/pay/x") as r:
            assert r.status == 500
    breaker = sc.sidecar.state.find("pay", "breaker")[0]
    breaker.open_for = 3600.0

    async def at(minute: float) -> list[str]:
        now[0] = 1_000_000.0 + minute * 60
        await engine.evaluate()
        await sc.sidecar.webhooks._worker.run_once()
        return [a.state for a in engine.active()]

    assert await at(0) == ["pending"]
    assert await at(9) == ["pending"] and slack.bodies == []
    assert await at(10) == ["firing"]
    await eventually(lambda: len(slack.bodies) == 1, "the firing message")
    assert await at(39) == ["firing"]
    await asyncio.sleep(0.1)
    assert len(slack.bodies) == 1  # 29 minutes after: not yet repeated
    assert await at(41) == ["firing"]
    await eventually(lambda: len(slack.bodies) == 2, "the repeated message")
    assert all("FIRING" in b["text"] for b in slack.bodies)


async def test_a_condition_gone_before_for_sends_nothing(upstream, start_sidecar, client, data_dir):
    flaky, slack = Flaky(), Receiver()
    sc = await start_sidecar(
        breaker_policy(
            await upstream(flaky.app()),
            receiver_yaml("ops", await upstream(slack.app())),
            "- {name: pay-breaker, kind: breaker_open, for: 1h, send_to: [ops]}",
        )
    )
    for _ in range(2):
        async with client.get(f"{sc.url}/pay/x") as r:
            assert r.status == 500
    await eventually(lambda: [a.state for a in sc.alert_engine.active()] == ["pending"], "pending")
    flaky.healthy = True

    async def closed() -> bool:
        async with client.get(f"{sc.url}/pay/x") as r:
            return r.status == 200

    await eventually(closed, "the breaker to close", 10, every=0.1)
    await eventually(lambda: not sc.alert_engine.active(), "the alert to be dropped")
    await settle(sc)
    assert slack.bodies == [] and sc.alert_engine.sent == 0


async def test_each_rule_kind_fires_on_its_condition(upstream, start_sidecar, client, data_dir):
    from tests.console.traffic import Sink
    from tests.steps.llm_upstream import LLMUpstream

    flaky, slack, sink, gone = Flaky(), Receiver(), Sink(), Receiver(status=410)
    slow = web.Application()

    async def sleepy(request: web.Request) -> web.Response:
        await asyncio.sleep(0.06)
        return web.Response(text="late")

    slow.router.add_get("/{tail:.*}", sleepy)
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          pay: {{upstream: {await upstream(flaky.app())}}}
          slow: {{upstream: {await upstream(slow)}}}
          llm:
            upstream: {await upstream(LLMUpstream().app())}
            llm: {{api: openai}}
            budget: {{tokens: 20/day, per: agent}}
        webhooks:
          outbound:
            events:
              endpoints: [{{name: sink, url: "{await upstream(sink.app())}/x"{ENDPOINT_OK}}}]
              signing: {{secrets: ["{SIGNING}"]}}
              retry: {{schedule: [0s, 20ms], jitter: 0}}
            later:  # its endpoint answers 410: disabled, its delivery waits in the queue
              endpoints: [{{name: away, url: "{await upstream(gone.app())}/x"{ENDPOINT_OK}}}]
              signing: {{secrets: ["{SIGNING}"]}}
        alerts:
          evaluate_every: 50ms
          receivers:
            {receiver_yaml("ops", await upstream(slack.app()))}
          rules:
            - {{name: errors, kind: error_ratio, ratio: 0.5, window: 1m, min_calls: 3,
                services: [pay], send_to: [ops]}}
            - {{name: slow, kind: p99, latency: 50ms, min_calls: 2, services: [slow],
                send_to: [ops]}}
            - {{name: budget, kind: budget_used, percent: 80, send_to: [ops]}}
            - {{name: dead, kind: dead_letters, send_to: [ops]}}
            - {{name: stuck, kind: queue_age, age: 100ms, services: ["later/*"], send_to: [ops]}}
            - {{name: pools, kind: pool_saturated, percent: 90, send_to: [ops]}}
            - {{name: reload, kind: reload_failed, send_to: [ops]}}
        """
    )
    for _ in range(3):
        async with client.get(f"{sc.url}/pay/x") as r:
            assert r.status == 500
        async with client.get(f"{sc.url}/slow/x") as r:
            assert r.status == 200
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    async with client.post(
        f"{sc.url}/llm/v1/chat/completions", json=chat, headers={"X-Agent-Id": "ann"}
    ) as r:
        assert r.status == 200  # 17 of 20 tokens: 85%
    for name in ("events", "later"):
        async with client.post(f"{sc.url}/_webhooks/{name}", json={"type": "t"}) as r:
            assert r.status == 202
    sc.sidecar.telemetry.pools.register(lambda: [PoolSnapshot("postgres", "orders", 8, 8, 8, 2)])
    sc.write("policy.yaml", "version: 1\nservices: {bad: {upstream: ftp://x}}\n")
    assert not (await sc.sidecar.reload("test")).ok

    def fired() -> dict[str, str]:
        return {b["text"].split("*")[1]: b["text"] for b in slack.bodies if "FIRING" in b["text"]}

    names = {"errors", "slow", "budget", "dead", "stuck", "pools", "reload"}
    await eventually(lambda: set(fired()) == names, f"all of {names} to fire", 15)
    texts = fired()
    assert "100% of the calls to service pay failed" in texts["errors"]
    assert "p99 latency of service slow" in texts["slow"]
    assert "for agent ann is 85% used; it resets at" in texts["budget"]
    assert "1 dead deliveries to webhook endpoint events/sink" in texts["dead"]
    assert "the oldest pending delivery to later/away is" in texts["stuck"]
    assert "postgres pool orders has 8 of 8 connections in use, 2 callers waiting" in texts["pools"]
    assert "policy.yaml:2:" in texts["reload"]  # FILE:LINE:COL of what broke it


async def test_pagerduty_and_standard_webhooks_bodies(upstream, start_sidecar, client, data_dir):
    flaky, pd, std = Flaky(), Receiver(), Receiver()
    receivers = "\n".join(
        [
            receiver_yaml(
                "pager",
                f"{await upstream(pd.app())}/v2/enqueue",
                "pagerduty",
                ', routing_key: "R0UT1NG"',
            ),
            receiver_yaml(
                "hooks",
                await upstream(std.app()),
                "standard",
                f', signing: {{secrets: ["{SIGNING}"]}}',
            ),
        ]
    )
    sc = await start_sidecar(
        breaker_policy(
            await upstream(flaky.app()),
            receivers,
            "- {name: pay-breaker, kind: breaker_open, send_to: [pager, hooks]}",
        )
    )
    for _ in range(2):
        async with client.get(f"{sc.url}/pay/x") as r:
            assert r.status == 500
    await eventually(lambda: pd.bodies and std.bodies, "both receivers to be sent the alert")
    trigger = pd.bodies[0]
    assert trigger["routing_key"] == "R0UT1NG" and trigger["event_action"] == "trigger"
    assert trigger["dedup_key"] == "agent-sidecar/pay-breaker/pay"
    assert trigger["payload"]["severity"] == "warning" and trigger["payload"]["source"] == "pay"
    assert "circuit breaker of service pay is open" in trigger["payload"]["summary"]
    # Signed per Standard Webhooks: the reference library verifies it.
    verified = Webhook(SIGNING).verify(std.raw[0], std.headers[0])
    assert verified["type"] == "alert.firing"
    assert verified["data"]["alertname"] == "pay-breaker" and verified["data"]["subject"] == "pay"

    flaky.healthy = True

    async def closed() -> bool:
        async with client.get(f"{sc.url}/pay/x") as r:
            return r.status == 200

    await eventually(closed, "the breaker to close", 10, every=0.1)
    await eventually(lambda: len(pd.bodies) == 2 and len(std.bodies) == 2, "the resolves")
    resolve = pd.bodies[1]
    assert resolve["event_action"] == "resolve" and resolve["dedup_key"] == trigger["dedup_key"]
    assert Webhook(SIGNING).verify(std.raw[1], std.headers[1])["type"] == "alert.resolved"


def test_alert_policy_errors_name_file_line_and_column(tmp_path):
    from sidecar.policy.loader import PolicyError, load_policy

    (tmp_path / "p.yaml").write_text(
        textwrap.dedent(
            """\
            version: 1
            services: {a: {upstream: "http://x"}}
            alerts:
              receivers:
                ops: {format: pagerduty, url: "https://events.pagerduty.com/v2/enqueue"}
              rules:
                - {name: e, kind: error_ratio, latency: 2s, send_to: [ops]}
                - {name: b, kind: breaker_open, send_to: [nobody], fro: 1m}
            """
        )
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(str(tmp_path))
    f = tmp_path / "p.yaml"
    assert [str(p) for p in caught.value.problems] == [
        f"{f}:5:10: format: pagerduty needs routing_key",
        f"{f}:7:7: latency: not read by kind error_ratio",
        f"{f}:8:56: unknown key 'fro' (did you mean 'for'?)",
    ]


def test_a_receiver_on_a_private_address_needs_allow_private(tmp_path):
    """Alert receivers are outbound endpoints too: not public, not without a say-so."""
    from sidecar.policy.loader import PolicyError, load_policy

    def load(extra: str) -> None:
        (tmp_path / "policy.yaml").write_text(
            "version: 1\n"
            "alerts:\n"
            "  receivers:\n"
            f'    ops: {{format: slack, url: "http://169.254.169.254/hook"{extra}}}\n'
            "  rules:\n"
            "    - {name: b, kind: breaker_open, send_to: [ops]}\n"
        )
        load_policy(str(tmp_path))

    with pytest.raises(PolicyError) as refused:
        load("")
    assert "policy.yaml:4:" in str(refused.value)
    assert "allow_private" in str(refused.value)
    load(", allow_private: true")


async def test_only_a_composed_sidecar_has_the_alert_rules(upstream, client, tmp_path, data_dir):
    """The runtime alone (as `sidecar check` builds it) loads and checks a policy with alert
    rules, and evaluates none (its console shows no alerts); app.py's compose() gives a
    sidecar the rules, which its reloads configure."""
    from sidecar.alerts.engine import AlertEngine, engine_of
    from sidecar.app import compose
    from sidecar.check import run_checks
    from sidecar.console.api import document
    from sidecar.runtime import Sidecar

    flaky, slack = Flaky(healthy=True), Receiver()
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "p.yaml").write_text(
        breaker_policy(
            await upstream(flaky.app()),
            receiver_yaml("ops", f"{await upstream(slack.app())}/services/T/B/x"),
            "- {name: pay-breaker, kind: breaker_open, send_to: [ops]}",
        )
    )
    results, errors = await run_checks(str(policies), [])
    assert errors == [] and [(r.service, r.ok) for r in results] == [("pay", True)]

    bare = Sidecar(str(policies), env={})
    composed = compose(Sidecar(str(policies), env={}, data_dir=str(tmp_path / "other")))
    try:
        assert (await bare.reload("startup")).ok
        assert engine_of(bare) is None
        assert (await document(bare))["alerts"] == []
        assert (await composed.reload("startup")).ok
        engine = engine_of(composed)
        assert isinstance(engine, AlertEngine) and composed.monitors == [engine]
        assert engine.alerts is not None
        assert [r.name for r in engine.alerts.rules] == ["pay-breaker"]
    finally:
        await bare.close()
        await composed.close()
