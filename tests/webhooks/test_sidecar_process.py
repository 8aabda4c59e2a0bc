"""Webhooks through the real `sidecar run`: the ingress listener, the egress
`/_webhooks/<name>` endpoint, and nothing acknowledged lost across `kill -9`."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import re
import signal
import textwrap
from collections import Counter
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import eventually, sidecar_process
from tests.redis_server import redis_server_fixture  # noqa: F401

pytestmark = pytest.mark.process

SECRET = "It's a Secret to Everybody"
WHSEC = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"  # any base64 key


class Receiver:
    """A local target that fails every message's first attempt, then counts it."""

    def __init__(self) -> None:
        self.seen: Counter[str] = Counter()
        self.tried: set[str] = set()
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        async def events(request: web.Request) -> web.Response:
            body = await request.read()
            key = request.headers.get("X-Sidecar-Message-Id") or request.headers["webhook-id"]
            event = json.loads(body)["n"]
            if key not in self.tried:
                self.tried.add(key)
                return web.Response(status=500)
            self.seen[str(event)] += 1
            self.headers.append(dict(request.headers))
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/events", events)
        return app


def policy(dir: Path, target: str, store: str = "") -> Path:
    dir.mkdir()
    (dir / "policy.yaml").write_text(
        textwrap.dedent(
            f"""
            version: 1
            webhooks:
              {store}
              inbound:
                github:
                  path: /hooks/github
                  verify: {{type: github, secrets: ["{SECRET}"]}}
                  retry: {{schedule: [0s, 50ms, 50ms, 50ms], jitter: 0}}
                  routes:
                    - deliver_to: ["{target}"]
              outbound:
                events:
                  signing: {{secrets: ["{WHSEC}"]}}
                  retry: {{schedule: [0s, 50ms, 50ms, 50ms], jitter: 0}}
                  endpoints:
                    - {{name: receiver, url: "{target}", allow_private: true}}
            """
        )
    )
    return dir


def github_headers(body: bytes, delivery: str) -> dict[str, str]:
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={digest}",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": "push",
        "Content-Type": "application/json",
    }


_INGRESS = re.compile(r"ingress \(inbound webhooks\) on (http://\S+?:\d+)")


async def test_inbound_and_outbound_through_the_real_process(upstream, tmp_path: Path) -> None:
    receiver = Receiver()
    target = await upstream(receiver.app()) + "/events"
    policies = policy(tmp_path / "policies", target)
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"))
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        found = _INGRESS.search(sidecar.output)
        assert found, sidecar.output
        ingress = found.group(1)
        body = json.dumps({"n": "in-1"}).encode()
        async with client.post(
            f"{ingress}/hooks/github", data=body, headers=github_headers(body, "d-1")
        ) as r:
            assert r.status == 200, await r.text()
        # Redelivered by GitHub: acknowledged, not delivered twice.
        async with client.post(
            f"{ingress}/hooks/github", data=body, headers=github_headers(body, "d-1")
        ) as r:
            assert r.status == 200
        async with client.post(
            f"{ingress}/hooks/github", data=body, headers={"X-Hub-Signature-256": "sha256=00"}
        ) as r:
            assert r.status == 401
            assert r.headers["X-Sidecar-Error"] == "unauthenticated"
        # The ingress listener proxies nothing else.
        async with client.get(f"{ingress}/admin") as r:
            assert r.status == 404
        async with client.post(
            f"{sidecar.url}/_webhooks/events", json={"n": "out-1", "type": "invoice.paid"}
        ) as r:
            assert r.status == 202
            message_id = (await r.json())["id"]
        await eventually(
            lambda: receiver.seen["in-1"] == 1 and receiver.seen["out-1"] == 1,
            "both events delivered after a failed first attempt",
        )
        outbound = next(h for h in receiver.headers if "webhook-signature" in h)
        assert outbound["webhook-id"] == message_id
        # The admin port: every attempt of the message, per-endpoint counts, a manual retry.
        async with client.get(f"{sidecar.admin}/webhooks/messages/{message_id}") as r:
            view = await r.json()
        [delivery] = view["deliveries"]
        assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]
        assert delivery["url"] == target.removesuffix("/events")  # origin only
        async with client.get(f"{sidecar.admin}/webhooks") as r:
            stats = {(e["direction"], e["endpoint"]): e for e in (await r.json())["endpoints"]}
        assert stats[("outbound", "receiver")]["successes"] == 1
        assert stats[("inbound", target)]["failures"] == 1
        # Retry requeues dead or pending deliveries only: a delivered one is not sent again.
        async with client.post(f"{sidecar.admin}/webhooks/messages/{message_id}/retry") as r:
            assert (await r.json()) == {"retried_deliveries": 0}
        async with client.get(f"{sidecar.admin}/webhooks/messages/nope") as r:
            assert r.status == 404
    assert SECRET not in sidecar.output and WHSEC not in sidecar.output
    assert receiver.seen["in-1"] == 1


async def test_nothing_acknowledged_is_lost_to_kill_9(upstream, tmp_path: Path) -> None:
    receiver = Receiver()
    target = await upstream(receiver.app()) + "/events"
    policies = policy(tmp_path / "policies", target)
    data = tmp_path / "data"
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(data))
    acknowledged: set[str] = set()
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        found = _INGRESS.search(sidecar.output)
        assert found
        ingress = found.group(1)

        async def send(n: int) -> None:
            name = f"e{n}"
            body = json.dumps({"n": name}).encode()
            try:
                if n % 2:
                    url, headers = f"{ingress}/hooks/github", github_headers(body, name)
                else:
                    url, headers = f"{sidecar.url}/_webhooks/events", {}
                async with client.post(url, data=body, headers=headers) as r:
                    if r.status in (200, 202):
                        acknowledged.add(name)
            except aiohttp.ClientError:
                pass  # cut by the kill: never acknowledged, so free to be lost

        async def burst() -> None:
            for start in range(0, 1000, 20):
                await asyncio.gather(*(send(n) for n in range(start, start + 20)))

        task = asyncio.create_task(burst())
        await eventually(lambda: len(acknowledged) >= 300, "300 events acknowledged", 60)
        sidecar.proc.send_signal(signal.SIGKILL)
        await sidecar.proc.wait()
        await task
    assert 300 <= len(acknowledged) < 1000
    # A new process on the same data directory delivers whatever was acknowledged.
    async with sidecar_process(policies, *args):
        await eventually(
            lambda: acknowledged <= set(receiver.seen),
            f"all {len(acknowledged)} acknowledged events delivered after the restart",
            60,
        )


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_nothing_acknowledged_is_lost_to_kill_9_under_load(
    upstream, tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """64 senders without pause, deliveries and retries in flight, a backlog: kill -9."""
    store = ""
    if backend == "redis":
        redis = request.getfixturevalue("redis_server")
        # A short claim_idle: the new process takes over what the killed one had in flight.
        store = f'store: {{backend: "{redis.url}", prefix: "kill", claim_idle: 1s}}'
    receiver = Receiver()
    target = await upstream(receiver.app()) + "/events"
    policies = policy(tmp_path / "policies", target, store)
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "data"))
    acknowledged: set[str] = set()
    counter = itertools.count()
    killed = False
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        found = _INGRESS.search(sidecar.output)
        assert found
        ingress = found.group(1)

        async def sender() -> None:
            while not killed:
                n = next(counter)
                name = f"e{n}"
                body = json.dumps({"n": name}).encode()
                if n % 2:
                    url, headers = f"{ingress}/hooks/github", github_headers(body, name)
                else:
                    url, headers = f"{sidecar.url}/_webhooks/events", {}
                try:
                    async with client.post(url, data=body, headers=headers) as r:
                        if r.status in (200, 202):
                            acknowledged.add(name)
                except aiohttp.ClientError:
                    return  # cut by the kill: never acknowledged, so free to be lost

        senders = [asyncio.create_task(sender()) for _ in range(64)]
        await eventually(lambda: len(acknowledged) >= 1500, "1500 events acknowledged", 60)
        sidecar.proc.send_signal(signal.SIGKILL)
        killed = True
        await sidecar.proc.wait()
        await asyncio.gather(*senders)
    undelivered = acknowledged - set(receiver.seen)
    assert undelivered, "everything was delivered before the kill: nothing was tested"
    # A new process on the same data directory (and Redis) delivers what was acknowledged.
    async with sidecar_process(policies, *args):
        await eventually(
            lambda: acknowledged <= set(receiver.seen),
            f"all {len(acknowledged)} acknowledged events delivered after the restart",
            60,
        )
