"""The server side: one connection to the real PostgreSQL, opened and logged in by the sidecar.

The sidecar authenticates upstream itself (SCRAM-SHA-256 through `scramp`, md5,
cleartext), because SCRAM channel binding cannot be relayed through a proxy and
agents must never hold the password. TLS follows libpq's sslmode meanings.
Errors never carry the password: they say which step failed and the server's
SQLSTATE and message.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..policy.databases import Database
from ..policy.secrets import Secret
from . import protocol as pg
from .channel import Channel

CONNECT_TIMEOUT = 10.0


class UpstreamError(Exception):
    """The server could not be reached or refused the login; `sqlstate` is for the agent."""

    def __init__(self, sqlstate: str, text: str) -> None:
        super().__init__(text)
        self.sqlstate = sqlstate
        self.text = text


@dataclass(frozen=True, slots=True, repr=False)
class Settings:
    """How to open a server connection; `generation` changes when old ones must go.

    Its repr names the server only: `key` holds a private key, `password` a secret.
    """

    host: str
    port: int
    database: str
    user: str
    password: Secret | None
    tls_mode: str
    ca: str | None
    cert: str | None
    key: str | None
    startup: Mapping[str, str]
    generation: str = field(default="")

    def __repr__(self) -> str:
        return f"Settings({self.user}@{self.host}:{self.port}/{self.database})"

    @classmethod
    def of(cls, name: str, db: Database) -> Settings:
        target = db.target
        startup = {"application_name": f"agent-sidecar/{name}"}
        if db.read_only:
            startup["default_transaction_read_only"] = "on"
        if db.statement_timeout is not None:
            startup["statement_timeout"] = str(max(1, round(db.statement_timeout * 1000)))
        tls = db.tls
        parts = (
            target.host,
            str(target.port),
            target.database,
            db.auth.username,
            tls.mode,
            repr(sorted(startup.items())),
        )
        return cls(
            host=target.host,
            port=target.port,
            database=target.database,
            user=db.auth.username,
            password=db.auth.password,
            tls_mode=tls.mode,
            ca=tls.ca.reveal() if tls.ca else None,
            cert=tls.cert.reveal() if tls.cert else None,
            key=tls.key.reveal() if tls.key else None,
            startup=startup,
            # The password is not part of it: a rotated one is used by new connections
            # while the ones logged in with the old one go on serving.
            generation=hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16],
        )


def _tls_context(settings: Settings) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    verify = settings.tls_mode in ("verify-ca", "verify-full") or (
        settings.tls_mode == "require" and settings.ca is not None
    )
    if verify:
        ctx.check_hostname = settings.tls_mode == "verify-full"
        ctx.verify_mode = ssl.CERT_REQUIRED
        if settings.ca is not None:
            ctx.load_verify_locations(cadata=settings.ca)
        else:
            ctx.load_default_certs()
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if settings.cert is not None and settings.key is not None:
        _load_client_cert(ctx, settings.cert, settings.key)
    return ctx


def _load_client_cert(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    # ssl loads a chain only from files: a private temporary file, removed at once.
    import os
    import tempfile

    fd, path = tempfile.mkstemp(prefix="sidecar-pg-")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(cert.rstrip() + "\n" + key.rstrip() + "\n")
        ctx.load_cert_chain(path)
    finally:
        os.unlink(path)


class ServerConnection:
    """A logged-in server connection and what the pool and the relay know of it."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: Settings
    ) -> None:
        self.reader = reader
        self.writer = writer
        # Made after TLS is set up: the transport the relay writes to.
        self.transport = writer.transport
        self.settings = settings
        self.generation = settings.generation
        self.process_id = 0
        self.secret = 0
        self.params: dict[str, str] = {}
        self.created = self.last_used = time.monotonic()
        # Server-side names of the statements prepared on this connection, least
        # recently used first (a dict keeps insertion order).
        self.prepared: dict[str, None] = {}
        # A cancel forwarded while this connection served an agent: the pool waits for
        # it before handing the connection to anyone else.
        self.cancelling: asyncio.Task[None] | None = None
        self.tls = False
        # Every read from the server goes through this one framer, so no byte is lost
        # between the login, the relay and the pool's probes.
        self.framer = pg.Framer()
        # Once logged in, the transport's protocol (see channel.py): reads and writes go
        # through it, not through reader and writer.
        self.channel: Channel | None = None

    async def receive(self) -> bool:
        """Wait for more of the server's bytes in `framer`; False once it closed."""
        channel = self.channel
        if channel is not None:
            return await channel.receive()
        data = await self.reader.read(65536)
        if not data:
            return False
        self.framer.feed(data)
        return True

    def send(self, data: bytes | bytearray) -> None:
        self.transport.write(data)

    async def drain(self) -> None:
        channel = self.channel
        if channel is not None:
            await channel.drain()
        else:
            await self.writer.drain()

    def knows(self, name: str) -> bool:
        """Whether the statement is prepared here; a use makes it the most recent."""
        prepared = self.prepared
        if name not in prepared:
            return False
        del prepared[name]
        prepared[name] = None
        return True

    def remember(self, name: str) -> None:
        self.prepared[name] = None

    def overflow(self, most: int) -> list[str]:
        """The least recently used statements past `most`, forgotten here."""
        extra = len(self.prepared) - most
        if extra <= 0:
            return []
        names = list(self.prepared)[:extra]
        for name in names:
            del self.prepared[name]
        return names

    @property
    def healthy(self) -> bool:
        """Nothing arrived while idle (a FATAL before a shutdown) and the socket is open."""
        channel = self.channel
        if channel is None or channel.closed or self.transport.is_closing():
            return False
        return not self.framer.pending

    def close(self) -> None:
        if not self.writer.is_closing():
            with contextlib.suppress(Exception):
                self.writer.write(pg.TERMINATE_MESSAGE)
            self.writer.close()

    async def read_until_ready(self) -> list[tuple[int, bytes]]:
        """Read messages up to ReadyForQuery; raise UpstreamError on an ErrorResponse."""
        framer = self.framer
        out: list[tuple[int, bytes]] = []
        error: dict[str, str] | None = None
        while True:
            while (msg := framer.next()) is not None:
                kind, body, _ = msg
                if kind == pg.READY_FOR_QUERY:
                    if error is not None:
                        raise UpstreamError(error.get("C", "XX000"), error.get("M", ""))
                    return out
                if kind == pg.ERROR_RESPONSE:
                    error = pg.parse_fields(body)
                else:
                    out.append((kind, body))
            if not await self.receive():
                raise UpstreamError("08006", "the database server closed the connection")

    async def simple(self, sql: str) -> list[tuple[int, bytes]]:
        """Run one simple query to its end (reset, health probes); the messages it got."""
        self.send(pg.query(sql))
        await self.drain()
        return await self.read_until_ready()


async def connect(settings: Settings) -> ServerConnection:
    try:
        return await asyncio.wait_for(_connect(settings), CONNECT_TIMEOUT)
    except TimeoutError:
        raise UpstreamError(
            "08001", f"the database server {settings.host}:{settings.port} did not answer in time"
        ) from None
    except ssl.SSLError as exc:
        raise UpstreamError("08001", f"TLS to the database server failed: {exc.reason}") from None
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise UpstreamError(
            "08001",
            f"cannot connect to the database server {settings.host}:{settings.port}: {reason}",
        ) from None


async def _connect(settings: Settings) -> ServerConnection:
    reader, writer = await asyncio.open_connection(settings.host, settings.port)
    tls = False
    try:
        if settings.tls_mode not in ("disable", "allow"):
            writer.write(pg.ssl_request())
            await writer.drain()
            answer = await reader.readexactly(1)
            if answer == b"S":
                await writer.start_tls(
                    _tls_context(settings),
                    server_hostname=settings.host if settings.tls_mode == "verify-full" else None,
                )
                tls = True
            elif settings.tls_mode != "prefer":
                raise UpstreamError(
                    "08001", f"sslmode {settings.tls_mode}: the database server does not offer TLS"
                )
        conn = ServerConnection(reader, writer, settings)
        conn.tls = tls
        params = {"user": settings.user, "database": settings.database, **settings.startup}
        writer.write(pg.startup_message(params))
        await writer.drain()
        await _authenticate(conn)
        for kind, body in await conn.read_until_ready():
            if kind == pg.PARAMETER_STATUS:
                key, offset = pg.cstring(body, 0)
                conn.params[key], _ = pg.cstring(body, offset)
            elif kind == pg.BACKEND_KEY_DATA:
                conn.process_id = int.from_bytes(body[:4], "big")
                conn.secret = int.from_bytes(body[4:8], "big")
        conn.channel = Channel.take_over(reader, writer, conn.framer)
        return conn
    except BaseException:
        writer.close()
        raise


async def _next_auth(conn: ServerConnection) -> tuple[int, bytes]:
    framer = conn.framer
    while True:
        msg = framer.next()
        if msg is not None:
            kind, body, _ = msg
            if kind == pg.ERROR_RESPONSE:
                fields = pg.parse_fields(body)
                code = fields.get("C", "28000")
                raise UpstreamError(
                    code, f"the database server refused the sidecar's login: {fields.get('M', '')}"
                )
            if kind == pg.AUTHENTICATION:
                return pg.parse_auth(body)
            if kind == pg.NOTICE_RESPONSE:
                continue
            raise UpstreamError("08P01", f"unexpected message {chr(kind)!r} during login")
        if not await conn.receive():
            raise UpstreamError("08006", "the database server closed the connection during login")


async def _authenticate(conn: ServerConnection) -> None:
    settings = conn.settings
    password = settings.password.reveal() if settings.password is not None else None

    def need_password() -> str:
        if password is None:
            raise UpstreamError(
                "28P01", "the database server asks for a password: set auth.password"
            )
        return password

    while True:
        code, data = await _next_auth(conn)
        if code == pg.AUTH_OK:
            return
        if code == pg.AUTH_CLEARTEXT:
            if (
                settings.tls_mode != "disable"
                and not conn.tls
                and settings.host
                not in (
                    "127.0.0.1",
                    "::1",
                    "localhost",
                )
            ):
                raise UpstreamError(
                    "28000", "the database server asks for a cleartext password without TLS"
                )
            conn.writer.write(pg.password_message(need_password().encode() + b"\0"))
        elif code == pg.AUTH_MD5:
            inner = hashlib.md5((need_password() + settings.user).encode()).hexdigest()
            outer = hashlib.md5(inner.encode() + data[:4]).hexdigest()
            conn.writer.write(pg.password_message(b"md5" + outer.encode() + b"\0"))
        elif code == pg.AUTH_SASL:
            await _scram(conn, pg.sasl_mechanisms(data), need_password())
        else:
            raise UpstreamError(
                "28000",
                f"the database server asks for an authentication the sidecar lacks ({code})",
            )
        await conn.writer.drain()


async def _scram(conn: ServerConnection, mechanisms: list[str], password: str) -> None:
    from scramp import ScramClient, ScramException  # type: ignore[import-untyped]

    if "SCRAM-SHA-256" not in mechanisms:
        raise UpstreamError("28000", f"no SASL mechanism the sidecar knows among {mechanisms}")
    try:
        client = ScramClient(["SCRAM-SHA-256"], conn.settings.user, password)
        conn.writer.write(
            pg.sasl_initial_response("SCRAM-SHA-256", client.get_client_first().encode())
        )
        await conn.writer.drain()
        code, data = await _next_auth(conn)
        if code != pg.AUTH_SASL_CONTINUE:
            raise UpstreamError("08P01", "SCRAM: the server skipped its first message")
        client.set_server_first(data.decode())
        conn.writer.write(pg.password_message(client.get_client_final().encode()))
        await conn.writer.drain()
        code, data = await _next_auth(conn)
        if code != pg.AUTH_SASL_FINAL:
            raise UpstreamError("08P01", "SCRAM: the server skipped its final message")
        client.set_server_final(data.decode())
    except ScramException:
        raise UpstreamError("28000", "SCRAM: the server's proof is wrong") from None


async def cancel(settings: Settings, process_id: int, secret: int) -> None:
    """Send a CancelRequest and wait until the server has taken it (it closes the socket)."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(settings.host, settings.port), CONNECT_TIMEOUT
        )
    except (OSError, TimeoutError):
        return
    try:
        writer.write(pg.cancel_request(process_id, secret))
        await writer.drain()
        await asyncio.wait_for(reader.read(1), CONNECT_TIMEOUT)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
