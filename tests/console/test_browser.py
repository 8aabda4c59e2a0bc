"""The console in headless Chromium (DevTools protocol), against a real sidecar under
traffic: what a person sees matches /metrics, the open breaker shows open, the problem
filter filters, the replay button replays. Screenshots of a busy and an idle console go
to docs/ when SIDECAR_SCREENSHOTS=1 (else to the test's temp directory)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import echo_app
from tests.console.cdp import chromium
from tests.console.test_api import busy as busy_sidecar
from tests.console.traffic import Gone, dead_letter, scrape, total
from tests.helpers import ROOT, eventually

ROWS = """[...document.querySelectorAll('#services tbody tr')].map(tr => ({
  name: tr.dataset.service,
  calls: tr.querySelector('[data-field=calls]').innerText,
  success: tr.querySelector('[data-field=success_rate]').innerText,
  refusals: tr.querySelector('[data-field=refusals]').innerText,
  upstream: tr.querySelector('[data-field=upstream_errors]').innerText,
  breaker: tr.querySelector('[data-field=breaker]').innerText,
  breakerColour: getComputedStyle(tr.querySelector('[data-field=breaker]')).color,
}))"""


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "data"
    monkeypatch.setenv("SIDECAR_DATA_DIR", str(path))
    return path


def shots(tmp_path: Path) -> Path:
    return ROOT / "docs" if os.environ.get("SIDECAR_SCREENSHOTS") == "1" else tmp_path


async def test_the_console_shows_what_metrics_count_and_its_replay_button_replays(
    upstream, start_sidecar, client, data_dir, tmp_path
):
    away = Gone()
    sc, sink = await busy_sidecar(upstream, start_sidecar, client, alerts=True, gone=away)
    async with client.post(f"{sc.url}/_webhooks/later", json={"type": "t"}) as r:
        assert r.status == 202  # its endpoint answers 410: disabled, the event waits
    message_id = await dead_letter(client, sc.admin)
    # Some history for the sparklines: the 10-s readings, taken now rather than waited for.
    for round in range(6):
        sc.sidecar.samples.take()
        for _ in range(round * 3):
            async with client.get(f"{sc.url}/api/more") as r:
                assert r.status == 200
    sc.sidecar.samples.take()
    metrics = await scrape(client, sc.admin)
    count = "sidecar_request_duration_seconds_count"
    async with chromium(tmp_path / "profile") as page:
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=1400,
            height=1000,
            deviceScaleFactor=1,
            mobile=False,
        )
        await page.open(f"{sc.admin}/")
        rows = {r["name"]: r for r in await page.eval(ROWS)}
        assert set(rows) == {"api", "limited", "flaky", "llm", "(no service)"}
        for name, row in rows.items():
            service = "" if name == "(no service)" else name
            assert int(row["calls"]) == total(metrics, count, service=service), name
        # Refusals as a person reads them: "reason count" tags, next to the upstream's own.
        limited = total(metrics, count, service="limited", reason="rate_limited")
        assert rows["limited"]["refusals"] == f"rate_limited {limited:.0f}" == "rate_limited 2"
        assert rows["flaky"]["refusals"] == "circuit_open 2"
        assert rows["flaky"]["upstream"] == "500 4"
        assert rows["llm"]["refusals"] == "budget_exhausted 1"
        assert rows["api"]["success"] == "100%"
        assert await page.eval("document.querySelectorAll('#services svg.spark polyline').length")
        # The open breaker reads "open", in the alarm colour; a service without one says so.
        assert rows["flaky"]["breaker"].startswith("open (")
        assert rows["flaky"]["breakerColour"] != rows["api"]["breakerColour"]
        assert rows["api"]["breaker"] == "none"
        # ...and its alert fires at the top of the page.
        await eventually(lambda: sc.alert_engine.sent, "the breaker alert to fire")
        await page.next_draw()
        alerts = await page.eval(
            "[...document.querySelectorAll('#alerts li.firing')].map(li => li.innerText)"
        )
        assert len(alerts) == 1 and alerts[0].startswith("FIRING flaky-breaker [critical]")
        assert "the circuit breaker of service flaky is open" in alerts[0]
        # The agents: calls and refusals per agent, and the budget that ran out.
        agents = await page.eval(
            "[...document.querySelectorAll('#agents tbody tr')].map(tr => tr.innerText)"
        )
        alice = next(a for a in agents if a.startswith("alice"))
        assert "alice\t8\t1\t" in alice and "170% of tokens 20/day per agent (llm)" in alice

        # The problem filter: typing a reason leaves only its rows.
        await page.click("#problem-filter")
        await page.send("Input.insertText", text="circuit_open")
        reasons = await page.eval(
            "[...document.querySelectorAll('#problems tbody tr')].map(tr => tr.dataset.reason)"
        )
        assert reasons == ["circuit_open", "circuit_open"]
        await page.eval("document.getElementById('problem-filter').value = ''")
        await page.next_draw()

        await page.screenshot(shots(tmp_path) / "console-busy.png", width=1400)
        assert page.console_errors == []

        # Replay: the endpoint is healthy again; the person clicks the dead letter's button.
        sink.healthy = True
        selector = f'#dead-letters tr[data-message="{message_id}"] button.replay'
        assert await page.eval(f"document.querySelector({selector!r}).innerText") == "replay"
        await page.click(selector)
        await eventually(lambda: sink.received, "the replayed event to reach the endpoint")
        assert b"order.paid" in sink.received[0]

        async def gone() -> bool:
            await page.next_draw()
            dead = await page.eval(
                'document.querySelector(\'#webhooks tr[data-endpoint="events/sink"] '
                "[data-field=dead]').innerText"
            )
            return dead == "0" and not await page.eval(f"document.querySelector({selector!r})")

        await eventually(gone, "the dead letter to leave the console", 15)

        # Enable: the endpoint a 410 disabled shows a button; clicking it enables it.
        endpoint = '#webhooks tr[data-endpoint="later/away"]'
        await eventually(
            lambda: page.eval(f"!!document.querySelector('{endpoint} button')"),
            "the enable button of the disabled endpoint",
        )
        assert await page.eval(f"document.querySelector('{endpoint} button').innerText") == "enable"
        away.back = True
        await page.click(f"{endpoint} button")

        async def enabled() -> bool:
            await page.next_draw()
            text = await page.eval(f"document.querySelector('{endpoint}').innerText")
            return "enabled" in text

        await eventually(enabled, "the endpoint to show enabled", 15)
        await eventually(lambda: away.received, "the waiting event to be delivered")

        # A broken policy: the banner says where, and that the last good one serves.
        version = await page.eval("document.getElementById('policy-version').innerText")
        sc.write("policy.yaml", "version: 1\nservices:\n  api: {upstream: ftp://x}\n")
        assert not (await sc.sidecar.reload("test")).ok
        await page.next_draw()
        banner = await page.eval("document.getElementById('reload-error').innerText")
        assert banner.startswith("The last reload failed; the last good policy keeps serving.")
        assert f"{sc.policies / 'policy.yaml'}:3:" in banner
        assert await page.eval("document.getElementById('policy-version').innerText") == version
        assert page.console_errors == []


async def test_an_idle_console_on_a_phone_in_dark_mode(
    upstream, start_sidecar, client, data_dir, tmp_path
):
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          github: {{upstream: '{base}'}}
          openai:
            upstream: '{base}'
            circuit_breaker: {{}}
        """
    )
    async with chromium(tmp_path / "profile") as page:
        await page.send(
            "Emulation.setDeviceMetricsOverride",
            width=390,
            height=844,
            deviceScaleFactor=1,
            mobile=True,
        )
        await page.open(f"{sc.admin}/")
        text = await page.eval("document.body.innerText")
        assert "no problems" in text and "none firing" in text
        rows = {r["name"]: r for r in await page.eval(ROWS)}
        assert rows["openai"]["breaker"] == "closed" and rows["github"]["calls"] == "0"
        # Nothing wider than the phone but the tables, which scroll inside their sections.
        overflow = await page.eval("document.documentElement.scrollWidth")
        assert overflow <= 390
        await page.screenshot(shots(tmp_path) / "console-idle.png", width=390, dark=True)
        background = await page.eval("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(15, 17, 21)"  # the dark palette
        assert page.console_errors == []
