"""The databases of the running sidecar: a listener, a pool and a guard per `databases:` entry.

A reload swaps each entry's guard (rules, limits) and settings in place:
sessions in flight read them per statement, so they go on with the new rules
and nobody is disconnected. A pool survives a reload; a connection of an
older generation (another host, user, guard) is closed when it comes back.
A changed `listen` opens the new address and closes the old listener (its
sessions go on); a removed entry closes its listener and, once idle, its pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..policy.databases import Database
from ..policy.models import Agents
from ..telemetry.pools import PoolSnapshot
from . import protocol as pg
from .client import Session
from .guard import Guard
from .pool import Pool
from .server import Settings, UpstreamError
from .telemetry import DatabaseTelemetry, Operation

if TYPE_CHECKING:
    from ..engines.identity import Credentials

log = logging.getLogger("sidecar.databases")


class Entry:
    """One database as the running sidecar holds it."""

    def __init__(self, hub: DatabaseHub, name: str, config: Database) -> None:
        self.hub = hub
        self.name = name
        self.config = config
        self.guard = Guard(name, config)
        self.settings = Settings.of(name, config)
        self.pool = Pool(name, self.settings, config.pool)
        self.max_rows = config.max_rows or 0
        self.server: asyncio.Server | None = None
        self.address: tuple[str, int] | None = None
        self.sessions = 0
        self.background: set[asyncio.Task[None]] = set()
        self.namespace = config.target.database

    def update(self, config: Database) -> None:
        old = self.config
        self.config = config
        # Rate-limit buckets survive a reload that leaves the rules and limits alone.
        if (old.allow, old.read_only, old.rate_limit) != (
            config.allow,
            config.read_only,
            config.rate_limit,
        ):
            self.guard = Guard(self.name, config)
        self.settings = Settings.of(self.name, config)
        self.pool.update(self.settings, config.pool)
        self.max_rows = config.max_rows or 0
        self.namespace = config.target.database

    def observe(
        self, agent: str, operation: Operation, sqlstate: str, rows: int, seconds: float
    ) -> None:
        self.hub.telemetry.observe(
            self.name, self.namespace, agent, operation, sqlstate, rows, seconds
        )

    def stats(self) -> dict[str, Any]:
        target = self.config.target
        return {
            "listen": f"{self.address[0]}:{self.address[1]}" if self.address else None,
            "upstream": f"postgres://{target.host}:{target.port}/{target.database}",
            "user": self.config.auth.username,
            "read_only": self.config.read_only,
            "sessions": self.sessions,
            "pool": self.pool.stats(),
        }

    async def listen(self) -> None:
        host, port = self.config.address
        self.server = await asyncio.start_server(self._connection, host, port, backlog=1024)
        sock = self.server.sockets[0].getsockname()
        self.address = (sock[0], sock[1])
        self.pool.start()
        log.info("database %s on %s:%d", self.name, *self.address)

    async def stop_listening(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._serve(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, pg.ProtocolError, TimeoutError):
            pass
        except Exception:
            log.exception("database %s: a session ended on an error", self.name)
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            first = await reader.readexactly(1)
            if first == b"\x16":
                # A direct TLS handshake (PostgreSQL 17 sslnegotiation=direct): the loopback
                # listener speaks plain text only, so the client falls back or gives up.
                return
            packet = await read_startup_rest(reader, first)
            startup = pg.parse_startup(packet)
            if startup.code in (pg.SSL_REQUEST, pg.GSSENC_REQUEST):
                writer.write(b"N")
                await writer.drain()
                continue
            if startup.code == pg.CANCEL_REQUEST:
                self.hub.cancel(startup.process_id, startup.secret)
                return
            if startup.code != pg.PROTOCOL_3:
                writer.write(
                    pg.error_response(
                        "0A000", "the sidecar speaks protocol 3.0 only", severity="FATAL"
                    )
                )
                await writer.drain()
                return
            break
        agent = await self._login(startup.params, reader, writer)
        if agent is None:
            return
        session = Session(self, reader, writer, agent)
        process_id, secret = self.hub.register(self, session)
        self.sessions += 1
        try:
            if not await self._greet(session, writer, process_id, secret):
                return
            await session.run()
        finally:
            self.sessions -= 1
            self.hub.unregister(process_id)

    async def _login(
        self, params: Mapping[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str | None:
        credentials = self.hub.credentials
        if credentials is None:
            name = params.get("user") or params.get("application_name") or "anonymous"
            return name
        writer.write(pg.authentication(pg.AUTH_CLEARTEXT))
        await writer.drain()
        framer = pg.Framer()
        msg = None
        while msg is None:
            data = await asyncio.wait_for(reader.read(65536), 30)
            if not data:
                return None
            framer.feed(data)
            msg = framer.next()
        kind, body, _ = msg
        from ..engines.identity import KeysUnavailable, Refused

        try:
            if kind != pg.PASSWORD:
                raise Refused("no password was sent")
            presented, _ = pg.cstring(body, 0)
            return await credentials.identify(presented)
        except Refused as exc:
            text = (
                f"database '{self.name}' needs a verified agent identity: send your agent key "
                f"or JWT as the password ({exc})"
            )
            code = "28P01"
        except KeysUnavailable:
            text = "the sidecar could not fetch the keys to verify agents' tokens; retry later"
            code = "08004"
        writer.write(pg.error_response(code, text, severity="FATAL"))
        await writer.drain()
        return None

    async def _greet(
        self, session: Session, writer: asyncio.StreamWriter, process_id: int, secret: int
    ) -> bool:
        pool = self.pool
        if not pool.server_params:
            try:
                conn = await pool.acquire()
            except UpstreamError as exc:
                writer.write(pg.error_response(exc.sqlstate, exc.text, severity="FATAL"))
                await writer.drain()
                return False
            except Exception:
                writer.write(
                    pg.error_response(
                        "53300",
                        f"database '{self.name}': no server connection free",
                        severity="FATAL",
                    )
                )
                await writer.drain()
                return False
            pool.release(conn)
        out = bytearray(pg.AUTH_OK_MESSAGE)
        for key, value in pool.server_params.items():
            if key == "application_name":
                continue
            out += pg.parameter_status(key, value)
        out += pg.parameter_status("application_name", session.agent)
        out += pg.backend_key_data(process_id, secret)
        out += pg.READY_IDLE
        writer.write(out)
        await writer.drain()
        return True

    async def close(self) -> None:
        await self.stop_listening()
        for task in list(self.background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.pool.close()


async def read_startup_rest(reader: asyncio.StreamReader, first: bytes) -> bytes:
    header = first + await reader.readexactly(3)
    length = int.from_bytes(header, "big")
    if length < 8 or length > pg.MAX_STARTUP:
        raise pg.ProtocolError(f"startup packet of length {length}")
    return header + await reader.readexactly(length - 4)


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
