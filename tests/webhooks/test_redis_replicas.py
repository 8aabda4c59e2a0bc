"""Two real `sidecar run` processes on one Redis queue: one is killed with
SIGKILL while it holds deliveries in flight, the other delivers them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import signal
import textwrap
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from redis.asyncio import Redis

from tests.helpers import eventually, sidecar_process
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401

pytestmark = pytest.mark.process

SECRET = "gh-secret"
_INGRESS = re.compile(r"ingress \(inbound webhooks\) on (http://\S+?:\d+)")


class Gate:
    """A target that holds every request until opened, then answers 200 and counts."""

    def __init__(self) -> None:
        self.open = asyncio.Event()
        self.waiting = 0
        self.delivered: set[str] = set()

    def app(self) -> web.Application:
        async def events(request: web.Request) -> web.Response:
            self.waiting += 1
            try:
                await self.open.wait()
            finally:
                self.waiting -= 1
            self.delivered.add(request.headers["X-Sidecar-Message-Id"])
            return web.Response()

        app = web.Application()
        app.router.add_post("/events", events)
        return app


def github_headers(body: bytes, delivery: str) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {"X-Hub-Signature-256": f"sha256={digest}", "X-GitHub-Delivery": delivery}


async def test_a_killed_replicas_deliveries_are_made_by_the_other(
    upstream, tmp_path: Path, redis_server: RedisServer
) -> None:
    gate = Gate()
    target = await upstream(gate.app()) + "/events"
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        textwrap.dedent(
            f"""
            version: 1
            webhooks:
              store: {{backend: "{redis_server.url}", claim_idle: 1s}}
              inbound:
                github:
                  path: /hooks/github
                  verify: {{type: github, secrets: ["{SECRET}"]}}
                  retry: {{schedule: [0s, 100ms, 100ms, 100ms, 100ms], jitter: 0}}
                  routes:
                    - deliver_to: ["{target}"]
            """
        )
    )

    def args(name: str) -> tuple[str, ...]:
        return ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / name))

    redis = Redis.from_url(redis_server.url)
    accepted: set[str] = set()
    try:
        async with (
            sidecar_process(policies, *args("a")) as a,
            sidecar_process(policies, *args("b")) as b,
            aiohttp.ClientSession() as client,
        ):
            found = _INGRESS.search(a.output)
            assert found
            for n in range(20):
                body = json.dumps({"n": n}).encode()
                async with client.post(
                    f"{found.group(1)}/hooks/github",
                    data=body,
                    headers=github_headers(body, f"{n}"),
                ) as r:
                    assert r.status == 200
                    accepted.add((await r.json())["id"])

            async def a_holds_some() -> bool:
                summary = await redis.xpending("sidecar:webhooks:due", "deliverers")
                held = {c["name"].decode(): c["pending"] for c in summary["consumers"]}
                return any(f"-{a.proc.pid}-" in name and n > 0 for name, n in held.items())

            await eventually(a_holds_some, "replica A to hold deliveries in flight")
            a.proc.send_signal(signal.SIGKILL)
            await a.proc.wait()
            gate.open.set()
            await eventually(
                lambda: accepted <= gate.delivered,
                "every accepted event delivered by replica B",
                30,
            )
            assert b.proc.returncode is None
            assert "taken over from a stopped replica" in b.output
    finally:
        await redis.aclose()
