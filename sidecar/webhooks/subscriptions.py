"""Who waits at /_events/<name>: woken when an event is stored, counted for metrics.

Kept apart from events.py, which needs the store: the hub holds one of these
from the start, and a sidecar without webhooks never loads sqlite3.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

EVENTS_PREFIX = "/_events/"
# Without a wake-up (an event another replica took, over Redis), look this often.
POLL = 1.0


class Subscriptions:
    """Wakes waiting subscribers when events arrive, and counts them for metrics."""

    def __init__(self) -> None:
        self._arrived = asyncio.Event()
        # Set when the sidecar drains: open streams end, so shutdown need not wait.
        self.closing = False
        self.streams: dict[str, int] = {}
        self.on_sent: Callable[[str, str, int], None] | None = None
        self.on_acked: Callable[[str, int], None] | None = None
        self.on_streams: Callable[[str, int], None] | None = None

    def opened(self, source: str, change: int) -> None:
        count = self.streams[source] = self.streams.get(source, 0) + change
        if self.on_streams is not None:
            self.on_streams(source, count)

    def notify(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    def close(self) -> None:
        self.closing = True
        self.notify()

    async def wait(self, seconds: float) -> None:
        """Until an event arrives, or `seconds` passed."""
        arrived = self._arrived
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await arrived.wait()

    def sent(self, source: str, form: str, count: int) -> None:
        if self.on_sent is not None and count:
            self.on_sent(source, form, count)

    def acked(self, source: str, count: int) -> None:
        if self.on_acked is not None and count:
            self.on_acked(source, count)
