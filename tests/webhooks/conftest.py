"""Webhook fixtures: a store in a temp data dir, policies from YAML, a recording receiver."""

from __future__ import annotations

import hashlib
import hmac
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from multidict import CIMultiDict

from sidecar.policy.webhooks import Webhooks
from sidecar.webhooks.sqlite_store import SqliteStore


def webhooks(text: str) -> Webhooks:
    return Webhooks.model_validate(yaml.safe_load(textwrap.dedent(text)))


def github_headers(body: bytes, secret: str, delivery: str, event: str = "push") -> dict[str, str]:
    signature = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    return {
        "X-Hub-Signature-256": f"sha256={signature}",
        "X-GitHub-Delivery": delivery,
        "X-GitHub-Event": event,
        "Content-Type": "application/json",
    }


@dataclass
class Receiver:
    """A local webhook target on loopback: records each request; answers from `answers`."""

    url: str = ""
    received: list[tuple[CIMultiDict[str], bytes]] = field(default_factory=list)
    # Answers in order (status, headers); the last one repeats.
    answers: list[tuple[int, dict[str, str]]] = field(default_factory=lambda: [(200, {})])
    # Each request's target as it came on the wire: path and query, percent-encoded.
    targets: list[str] = field(default_factory=list)

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            self.targets.append(request.raw_path)
            self.received.append((CIMultiDict(request.headers), body))
            status, headers = self.answers[min(len(self.received), len(self.answers)) - 1]
            return web.Response(status=status, headers=headers)

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app

    def header(self, name: str) -> list[str]:
        return [h.get(name, "") for h, _ in self.received]


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(tmp_path / "data")
    yield opened
    await opened.close()


@pytest.fixture
async def receiver(upstream: Callable[..., Any]) -> Callable[..., Any]:
    async def start(*answers: tuple[int, dict[str, str]]) -> Receiver:
        r = Receiver(answers=list(answers) or [(200, {})])
        r.url = await upstream(r.app())
        return r

    return start
