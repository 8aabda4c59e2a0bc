"""Refreshing: one fetch for every waiting caller, renewed before expiry (injected clock)."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.steps.credentials.refresh import Refreshing


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_concurrent_callers_share_one_fetch() -> None:
    gate = asyncio.Event()
    issued: list[str] = []

    async def fetch() -> tuple[str, float]:
        await gate.wait()
        issued.append(f"v{len(issued) + 1}")
        return issued[-1], 3600.0

    source: Refreshing[str] = Refreshing(fetch, refresh_before=300, clock=Clock())
    waiting = [asyncio.ensure_future(source.get()) for _ in range(10)]
    await asyncio.sleep(0)
    gate.set()
    assert await asyncio.gather(*waiting) == ["v1"] * 10
    assert source.fetches == 1


async def test_renewed_behind_the_call_within_refresh_before() -> None:
    clock = Clock()
    issued: list[str] = []

    async def fetch() -> tuple[str, float]:
        issued.append(f"v{len(issued) + 1}")
        return issued[-1], 3600.0

    source: Refreshing[str] = Refreshing(fetch, refresh_before=300, clock=clock)
    assert await source.get() == "v1"
    clock.now += 3000
    assert source.fresh() == "v1"
    clock.now += 400  # inside the last 300 s: still valid, renewed in the background
    assert source.fresh() is None
    assert await source.get() == "v1"
    await asyncio.sleep(0)
    assert await source.get() == "v2"
    clock.now += 4000  # expired: the caller waits for the new value
    assert await source.get() == "v3"


async def test_a_failed_fetch_is_tried_again_by_the_next_call() -> None:
    calls = 0

    async def fetch() -> tuple[str, float]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("down")
        return "ok", 60.0

    source: Refreshing[str] = Refreshing(fetch, refresh_before=10, clock=Clock())
    with pytest.raises(RuntimeError):
        await source.get()
    assert await source.get() == "ok"
