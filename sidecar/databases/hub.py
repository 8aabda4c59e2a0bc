"""The databases of the running sidecar: a listener, a pool and a guard per `databases:` entry.

A reload swaps each entry's guard (rules, limits) and settings in place:
sessions in flight read them per statement, so they go on with the new rules
and nobody is disconnected. A pool survives a reload; a connection of an
older generation (another host, user, guard) is closed when it comes back.
A changed `listen` opens the new address and closes the old listener (its
sessions go on); a removed entry closes its listener and, once idle, its pool.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..policy.databases import Database
from ..policy.models import Agents
from ..telemetry.pools import PoolSnapshot
from .telemetry import DatabaseTelemetry

if TYPE_CHECKING:
    from ..engines.identity import Credentials
    from .client import Session
    from .entry import Entry

log = logging.getLogger("sidecar.databases")


class DatabaseHub:
    def __init__(self, telemetry: DatabaseTelemetry) -> None:
        self.telemetry = telemetry
        telemetry.pools.source = self.pool_stats
        self.entries: dict[str, Entry] = {}
        self.credentials: Credentials | None = None
        self.serving = False
        self._sessions: dict[int, tuple[int, Session]] = {}

    def pool_stats(self) -> Iterable[tuple[str, dict[str, Any]]]:
        return [(name, e.pool.stats()) for name, e in self.entries.items()]

    def stats(self) -> dict[str, Any]:
        return {name: e.stats() for name, e in self.entries.items()}

    def snapshots(self) -> list[PoolSnapshot]:
        """Each database's pool as the console and the pool_saturated alert see it."""
        out = []
        for name, entry in self.entries.items():
            pool = entry.pool
            out.append(
                PoolSnapshot(
                    kind="postgres",
                    name=name,
                    size=pool.busy + len(pool.idle),
                    in_use=pool.busy,
                    max=pool.config.size,
                    waiting=pool.waiting,
                )
            )
        return out

    def address(self, name: str) -> tuple[str, int]:
        address = self.entries[name].address
        if address is None:
            raise KeyError(name)
        return address

    async def apply(
        self, databases: Mapping[str, Database], agents: Agents, credentials: Credentials | None
    ) -> None:
        """Make the running entries those of the new policy; listeners when serving."""
        self.credentials = credentials if (agents.keys or agents.verify) else None
        for name in list(self.entries):
            if name not in databases:
                await self.entries.pop(name).close()
        for name, config in databases.items():
            entry = self.entries.get(name)
            if entry is None:
                # The wire protocol, pool and SQL rules: imported by the first database.
                from .entry import Entry

                entry = self.entries[name] = Entry(self, name, config)
                if self.serving:
                    await self._listen(entry)
                continue
            moved = entry.config.listen != config.listen
            entry.update(config)
            if moved and self.serving:
                await entry.stop_listening()
                await self._listen(entry)

    async def _listen(self, entry: Entry) -> None:
        try:
            await entry.listen()
        except OSError as exc:
            log.error("database %s: cannot listen on %s: %s", entry.name, entry.config.listen, exc)

    async def start(self) -> None:
        """Open every listener; OSError (with those opened closed again) when one fails."""
        opened: list[Entry] = []
        try:
            for entry in self.entries.values():
                try:
                    await entry.listen()
                except OSError as exc:
                    reason = os.strerror(exc.errno) if exc.errno else str(exc)
                    raise OSError(
                        exc.errno,
                        f"database '{entry.name}': cannot listen on {entry.config.listen}: "
                        f"{reason[:1].lower()}{reason[1:]}",
                    ) from exc
                opened.append(entry)
        except BaseException:
            for entry in opened:
                await entry.stop_listening()
            raise
        self.serving = True

    def register(self, entry: Entry, session: Session) -> tuple[int, int]:
        while True:
            process_id = secrets.randbits(31) or 1
            if process_id not in self._sessions:
                break
        secret = secrets.randbits(32)
        self._sessions[process_id] = (secret, session)
        return process_id, secret

    def unregister(self, process_id: int) -> None:
        self._sessions.pop(process_id, None)

    def cancel(self, process_id: int, secret: int) -> None:
        found = self._sessions.get(process_id)
        if found is None or not hmac.compare_digest(
            found[0].to_bytes(4, "big"), secret.to_bytes(4, "big")
        ):
            return
        found[1].cancel()

    async def close(self) -> None:
        self.serving = False
        for entry in self.entries.values():
            await entry.close()
        self.entries.clear()
