"""What `webhooks.store` and a reload change in a running sidecar: the queue in
Redis, retention of delivered messages, and the ingress listener opening when
inbound webhooks first appear."""

from __future__ import annotations

import json
import logging
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from sidecar.app import serve
from sidecar.runtime import Sidecar
from sidecar.webhooks.queue import Attempt, Direction, Outcome, Target
from sidecar.webhooks.sqlite_store import SqliteStore
from tests.helpers import eventually
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401

from .conftest import Receiver, github_headers

SECRET = "gh-secret"
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
REDIS_PASSWORD = "redis-password-canary"


@pytest.fixture
async def started(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[tuple[Sidecar, list[web.BaseRunner]]] = []

    async def start(policy: str) -> tuple[Sidecar, list[web.BaseRunner], Path]:
        policies = tmp_path / "policies"
        policies.mkdir()
        (policies / "policy.yaml").write_text(textwrap.dedent(policy))
        sidecar = Sidecar(str(policies), env={}, data_dir=str(tmp_path / "data"))
        assert (await sidecar.reload("startup")).ok
        runners = await serve(
            sidecar, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0), ingress=("127.0.0.1", 0)
        )
        made.append((sidecar, runners))
        return sidecar, runners, policies / "policy.yaml"

    yield start
    for sidecar, runners in made:
        for runner in runners:
            await runner.cleanup()
        await sidecar.close()


def url(runner: web.BaseRunner) -> str:
    return f"http://127.0.0.1:{runner.addresses[0][1]}"


INBOUND = """
version: 1
webhooks:
  {store}
  inbound:
    github:
      path: /hooks/github
      verify: {{type: github, secrets: ["{secret}"]}}
      routes:
        - deliver_to: ["{target}/events"]
"""


async def test_the_ingress_listener_opens_when_a_reload_first_declares_inbound(
    started, receiver
) -> None:
    target: Receiver = await receiver((200, {}))
    sidecar, runners, path = await started("version: 1\n")
    assert len(runners) == 2  # egress and admin: no inbound webhook, no ingress
    path.write_text(textwrap.dedent(INBOUND.format(store="", secret=SECRET, target=target.url)))
    assert (await sidecar.reload("admin")).ok
    await eventually(lambda: len(runners) == 3, "the ingress listener to open")
    body = b'{"n": 1}'
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            f"{url(runners[2])}/hooks/github",
            data=body,
            headers=github_headers(body, SECRET, "d-1"),
        ) as r,
    ):
        assert r.status == 200
    await eventually(lambda: len(target.received) == 1, "the event delivered")


async def test_a_sidecar_on_a_redis_queue(
    started, receiver, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    target: Receiver = await receiver((200, {}))
    backend = redis_server.url
    store = f'store: {{backend: "{backend}", prefix: one}}'
    sidecar, runners, path = await started(
        INBOUND.format(store=store, secret=SECRET, target=target.url)
    )
    assert not (Path(sidecar.webhooks.data_dir) / "webhooks.db").exists()
    body = b'{"n": 1}'
    async with aiohttp.ClientSession() as client:
        async with client.post(
            f"{url(runners[2])}/hooks/github", data=body, headers=github_headers(body, SECRET, "d")
        ) as r:
            assert r.status == 200
            message_id = (await r.json())["id"]
        await eventually(lambda: len(target.received) == 1, "the event delivered")
        async with client.get(f"{url(runners[1])}/webhooks/messages/{message_id}") as r:
            view = await r.json()
        assert [a["status_code"] for a in view["deliveries"][0]["attempts"]] == [200]
        # Redis down: nothing is acknowledged (the sender sends again), the admin port serves.
        redis_server.stop()
        async with client.post(
            f"{url(runners[2])}/hooks/github", data=body, headers=github_headers(body, SECRET, "e")
        ) as r:
            assert r.status == 503
            assert r.headers["X-Sidecar-Error"] == "store_unavailable"
        async with client.get(f"{url(runners[1])}/metrics") as r:
            assert r.status == 200
        # Back, empty (no persistence here): the stream is made again and events flow.
        redis_server.start()

        async def sent_again() -> bool:
            async with client.post(
                f"{url(runners[2])}/hooks/github",
                data=body,
                headers=github_headers(body, SECRET, "e"),
            ) as r:
                return r.status == 200

        await eventually(sent_again, "the event accepted once Redis is back")
        await eventually(lambda: len(target.received) == 2, "the event delivered", 15)
    # Moving the queue elsewhere takes a restart: the reload is refused, nothing changes.
    caplog.set_level(logging.INFO)
    other = f"redis://:{REDIS_PASSWORD}@127.0.0.1:{redis_server.port}/1"
    path.write_text(
        textwrap.dedent(
            INBOUND.format(store=f'store: {{backend: "{other}"}}', secret=SECRET, target=target.url)
        )
    )
    result = await sidecar.reload("admin")
    assert not result.ok
    assert "restart" in json.dumps(result.as_dict())
    assert REDIS_PASSWORD not in json.dumps(result.as_dict())
    assert REDIS_PASSWORD not in caplog.text
    assert sidecar.webhooks.backend == backend


async def test_delivered_messages_are_pruned_after_the_retention(tmp_path: Path) -> None:
    now = [1000.0]
    store = await SqliteStore.open(tmp_path / "data", clock=lambda: now[0])
    store.configure(claim_idle=60.0, retention=3600.0)
    try:

        async def accept(n: int, targets: list[Target]) -> str:
            accepted = await store.accept(
                direction=Direction.outbound,
                source="events",
                event_type=None,
                headers=[],
                body=b'{"n": %d}' % n,
                targets=targets,
            )
            return accepted.message_id

        target = [Target("crm", "http://127.0.0.1:9/")]
        delivered, failing, unrouted = (
            await accept(1, target),
            await accept(2, target),
            await accept(3, []),
        )
        for due in await store.claim(10, 10):
            ok = due.message_id == delivered
            attempt = Attempt(at=now[0], status_code=200 if ok else 500, error=None, duration=0.0)
            await store.finish(due, attempt, Outcome.delivered if ok else Outcome.dead)
        now[0] += 2 * 3600  # past the retention; the next write prunes
        [again] = [await accept(4, target)]
        [due] = await store.claim(10, 10)
        await store.finish(due, Attempt(now[0], 200, None, 0.0), Outcome.delivered)
        assert await store.message(delivered) is None
        assert await store.message(failing) is not None  # dead: kept for a retry
        assert await store.message(unrouted) is not None  # unrouted: kept to be seen
        assert await store.message(again) is not None  # delivered, but young
    finally:
        await store.close()


async def test_a_webhook_store_that_cannot_open_fails_the_reload_with_sqlites_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    (data / "webhooks.db").mkdir(parents=True)  # a directory where the file should be
    policies = tmp_path / "policies"
    policies.mkdir()
    policy = INBOUND.format(store="", secret=SECRET, target="http://127.0.0.1:9")
    (policies / "policy.yaml").write_text(textwrap.dedent(policy))
    sidecar = Sidecar(str(policies), env={}, data_dir=str(data))
    with caplog.at_level(logging.ERROR, logger="sidecar"):
        result = await sidecar.reload("startup")
    await sidecar.close()
    assert not result.ok
    assert result.errors == (
        f"{data}: cannot open the webhook store: unable to open database file",
    )
    assert "the webhook store could not be opened" in caplog.text
