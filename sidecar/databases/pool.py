"""The pool of server connections of one database: at most `size`, a wait queue, upkeep.

A connection is lent for a transaction (transaction mode) or a whole agent
session (session mode); the mode is the relay's business, the pool only lends
and takes back. When all are lent, a borrower waits in line up to
`wait_timeout`. Idle connections are probed before they are lent (a server
restart leaves them dead), closed after `idle_timeout` or `max_lifetime`,
and `min_idle` are kept open. A reload changes the settings in place: lent
connections finish their work; those of an older generation (another host,
user, guard) are closed when they come back, not reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque

from ..policy.databases import DatabasePool
from .server import ServerConnection, Settings, UpstreamError, connect

log = logging.getLogger("sidecar.databases")

JANITOR_EVERY = 1.0


class PoolTimeout(Exception):
    """Every server connection stayed busy for the whole wait."""


def _expire(waiter: asyncio.Future[ServerConnection | None]) -> None:
    if not waiter.done():
        waiter.set_exception(PoolTimeout())


class Pool:
    def __init__(self, name: str, settings: Settings, config: DatabasePool) -> None:
        self.name = name
        self.settings = settings
        self.config = config
        self.idle: list[ServerConnection] = []
        # Connections lent out or being opened: with the idle ones, never more than size.
        self.busy = 0
        self.waiters: deque[asyncio.Future[ServerConnection | None]] = deque()
        # The server's ParameterStatus values, told to agents when they log in.
        self.server_params: dict[str, str] = {}
        self.server_version = ""
        self._janitor: asyncio.Task[None] | None = None
        self.closed = False

    # -- numbers for metrics and the admin view ---------------------------------------

    @property
    def waiting(self) -> int:
        return sum(1 for w in self.waiters if not w.done())

    def stats(self) -> dict[str, object]:
        return {
            "mode": self.config.mode,
            "size": self.config.size,
            "in_use": self.busy,
            "idle": len(self.idle),
            "waiting": self.waiting,
            "server_version": self.server_version or None,
        }

    # -- lending ----------------------------------------------------------------------

    def update(self, settings: Settings, config: DatabasePool) -> None:
        """A reload: new connections use these; lent ones are judged when they come back."""
        self.settings = settings
        self.config = config
        keep = [c for c in self.idle if c.generation == settings.generation]
        for conn in self.idle:
            if conn.generation != settings.generation:
                conn.close()
        self.idle = keep
        # A bigger pool lets waiters open connections now.
        while self.waiters and len(self.idle) + self.busy < config.size:
            if not self._wake(None):
                break
            self.busy += 1

    def start(self) -> None:
        if self._janitor is None:
            self._janitor = asyncio.get_running_loop().create_task(self._upkeep())

    def take(self) -> ServerConnection | None:
        """A free, sound idle connection, lent at once; None when none is."""
        idle = self.idle
        if not idle:
            return None
        now = time.monotonic()
        max_lifetime = self.config.max_lifetime
        while idle:
            conn = idle.pop()
            if conn.healthy and now - conn.created < max_lifetime:
                self.busy += 1
                return conn
            conn.close()
        return None

    async def acquire(self) -> ServerConnection:
        conn = self.take()
        if conn is not None:
            return conn
        if self.busy + len(self.idle) < self.config.size:
            self.busy += 1
            return await self._open()
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[ServerConnection | None] = loop.create_future()
        self.waiters.append(waiter)
        # A timer that fails the future, not asyncio.wait_for: this is the busy path of a
        # full pool, and wait_for costs a wrapper per wait.
        timer = loop.call_later(self.config.wait_timeout, _expire, waiter)
        try:
            got = await waiter
        except BaseException:
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Handed a connection (or a slot) just as the borrower went away.
                handed = waiter.result()
                if handed is not None:
                    self.release(handed)
                else:
                    self.busy -= 1
                    self._hand_slot()
            raise
        finally:
            timer.cancel()
        if got is not None:
            if got.healthy:
                return got
            got.close()
        # A slot was handed over (counted in busy already): open a connection in it.
        return await self._open()

    async def _open(self) -> ServerConnection:
        try:
            conn = await connect(self.settings)
        except BaseException:
            self.busy -= 1
            self._hand_slot()
            raise
        self.server_params = dict(conn.params)
        self.server_version = conn.params.get("server_version", "")
        return conn

    def release(self, conn: ServerConnection, *, reusable: bool = True) -> None:
        """Take a connection back; `reusable` False when its state is unknown."""
        if conn.cancelling is not None and not conn.cancelling.done():
            # A cancel is on its way to this backend: nobody else may get it before
            # the server has taken that cancel (pgbouncer#245).
            task = conn.cancelling
            task.add_done_callback(lambda _: self.release(conn, reusable=reusable))
            return
        conn.cancelling = None
        now = time.monotonic()
        if (
            not reusable
            or self.closed
            or not conn.healthy
            or conn.generation != self.settings.generation
            or now - conn.created >= self.config.max_lifetime
        ):
            conn.close()
            self.busy -= 1
            self._hand_slot()
            return
        conn.last_used = now
        if self._wake(conn):
            return
        self.busy -= 1
        self.idle.append(conn)

    def _wake(self, conn: ServerConnection | None) -> bool:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def _hand_slot(self) -> None:
        if self.busy + len(self.idle) < self.config.size and self._wake(None):
            self.busy += 1

    # -- upkeep -----------------------------------------------------------------------

    async def _upkeep(self) -> None:
        while not self.closed:
            await asyncio.sleep(JANITOR_EVERY)
            try:
                await self.tidy()
            except Exception:
                log.exception("database %s: pool upkeep failed", self.name)

    async def tidy(self) -> None:
        now = time.monotonic()
        config = self.config
        keep: list[ServerConnection] = []
        for conn in self.idle:
            expired = now - conn.created >= config.max_lifetime
            stale = now - conn.last_used >= config.idle_timeout
            if not conn.healthy or expired or (stale and len(keep) >= config.min_idle):
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep
        while len(self.idle) < config.min_idle and self.busy + len(self.idle) < config.size:
            self.busy += 1
            try:
                conn = await self._open()
            except UpstreamError:
                return
            self.busy -= 1
            if not self._wake(conn):
                self.idle.append(conn)
            else:
                self.busy += 1

    async def close(self) -> None:
        self.closed = True
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        for conn in self.idle:
            conn.close()
        self.idle.clear()
