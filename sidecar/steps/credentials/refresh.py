"""A credential with a lifetime: fetched once for all callers, renewed before it expires.

As steps/credentials/oauth2.py does for its tokens: however many calls find the value
missing or expired, they wait for one fetch (single flight, shielded, so a
caller giving up cancels nobody else's); within `refresh_before` of expiry the
current value is still handed out while a new one is fetched behind the call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")

# A fetch returns the value and its lifetime in seconds, counted from when it was asked.
Fetch = Callable[[], Awaitable[tuple[T, float]]]


class Refreshing(Generic[T]):
    def __init__(
        self,
        fetch: Fetch[T],
        *,
        refresh_before: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fetch = fetch
        self._refresh_before = refresh_before
        self._clock = clock
        self._value: T | None = None
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._pending: asyncio.Task[T] | None = None
        self.fetches = 0  # fetches started, for tests and /services

    def fresh(self) -> T | None:
        """The value when it needs no fetch now (the hot path: no coroutine)."""
        if self._value is not None and self._clock() < self._refresh_at:
            return self._value
        return None

    async def get(self) -> T:
        value = self._value
        if value is not None:
            now = self._clock()
            if now < self._refresh_at:
                return value
            if now < self._expires_at:
                self._start()  # still valid: renewed behind the call, not in front of it
                return value
        return await asyncio.shield(self._start())

    @property
    def busy(self) -> bool:
        """A fetch is in flight."""
        return self._pending is not None

    def invalidate(self) -> None:
        self._value = None
        self._refresh_at = self._expires_at = 0.0

    def _start(self) -> asyncio.Task[T]:
        task = self._pending
        if task is None:
            task = self._pending = asyncio.get_running_loop().create_task(self._run())
            task.add_done_callback(_consume)
        return task

    async def _run(self) -> T:
        self.fetches += 1
        try:
            sent = self._clock()
            value, lifetime = await self._fetch()
            self._value = value
            self._expires_at = sent + lifetime
            self._refresh_at = self._expires_at - min(self._refresh_before, lifetime / 2)
            return value
        finally:
            self._pending = None


def _consume(task: asyncio.Task[object]) -> None:
    # A renewal behind the calls may fail with nobody awaiting it; its fetch logged why.
    if not task.cancelled():
        task.exception()
