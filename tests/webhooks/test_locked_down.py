"""Publishing goes through identity and allow rules; deliveries reach only where they may.

Issue 20, defects 5 and 6, through the real `sidecar run` and `sidecar validate`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import ROOT, eventually, sidecar_process

pytestmark = pytest.mark.process

WHSEC = "whsec_" + "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
GOOD_KEY = "key-of-the-billing-agent-canary"
OTHER_KEY = "key-of-the-research-agent"
SECRET = "It's a Secret to Everybody"
PATH_CANARY = "path-credential-canary"


def _sha(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class Sink:
    """A receiver that records each body it gets."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def app(self) -> web.Application:
        async def take(request: web.Request) -> web.Response:
            self.bodies.append(await request.read())
            return web.Response(status=200)

        app = web.Application()
        app.router.add_post("/{tail:.*}", take)
        return app


def _write(dir: Path, text: str) -> Path:
    dir.mkdir(exist_ok=True)
    (dir / "policy.yaml").write_text(textwrap.dedent(text))
    return dir


async def _stored(client: aiohttp.ClientSession, admin: str) -> int:
    """How many events the outbound queue holds (each waits: its endpoint's name never
    resolves here)."""
    async with client.get(f"{admin}/webhooks") as r:
        return sum(e["depth"] + e["successes"] + e["dead"] for e in (await r.json())["endpoints"])


async def test_publishing_needs_a_verified_agent_and_an_allow_rule(tmp_path: Path) -> None:
    policies = _write(
        tmp_path / "p",
        f"""
        version: 1
        agents:
          keys: {{billing: "{_sha(GOOD_KEY)}", research: "{_sha(OTHER_KEY)}"}}
        allow: [{{agents: [billing], methods: [POST], paths: [/_webhooks/events]}}]
        webhooks:
          outbound:
            events:
              signing: {{secrets: ["{WHSEC}"]}}
              endpoints: [{{name: crm, url: "https://crm.invalid/in"}}]
        """,
    )
    args = ("--data-dir", str(tmp_path / "data"))
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        url = f"{sidecar.url}/_webhooks/events"

        async def publish(n: str, headers: dict[str, str]) -> aiohttp.ClientResponse:
            async with client.post(url, json={"n": n}, headers=headers) as r:
                await r.read()
                return r

        r = await publish("no-key", {})
        assert (r.status, r.headers.get("X-Sidecar-Error")) == (401, "unauthenticated")
        assert r.headers["Content-Type"] == "application/problem+json"
        r = await publish("wrong-key", {"X-Agent-Token": "not-a-key"})
        assert (r.status, r.headers.get("X-Sidecar-Error")) == (401, "unauthenticated")
        # A self-declared name counts for nothing.
        r = await publish("declared", {"X-Agent-Id": "billing"})
        assert r.status == 401
        # Verified, but no rule lets this agent publish.
        r = await publish("research", {"X-Agent-Token": OTHER_KEY})
        assert (r.status, r.headers.get("X-Sidecar-Error")) == (403, "forbidden")
        assert await _stored(client, sidecar.admin) == 0
        r = await publish("billing", {"X-Agent-Token": GOOD_KEY})
        assert r.status == 202
        r = await publish("bearer", {"X-Agent-Token": f"Bearer {GOOD_KEY}"})
        assert r.status == 202
        assert await _stored(client, sidecar.admin) == 2
    assert GOOD_KEY not in sidecar.output


async def test_a_webhooks_own_allow_rules_come_before_the_top_level_ones(
    upstream: Callable[..., Any], tmp_path: Path
) -> None:
    sink = Sink()
    target = await upstream(sink.app())
    policies = _write(
        tmp_path / "p",
        f"""
        version: 1
        allow: [{{agents: [writer-*]}}]
        webhooks:
          outbound:
            events:
              allow: [{{agents: [publisher], paths: [/_webhooks/events]}}]
              signing: {{secrets: ["{WHSEC}"]}}
              endpoints: [{{name: sink, url: "{target}/in", allow_private: true}}]
            audit:
              signing: {{secrets: ["{WHSEC}"]}}
              endpoints: [{{name: sink, url: "{target}/audit", allow_private: true}}]
        """,
    )
    async with (
        sidecar_process(policies, "--data-dir", str(tmp_path / "d")) as sidecar,
        aiohttp.ClientSession() as client,
    ):

        async def publish(name: str, agent: str) -> tuple[int, dict[str, Any]]:
            async with client.post(
                f"{sidecar.url}/_webhooks/{name}", json={"to": name}, headers={"X-Agent-Id": agent}
            ) as r:
                return r.status, await r.json()

        status, problem = await publish("events", "writer-1")
        assert (status, problem["reason"]) == (403, "forbidden")
        assert "webhooks.outbound.events.allow" in problem["detail"]
        assert (await publish("events", "publisher"))[0] == 202
        status, problem = await publish("audit", "publisher")
        assert (status, problem["reason"]) == (403, "forbidden")
        assert "default allow rules" in problem["detail"]
        assert (await publish("audit", "writer-2"))[0] == 202
        await eventually(lambda: len(sink.bodies) == 2, "the two allowed events delivered")
    assert sorted(json.loads(b)["to"] for b in sink.bodies) == ["audit", "events"]


# -- where deliveries may go -----------------------------------------------------------

REFUSED_HOSTS = [
    "127.0.0.1",
    "localhost",
    "[::1]",
    "169.254.169.254",
    "metadata.google.internal",
    "10.1.2.3",
    "192.168.0.10",
    "172.16.5.4",
    "100.64.0.1",
    "0.0.0.0",
    "2130706433",
    "0x7f.1",
    "0177.0.0.1",
    "127.1",
    "[::ffff:127.0.0.1]",
    "[64:ff9b::a9fe:a9fe]",
    "[2002:a9fe:a9fe::1]",
    "[2001:0:4136:e378:8000:63bf:3f57:fdf2]",
    "[fd00::1]",
    "[fe80::1]",
]


def _validate(
    policies: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "validate", str(policies)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_validate_refuses_non_public_endpoints_at_their_line(tmp_path: Path) -> None:
    endpoints = "\n".join(
        f'              - {{name: e{i}, url: "http://{host}:8080/hook"}}'
        for i, host in enumerate(REFUSED_HOSTS)
    )
    text = textwrap.dedent(
        f"""\
        version: 1
        webhooks:
          outbound:
            events:
              signing: {{secrets: ["{WHSEC}"]}}
              endpoints:
        """
    )
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "policy.yaml").write_text(text + endpoints + "\n")
    done = _validate(policies)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == len(REFUSED_HOSTS), done.stderr
    for i, line in enumerate(lines):
        # FILE:LINE:COL at each endpoint's url.
        assert line.startswith(f"{policies / 'policy.yaml'}:{7 + i}:"), line
    assert "169.254.169.254 is link-local" in done.stderr
    assert "names this host or the cloud metadata service" in done.stderr
    assert "unusual form" in done.stderr
    assert "allow_private: true" in done.stderr
    # The same hosts with allow_private: true are an in-cluster receiver's, except the
    # odd numeric forms, which are refused whatever they point at.
    private = (text + endpoints + "\n").replace('/hook"}', '/hook", allow_private: true}')
    (policies / "policy.yaml").write_text(private)
    done = _validate(policies)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 4, done.stderr  # the four odd forms
    assert all("unusual form" in line for line in done.stderr.strip().splitlines())
    public = text + '              - {name: crm, url: "https://8.8.8.8/hooks"}\n'
    (policies / "policy.yaml").write_text(public)
    assert _validate(policies).returncode == 0


def test_validate_refuses_delivery_to_the_sidecars_own_listeners(tmp_path: Path) -> None:
    text = textwrap.dedent(
        f"""\
        version: 1
        webhooks:
          inbound:
            github:
              path: /hooks/github
              verify: {{type: github, secrets: ["{SECRET}"]}}
              routes:
                - deliver_to: ["http://127.0.0.1:9000/ok", "{{target}}"]
        """
    )
    policies = tmp_path / "p"
    policies.mkdir()
    for target, env in [
        ("http://127.0.0.1:15001/reload", {}),  # the default admin port
        ("http://localhost:15000/github/x", {}),  # the default egress port
        ("http://[::1]:16001/reload", {"SIDECAR_ADMIN": "127.0.0.1:16001"}),
    ]:
        (policies / "policy.yaml").write_text(text.replace("{target}", target))
        done = _validate(policies, env)
        assert done.returncode == 1, target
        assert "policy.yaml:8:" in done.stderr and "own listener" in done.stderr, done.stderr
    # Local targets are fine: inbound deliveries are local by design.
    (policies / "policy.yaml").write_text(text.replace("{target}", "http://127.0.0.1:8080/x"))
    assert _validate(policies).returncode == 0


def _loopback_name() -> str:
    """A name (not `localhost`) that resolves to loopback here: the load-time check
    passes it, so only the connect-time check can refuse it."""
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        pytest.skip("this host's name does not resolve")
    if not address.startswith("127.") or name.endswith("localhost"):
        pytest.skip(f"this host's name resolves to {address}, not to loopback")
    return name


async def test_a_name_that_resolves_to_loopback_is_refused_when_connecting(
    upstream: Callable[..., Any], tmp_path: Path
) -> None:
    name = _loopback_name()
    sink = Sink()
    port = (await upstream(sink.app())).rpartition(":")[2]
    text = f"""
        version: 1
        webhooks:
          outbound:
            events:
              retry: {{schedule: [0s, 50ms], jitter: 0}}
              signing: {{secrets: ["{WHSEC}"]}}
              endpoints: [{{name: sink, url: "http://{name}:{port}/in/{PATH_CANARY}?t={PATH_CANARY}"PRIVATE}}]
        """
    policies = _write(tmp_path / "p", text.replace("PRIVATE", ""))
    async with (
        sidecar_process(policies, "--data-dir", str(tmp_path / "d")) as sidecar,
        aiohttp.ClientSession() as client,
    ):
        async with client.post(f"{sidecar.url}/_webhooks/events", json={"n": 1}) as r:
            assert r.status == 202
            message_id = (await r.json())["id"]

        async def view() -> dict[str, Any]:
            async with client.get(f"{sidecar.admin}/webhooks/messages/{message_id}") as r:
                return (await r.json())["deliveries"][0]  # type: ignore[no-any-return]

        delivery: dict[str, Any] = {}

        async def dead() -> bool:
            delivery.update(await view())
            return delivery["status"] == "dead"

        await eventually(dead, "the delivery refused twice, then dead")
        assert sink.bodies == []
        errors = [a["error"] for a in delivery["attempts"]]
        assert len(errors) == 2 and all(e.startswith("refused: ") for e in errors), errors
        assert "loopback" in errors[0] and "allow_private" in errors[0]
        # An endpoint's path and query can be its credential: shown nowhere.
        assert PATH_CANARY not in json.dumps(delivery)
        # With allow_private: true the same receiver is an in-cluster one.
        _write(tmp_path / "p", text.replace("PRIVATE", ", allow_private: true"))
        async with client.post(f"{sidecar.admin}/reload") as r:
            assert (await r.json())["ok"] is True
        async with client.post(f"{sidecar.url}/_webhooks/events", json={"n": 2}) as r:
            assert r.status == 202
        await eventually(lambda: len(sink.bodies) == 1, "delivered with allow_private")
    assert PATH_CANARY not in sidecar.output


async def test_no_delivery_reaches_the_sidecars_own_admin_port(tmp_path: Path) -> None:
    name = _loopback_name()
    hook = f"""
        version: 1
        webhooks:
          inbound:
            github:
              path: /hooks/github
              verify: {{type: github, secrets: ["{SECRET}"]}}
              retry: {{schedule: [0s, 50ms], jitter: 0}}
              routes: [{{deliver_to: "TARGET"}}]
        """
    policies = _write(tmp_path / "p", hook.replace("TARGET", "http://127.0.0.1:9/unused"))
    args = ("--ingress", "127.0.0.1:0", "--data-dir", str(tmp_path / "d"))
    async with sidecar_process(policies, *args) as sidecar, aiohttp.ClientSession() as client:
        admin_port = sidecar.admin.rpartition(":")[2]

        async def reload() -> dict[str, Any]:
            async with client.post(f"{sidecar.admin}/reload") as r:
                return await r.json()  # type: ignore[no-any-return]

        # Known once bound: a reload that targets the admin port is refused at its line.
        _write(tmp_path / "p", hook.replace("TARGET", f"http://127.0.0.1:{admin_port}/reload"))
        refused = await reload()
        assert refused["ok"] is False
        assert "policy.yaml:9:" in refused["errors"][0] and "own listener" in refused["errors"][0]
        # A name the load cannot judge is judged on its address when connecting.
        _write(tmp_path / "p", hook.replace("TARGET", f"http://{name}:{admin_port}/reload"))
        assert (await reload())["ok"] is True
        ingress = next(
            line.split(" on ")[-1]
            for line in sidecar.output.splitlines()
            if "ingress (inbound webhooks) on" in line
        )
        body = b'{"zen": "x"}'
        signature = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        headers = {
            "X-Hub-Signature-256": f"sha256={signature}",
            "X-GitHub-Delivery": "d-1",
            "X-GitHub-Event": "ping",
        }
        async with client.post(f"{ingress}/hooks/github", data=body, headers=headers) as r:
            assert r.status == 200
            message_id = (await r.json())["id"]

        async def dead() -> bool:
            async with client.get(f"{sidecar.admin}/webhooks/messages/{message_id}") as r:
                return (await r.json())["deliveries"][0]["status"] == "dead"  # type: ignore[no-any-return]

        await eventually(dead, "the delivery to the admin port refused, then dead")
        async with client.get(f"{sidecar.admin}/webhooks/messages/{message_id}") as r:
            attempts = (await r.json())["deliveries"][0]["attempts"]
        assert all("own listener" in a["error"] for a in attempts), attempts
        # Never answered: /reload was never reached.
        assert all(a["status_code"] is None for a in attempts)
