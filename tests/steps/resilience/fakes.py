"""Fakes the resilience steps' unit tests share: a clock to set, an upstream to script."""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from sidecar.core.call import Call


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class FakeReply:
    def __init__(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.headers: CIMultiDict[str] = CIMultiDict(headers or {})


class Upstream:
    def __init__(self) -> None:
        self.calls = 0
        self.reply = FakeReply(200)

    async def __call__(self, call: Call) -> Any:
        self.calls += 1
        return self.reply
