"""Agents subscribe to their inbound events at /_events/<name>, through the real process.

SSE (ids, Last-Event-ID, acknowledgements), the long-poll JSON form, identity
and allow rules, metrics, and every unacknowledged event again after `kill -9`
and a restart on the same data, over SQLite and over Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import signal
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers import SidecarProcess, sidecar_process
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401

pytestmark = pytest.mark.process

SECRET = "It's a Secret to Everybody"
KEY = "subscriber-key-canary"
_INGRESS = re.compile(r"ingress \(inbound webhooks\) on (http://\S+?:\d+)")


def policy(dir: Path, extra: str = "", store: str = "") -> Path:
    dir.mkdir(exist_ok=True)
    (dir / "policy.yaml").write_text(
        textwrap.dedent(
            f"""
            version: 1
            {extra}
            webhooks:
              {store}
              inbound:
                github:
                  path: /hooks/github
                  verify: {{type: github, secrets: ["{SECRET}"]}}
                  subscribe: true
                plain:
                  path: /hooks/plain
                  verify: {{type: github, secrets: ["{SECRET}"]}}
            """
        )
    )
    return dir


def ingress_of(sidecar: SidecarProcess) -> str:
    found = _INGRESS.search(sidecar.output)
    assert found, sidecar.output
    return found.group(1)


async def send(client: aiohttp.ClientSession, ingress: str, n: int, path: str = "github") -> str:
    body = json.dumps({"n": n}).encode()
    headers = {
        "X-Hub-Signature-256": "sha256="
        + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest(),
        "X-GitHub-Delivery": f"d-{n}",
        "X-GitHub-Event": "push",
    }
    async with client.post(f"{ingress}/hooks/{path}", data=body, headers=headers) as r:
        assert r.status == 200, await r.text()
        return str((await r.json())["id"])


class Stream:
    """An SSE client on aiohttp: yields (id, data) per event, skipping comments."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def events(self) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        event_id, data = "", ""
        async for raw in self.response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("data: "):
                data = line[6:]
            elif line == "" and data:
                yield event_id, json.loads(data)
                event_id, data = "", ""

    async def take(self, count: int) -> list[tuple[str, dict[str, Any]]]:
        got: list[tuple[str, dict[str, Any]]] = []
        async with asyncio.timeout(10):
            async for event in self.events():
                got.append(event)
                if len(got) == count:
                    break
        return got


async def subscribe(
    client: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    response = await client.get(
        f"{url}/_events/github", headers={"Accept": "text/event-stream", **(headers or {})}
    )
    assert response.status == 200, await response.text()
    assert response.headers["Content-Type"] == "text/event-stream"
    return response


async def test_sse_ids_acknowledgements_and_last_event_id(tmp_path: Path) -> None:
    policies = policy(tmp_path / "p")
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"))
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        ingress = ingress_of(sidecar)
        ids = [await send(client, ingress, n) for n in range(3)]
        # Another webhook's events are not this subscription's.
        await send(client, ingress, 99, "plain")
        first = await subscribe(client, sidecar.url)
        got = await Stream(first).take(3)
        assert [i for i, _ in got] == ids  # the SSE id is the message id
        assert [e["body"] for _, e in got] == [{"n": 0}, {"n": 1}, {"n": 2}]
        assert got[0][1]["type"] == "push" and got[0][1]["id"] == ids[0]
        assert got[0][1]["headers"]["x-github-delivery"] == "d-0"
        # The webhook's secret is never sent on (only the sender's signature is).
        assert SECRET not in json.dumps(got)
        # Live: an event stored while the stream is open arrives on it.
        ids.append(await send(client, ingress, 3))
        [(live_id, live)] = await Stream(first).take(1)
        assert (live_id, live["body"]) == (ids[3], {"n": 3})
        first.close()
        # Acknowledge up to the second: both first ones are delivered.
        async with client.post(f"{sidecar.url}/_events/github/ack", json={"id": ids[1]}) as r:
            assert (r.status, await r.json()) == (200, {"acknowledged": 2})
        again = await subscribe(client, sidecar.url)
        assert [i for i, _ in await Stream(again).take(2)] == ids[2:]
        again.close()
        # The next request's Last-Event-ID acknowledges up to it.
        resumed = await subscribe(client, sidecar.url, {"Last-Event-ID": ids[2]})
        ids.append(await send(client, ingress, 4))
        assert [i for i, _ in await Stream(resumed).take(2)] == ids[3:]
        resumed.close()
        async with client.post(f"{sidecar.url}/_events/github/ack", json={"id": "msg_x"}) as r:
            assert (r.status, r.headers["X-Sidecar-Error"]) == (400, "bad_request")
        async with client.post(f"{sidecar.url}/_events/github/ack", data=b"nope") as r:
            assert r.status == 400
        # Only webhooks with subscribe: true can be subscribed to.
        async with client.get(f"{sidecar.url}/_events/plain") as r:
            assert (r.status, r.headers["X-Sidecar-Error"]) == (404, "no_route")
        async with client.get(f"{sidecar.admin}/webhooks") as r:
            stats = {
                e["endpoint"]: e for e in (await r.json())["endpoints"] if e["source"] == "github"
            }
        assert (stats["_events"]["successes"], stats["_events"]["depth"]) == (3, 2)
        async with client.get(f"{sidecar.admin}/metrics") as r:
            metrics = await r.text()
        assert 'sidecar_webhook_subscription_events_total{form="sse",webhook="github"} 8.0' in (
            metrics
        )
        assert (
            'sidecar_webhook_deliveries_total{direction="inbound",endpoint="_events",'
            'outcome="delivered",webhook="github"} 3.0'
        ) in metrics


async def test_long_poll_json(tmp_path: Path) -> None:
    policies = policy(tmp_path / "p")
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"))
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        ingress = ingress_of(sidecar)
        url = f"{sidecar.url}/_events/github"
        async with client.get(url, params={"wait": "50ms"}) as r:
            assert (r.status, await r.json()) == (200, [])
        first = await send(client, ingress, 1)
        async with client.get(url, params={"wait": "5s"}) as r:
            [event] = await r.json()
        assert (event["id"], event["body"]) == (first, {"n": 1})

        # A waiting poll is answered when an event arrives.
        async def poll_after(last: str) -> list[dict[str, Any]]:
            async with client.get(
                url, params={"wait": "10s"}, headers={"Last-Event-ID": last}
            ) as r:
                return await r.json()  # type: ignore[no-any-return]

        waiting = asyncio.create_task(poll_after(first))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        second = await send(client, ingress, 2)
        assert [e["id"] for e in await waiting] == [second]
        # Unacknowledged: the same event again; `Accept: application/json` polls too.
        async with client.get(url, headers={"Accept": "application/json"}) as r:
            assert [e["id"] for e in await r.json()] == [second]
        async with client.get(url, params={"wait": "1s", "last_event_id": second}) as r:
            assert await r.json() == []
        async with client.get(url, params={"wait": "soon"}) as r:
            assert (r.status, r.headers["X-Sidecar-Error"]) == (400, "bad_request")


async def test_subscribing_goes_through_identity_and_allow_rules(tmp_path: Path) -> None:
    other = "key-of-another-agent"
    keys = (
        f'agents: {{keys: {{watcher: "sha256:{hashlib.sha256(KEY.encode()).hexdigest()}",'
        f' other: "sha256:{hashlib.sha256(other.encode()).hexdigest()}"}}}}\n'
        "            allow: [{agents: [watcher], paths: [/_events/github/**]}]"
    )
    policies = policy(tmp_path / "p", keys)
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"))
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        message = await send(client, ingress_of(sidecar), 1)
        url = f"{sidecar.url}/_events/github"
        for headers, status, reason in [
            ({}, 401, "unauthenticated"),
            ({"X-Agent-Token": "wrong"}, 401, "unauthenticated"),
            ({"X-Agent-Token": other}, 403, "forbidden"),
        ]:
            async with client.get(url, params={"wait": "0s"}, headers=headers) as r:
                assert (r.status, r.headers["X-Sidecar-Error"]) == (status, reason)
            async with client.post(f"{url}/ack", json={"id": message}, headers=headers) as r:
                assert (r.status, r.headers["X-Sidecar-Error"]) == (status, reason)
        # Nothing was acknowledged by the refused calls.
        async with client.get(url, params={"wait": "0s"}, headers={"X-Agent-Token": KEY}) as r:
            assert [e["id"] for e in await r.json()] == [message]
    assert KEY not in sidecar.output


async def _kill_and_come_back(tmp_path: Path, store: str = "") -> None:
    policies = policy(tmp_path / "p", store=store)
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"))
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        ingress = ingress_of(sidecar)
        ids = [await send(client, ingress, n) for n in range(6)]
        stream = await subscribe(client, sidecar.url)
        got = await Stream(stream).take(6)
        assert [i for i, _ in got] == ids
        # The subscriber handled two and acknowledged them, then the sidecar dies.
        async with client.post(f"{sidecar.url}/_events/github/ack", json={"id": ids[1]}) as r:
            assert await r.json() == {"acknowledged": 2}
        sidecar.proc.send_signal(signal.SIGKILL)
        await sidecar.proc.wait()
        with pytest.raises((aiohttp.ClientError, asyncio.TimeoutError)):
            await Stream(stream).take(1)
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        # A subscriber that comes back without a Last-Event-ID gets every event not
        # acknowledged; one that sends the last id it handled, what follows it.
        stream = await subscribe(client, sidecar.url)
        assert [i for i, _ in await Stream(stream).take(4)] == ids[2:]
        stream.close()
        resumed = await subscribe(client, sidecar.url, {"Last-Event-ID": ids[3]})
        new = await send(client, ingress_of(sidecar), 6)
        assert [i for i, _ in await Stream(resumed).take(3)] == [ids[4], ids[5], new]
        resumed.close()


async def test_every_unacknowledged_event_survives_kill_9(tmp_path: Path) -> None:
    await _kill_and_come_back(tmp_path)


async def test_every_unacknowledged_event_survives_kill_9_over_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    await _kill_and_come_back(tmp_path, f'store: {{backend: "{redis_server.url}"}}')


async def test_an_open_stream_does_not_hold_up_shutdown(tmp_path: Path) -> None:
    policies = policy(tmp_path / "p")
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"), "--drain", "120")
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        message = await send(client, ingress_of(sidecar), 1)
        stream = await subscribe(client, sidecar.url)
        assert [i for i, _ in await Stream(stream).take(1)] == [message]
        # Draining ends the stream (it ends whole, not cut), so the sidecar stops well
        # before its 120 s drain (stop() gives up after 20 s).
        assert await sidecar.stop() == 0
        assert await Stream(stream).take(1) == []
