"""A sidecar under the traffic the console is for: successes, refusals, a breaker that
opens, a budget that runs out, a dead letter; and /metrics read back as numbers."""

from __future__ import annotations

import base64
import textwrap
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import eventually

SIGNING = "whsec_" + base64.b64encode(b"console-test-signing-key-32bytes").decode()
# Canaries: secrets of the policy that no console page or API answer may show.
CANARY_TOKEN = "canary-upstream-token-5f1d"
CANARY_ADMIN = "canary-admin-token-9c2e"
CANARY_SLACK = "/services/T000/B000/canary-slack-path-77aa"
# The keys every webhook endpoint (ENDPOINT_OK) and alert receiver (RECEIVER_OK) on
# loopback in these tests carries: one place each, so a rule that loopback targets must
# say `allow_private: true` is a one-line edit.
ENDPOINT_OK = ", allow_private: true"
RECEIVER_OK = ", allow_private: true"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@dataclass
class Sink:
    """The outbound webhook endpoint: fails until `healthy`, then records."""

    healthy: bool = False
    received: list[bytes] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if not self.healthy:
                return web.Response(status=500)
            self.received.append(body)
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app


def failing_app() -> web.Application:
    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="upstream broke")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", fail)
    return app


@dataclass
class Gone:
    """A webhook endpoint that answers 410 Gone (the sidecar disables it) until `back`."""

    back: bool = False
    received: list[bytes] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            if not self.back:
                return web.Response(status=410)
            self.received.append(body)
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app


def busy_policy(
    *, echo: str, flaky: str, llm: str, sink: str, extra: str = "", gone: str | None = None
) -> str:
    """`gone`: the URL of an endpoint (Gone) for a second outbound webhook, `later`."""
    later = ""
    if gone is not None:
        later = (
            f'    later:\n      endpoints: [{{name: away, url: "{gone}/x"{ENDPOINT_OK}}}]\n'
            f'      signing: {{secrets: ["{SIGNING}"]}}\n'
        )
    return (
        textwrap.dedent(
            f"""
        version: 1
        services:
          api:
            upstream: {echo}
            auth: {{type: bearer, token: "${{env:API_TOKEN}}"}}
          limited:
            upstream: {echo}
            rate_limit: [{{rate: 1/min, burst: 2}}]
          flaky:
            upstream: {flaky}
            circuit_breaker: {{min_requests: 4, failure_ratio: 0.5, window: 30s, open_for: 60s}}
          llm:
            upstream: {llm}
            llm: {{api: openai}}
            budget: {{tokens: 20/day, per: agent}}
        webhooks:
          outbound:
            events:
              endpoints: [{{name: sink, url: "{sink}/hook"{ENDPOINT_OK}}}]
              signing: {{secrets: ["{SIGNING}"]}}
              retry: {{schedule: [0s, 50ms], jitter: 0}}
        """
        )
        + later
        + textwrap.dedent(extra)
    )


async def drive(client: aiohttp.ClientSession, url: str) -> None:
    """The traffic: each kind of outcome at least once, and a dead letter."""
    secret_headers = {"X-Agent-Id": "alice", "Authorization": f"Bearer {CANARY_TOKEN}-agent"}
    for _ in range(5):
        async with client.get(f"{url}/api/items?key={CANARY_TOKEN}", headers=secret_headers) as r:
            assert r.status == 200
    for _ in range(4):  # burst 2, then rate_limited
        async with client.get(f"{url}/limited/x", headers={"X-Agent-Id": "bob"}) as r:
            await r.read()
    for _ in range(6):  # 4 failures open the breaker, then circuit_open
        async with client.get(
            f"{url}/flaky/x", headers={"X-Agent-Id": "bob", "traceparent": TRACEPARENT}
        ) as r:
            await r.read()
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    for _ in range(3):  # 17 tokens each, 20 a day: the third is budget_exhausted
        async with client.post(
            f"{url}/llm/v1/chat/completions", json=chat, headers={"X-Agent-Id": "alice"}
        ) as r:
            await r.read()
    async with client.get(f"{url}/nowhere") as r:
        assert r.status == 404
    async with client.post(f"{url}/_webhooks/events", json={"type": "order.paid"}) as r:
        assert r.status == 202


async def dead_letter(client: aiohttp.ClientSession, admin: str) -> str:
    """Wait for the event to be dead; its message id."""
    found: list[str] = []

    async def dead() -> bool:
        async with client.get(f"{admin}/api/console") as r:
            doc = await r.json()
        letters = (doc["webhooks"] or {}).get("dead_letters") or []
        found[:] = [d["message_id"] for d in letters]
        return bool(found)

    await eventually(dead, "the outbound event to be a dead letter", 15)
    return found[0]


async def scrape(
    client: aiohttp.ClientSession, admin: str
) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of /metrics: (name, labels) -> value."""
    async with client.get(f"{admin}/metrics") as r:
        text = await r.text()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[sample.name, frozenset(sample.labels.items())] = sample.value
    return out


def total(
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str
) -> float:
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)
