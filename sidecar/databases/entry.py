"""One `databases:` entry as the running sidecar holds it: its listener, pool and guard.

Imported by the hub when a policy first declares a database, so a sidecar without
`databases:` loads neither the PostgreSQL wire protocol, the pool nor the SQL rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..policy.databases import Database
from . import protocol as pg
from .client import Session
from .guard import Guard
from .pool import Pool
from .server import Settings, UpstreamError
from .telemetry import DatabaseTelemetry, Operation

if TYPE_CHECKING:
    from ..engines.identity import Credentials

log = logging.getLogger("sidecar.databases")


class Hub(Protocol):
    """What an entry reads of the hub that holds it (hub.py imports this module)."""

    telemetry: DatabaseTelemetry
    credentials: Credentials | None

    def register(self, entry: Entry, session: Session) -> tuple[int, int]: ...

    def unregister(self, process_id: int) -> None: ...

    def cancel(self, process_id: int, secret: int) -> None: ...


class Entry:
    """One database as the running sidecar holds it."""

    def __init__(self, hub: Hub, name: str, config: Database) -> None:
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
