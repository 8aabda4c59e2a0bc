"""The client side: one agent connection, from its first packet to its Terminate.

The agent logs in to the sidecar (any user on loopback, or its key/JWT as the
password when agents must prove who they are), then every message is relayed
to a server connection borrowed from the pool: for one transaction
(transaction mode) or the whole session (session mode).

One coroutine per agent reads the agent's messages, forwards them, and, when
the agent waits for answers (Sync, Query, Flush), reads the server's answers up
to the last one expected. `expected` lists, in order, the answers still owed
for what was sent: a server answer completes its head, and the sidecar's own
answers (refusals, a ParseComplete for a statement the server already has)
sit in the same line, so the agent gets every answer in the order it asked.

Named prepared statements are the agent's own: each is prepared on the server
under a name derived from its text, and prepared again on whichever server
connection later runs it (as pgbouncer 1.21+ does).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from . import protocol as pg
from .channel import Channel
from .pool import Pool, PoolTimeout
from .server import ServerConnection, UpstreamError

if TYPE_CHECKING:
    from .guard import Guard, Refusal
    from .telemetry import Operation

log = logging.getLogger("sidecar.databases")

# What an answer-owing message waits for (the head of `expected`).
PARSE = 1
PARSE_QUIET = 2  # a Parse the sidecar added: its ParseComplete is not the agent's
BIND = 3
DESCRIBE = 4
EXECUTE = 5
CLOSE = 6
READY = 7
CLOSE_QUIET = 8  # the sidecar's own Close of a statement it evicts
READY_QUIET = 9  # the Sync after those Closes
_QUIET = (PARSE_QUIET, CLOSE_QUIET, READY_QUIET)
# Statements kept prepared on one server connection; the least recently used beyond
# this are closed when an agent next borrows it, so the server's memory stays bounded.
MAX_PREPARED = 200

_COMPLETES = {
    pg.PARSE_COMPLETE: (PARSE, PARSE_QUIET),
    pg.BIND_COMPLETE: (BIND,),
    pg.ROW_DESCRIPTION: (DESCRIBE,),
    pg.NO_DATA: (DESCRIBE,),
    pg.COMMAND_COMPLETE: (EXECUTE,),
    pg.EMPTY_QUERY: (EXECUTE,),
    pg.PORTAL_SUSPENDED: (EXECUTE,),
    pg.CLOSE_COMPLETE: (CLOSE, CLOSE_QUIET),
    pg.READY_FOR_QUERY: (READY, READY_QUIET),
}
IDLE = ord("I")
STATEMENT_PREFIX = "sidecar_"
_TX_ONLY = frozenset({"transaction"})


class ServerLost(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Prepared:
    server_name: str
    query: str
    types: bytes


def server_name(query: str, types: bytes) -> str:
    digest = hashlib.blake2b(query.encode() + b"\0" + types, digest_size=10).hexdigest()
    return STATEMENT_PREFIX + digest


class Entry(Protocol):
    """What a session reads of the database it belongs to: entry.py's Entry, which makes
    the sessions (entry.py imports this module, so this module does not import it back).

    Read-only properties: the entry swaps its guard and settings on a reload, a session
    reads the current ones each time.
    """

    @property
    def name(self) -> str: ...

    @property
    def guard(self) -> Guard: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def max_rows(self) -> int: ...

    @property
    def background(self) -> set[asyncio.Task[None]]: ...

    def observe(
        self, agent: str, operation: Operation, sqlstate: str, rows: int, seconds: float
    ) -> None: ...


class Session:
    def __init__(
        self,
        entry: Entry,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        agent: str,
    ) -> None:
        self.entry = entry
        self.reader = reader
        self.writer = writer
        self.framer = pg.Framer()
        # The agent's transport, taken over from the streams once the relay starts.
        self.channel: Channel | None = None
        self.agent = agent
        self.server: ServerConnection | None = None
        self.tx_status = IDLE
        self.statements: dict[str, Prepared] = {}
        self.expected: deque[int | bytes] = deque()
        # Server-side names of the Parses sent and not yet answered ("" for unnamed).
        self.parsing: deque[str] = deque()
        self.out = bytearray()
        self.to_server = bytearray()
        self.skipping = False  # after a refusal in the extended protocol: until Sync
        self.synced = True  # the server got nothing since its last ReadyForQuery
        self.copy_in = False
        self.wait_server = False
        self.rows = 0
        self.cut = False  # max_rows reached: the rest of this result is dropped
        self.quiet_until_ready = False
        self.started: float | None = None
        self.operation: tuple[str, str | None, str] | None = None

    # -- the agent's messages ---------------------------------------------------------

    async def run(self) -> None:
        framer = self.framer
        channel = self.channel = Channel.take_over(self.reader, self.writer, framer)
        try:
            while True:
                while (msg := framer.next()) is not None:
                    kind, body, raw = msg
                    if kind == pg.TERMINATE:
                        return
                    try:
                        await self._message(kind, body, raw)
                    except ServerLost as exc:
                        self._lost(str(exc))
                await self._flush(channel)
                if not await channel.receive():
                    return
        except (ConnectionError, pg.ProtocolError, asyncio.IncompleteReadError):
            return
        finally:
            self._end()

    async def _flush(self, channel: Channel) -> None:
        """Send what the batch produced; read answers while the agent waits for them."""
        server = self.server
        if server is not None and self.to_server:
            server.send(self.to_server)
            self.to_server.clear()
        if server is not None and self.wait_server and self.expected:
            try:
                await self._read_server(server)
            except ServerLost as exc:
                self._lost(str(exc))
            except (ConnectionError, OSError, pg.ProtocolError):
                self._lost("")
        self.wait_server = False
        if self.out:
            channel.write(self.out)
            self.out.clear()
        self._maybe_release()
        # Only when the agent reads slower than the answers come (a large result).
        await channel.drain()

    async def _message(self, kind: int, body: bytes, raw: bytes) -> None:
        if self.skipping and kind != pg.SYNC:
            return
        if kind == pg.QUERY:
            sql, _ = pg.cstring(body, 0)
            refusal = self._judge(sql, count=True)
            if refusal is not None:
                self._own(_error(refusal))
                self._own(pg.ready_for_query(self.tx_status))
                return
            if not (self._held() or await self._attach(extended=False)):
                self._own(pg.ready_for_query(self.tx_status))
                return
            self._send(raw, READY)
            self.wait_server = True
        elif kind == pg.PARSE:
            await self._parse(body, raw)
        elif kind == pg.BIND:
            _portal, name, _ = pg.parse_bind(body)
            if not name:
                if self._held() or await self._attach():
                    self._send(raw, BIND)
                return
            prepared = self._known(name)
            if prepared is not None and await self._ready(prepared):
                self._send(pg.rename_bind(body, prepared.server_name), BIND)
        elif kind == pg.DESCRIBE:
            which, name = pg.parse_target(body)
            if which == ord("S") and name:
                prepared = self._known(name)
                if prepared is not None and await self._ready(prepared):
                    self._send(pg.target(pg.DESCRIBE, which, prepared.server_name), DESCRIBE)
            elif self._held() or await self._attach():
                self._send(raw, DESCRIBE)
        elif kind == pg.EXECUTE:
            refusal = self.entry.guard.take(self.agent)
            if refusal is not None:
                self._refuse(refusal)
            elif self._held() or await self._attach():
                self._begin()
                self._send(raw, EXECUTE)
        elif kind == pg.CLOSE:
            which, name = pg.parse_target(body)
            if which == ord("S") and name:
                # The server keeps it for whoever prepares the same text next.
                self.statements.pop(name, None)
                self._own(pg.message(pg.CLOSE_COMPLETE, b""))
            elif self._held() or await self._attach():
                self._send(raw, CLOSE)
        elif kind == pg.SYNC:
            self.skipping = False
            if self.server is None:
                self._own(pg.ready_for_query(self.tx_status))
            else:
                self._send(raw, READY)
                self.wait_server = True
        elif kind == pg.FLUSH:
            if self.server is not None:
                self.to_server += raw
                self.wait_server = True
        elif kind in (pg.COPY_DATA, pg.COPY_DONE, pg.COPY_FAIL):
            if self.copy_in and self.server is not None:
                self.to_server += raw
                if kind != pg.COPY_DATA:
                    self.copy_in = False
                    self.wait_server = True
        elif kind == pg.FUNCTION_CALL:
            # The fast-path call names a function by OID: no statement to judge.
            self._own(
                pg.error_response(
                    "42501", "function calls by OID (fast-path) are not allowed by the sidecar"
                )
            )
            self._own(pg.ready_for_query(self.tx_status))
        else:
            raise pg.ProtocolError(f"unexpected message {chr(kind)!r}")

    async def _parse(self, body: bytes, raw: bytes) -> None:
        name, query, types = pg.parse_parse(body)
        refusal = self._judge(query, count=False)
        if refusal is not None:
            self._refuse(refusal)
            return
        if not name:
            if self._held() or await self._attach():
                self._send(raw, PARSE)
                self.parsing.append("")
            return
        if name in self.statements:
            self._refuse_state("42P05", f'prepared statement "{name}" already exists')
            return
        prepared = Prepared(server_name(query, types), query, types)
        self.statements[name] = prepared
        if not (self._held() or await self._attach()):
            return
        server = self.server
        assert server is not None
        if server.knows(prepared.server_name):
            self._own(pg.message(pg.PARSE_COMPLETE, b""))
        else:
            server.remember(prepared.server_name)
            self._send(pg.rename_parse(prepared.server_name, query, types), PARSE)
            self.parsing.append(prepared.server_name)

    def _known(self, name: str) -> Prepared | None:
        prepared = self.statements.get(name)
        if prepared is None:
            self._refuse_state("26000", f'prepared statement "{name}" does not exist')
        return prepared

    async def _ready(self, prepared: Prepared) -> bool:
        """Attach a server and prepare the statement there first if it lacks it."""
        if not (self._held() or await self._attach()):
            return False
        server = self.server
        assert server is not None
        if not server.knows(prepared.server_name):
            server.remember(prepared.server_name)
            self._send(
                pg.rename_parse(prepared.server_name, prepared.query, prepared.types), PARSE_QUIET
            )
            self.parsing.append(prepared.server_name)
        return True

    def _judge(self, sql: str, *, count: bool) -> Refusal | None:
        guard = self.entry.guard
        statement, refusal = guard.judge(self.agent, sql)
        # BEGIN/COMMIT cost no token: a driver wraps each statement in them on its own.
        if refusal is None and count and (statement is None or statement.kinds != _TX_ONLY):
            refusal = guard.take(self.agent)
        if statement is not None:
            self.operation = (statement.operation, statement.collection, statement.normalized)
            if count:
                self._begin()
        if refusal is not None:
            self.entry.observe(self.agent, self.operation, refusal.sqlstate, 0, 0.0)
        return refusal

    def _begin(self) -> None:
        if self.started is None:
            self.started = time.perf_counter()

    def _refuse(self, refusal: Refusal) -> None:
        self._own(_error(refusal))
        self.skipping = True

    def _refuse_state(self, sqlstate: str, text: str) -> None:
        self._own(pg.error_response(sqlstate, text))
        self.skipping = True

    # -- the line of answers ----------------------------------------------------------

    def _send(self, raw: bytes, item: int) -> None:
        self.to_server += raw
        self.expected.append(item)
        self.synced = False

    def _own(self, answer: bytes) -> None:
        """An answer of the sidecar's own, in its place in the line."""
        if self.expected:
            self.expected.append(answer)
        else:
            self.out += answer

    def _advance(self) -> None:
        expected = self.expected
        while expected and isinstance(expected[0], bytes):
            self.out += expected.popleft()  # type: ignore[arg-type]

    def _held(self) -> bool:
        """Whether a server connection is held, or a free one was taken now: the common
        case costs no coroutine. Otherwise the caller awaits `_attach`."""
        if self.server is not None:
            return True
        server = self.entry.pool.take()
        if server is None:
            return False
        self._attached(server)
        return True

    async def _attach(self, *, extended: bool = True) -> bool:
        """Borrow a server connection, waiting for one; False (the agent told) if none came."""
        if self.server is not None:
            return True
        entry = self.entry
        try:
            server = await entry.pool.acquire()
        except PoolTimeout:
            wait = entry.pool.config.wait_timeout
            self._own_failure(
                "53400",
                f"every server connection of database '{entry.name}' stayed busy for "
                f"{wait:g}s (pool size {entry.pool.config.size})",
                "Retry in a few seconds; the sidecar's pool is full, not the database.",
            )
            self.skipping = extended
            return False
        except UpstreamError as exc:
            self._own_failure(exc.sqlstate, exc.text, "Retry later.")
            self.skipping = extended
            return False
        self._attached(server)
        return True

    def _attached(self, server: ServerConnection) -> None:
        self.server = server
        self.tx_status = IDLE
        evicted = server.overflow(MAX_PREPARED)
        if evicted:
            # Nothing of this agent is on the connection yet: no portal of an evicted
            # statement can be open.
            for name in evicted:
                self._send(pg.target(pg.CLOSE, ord("S"), name), CLOSE_QUIET)
            self._send(pg.SYNC_MESSAGE, READY_QUIET)

    def _own_failure(self, sqlstate: str, text: str, hint: str) -> None:
        self._own(pg.error_response(sqlstate, text, hint=hint))
        self.entry.observe(self.agent, self.operation, sqlstate, 0, 0.0)

    async def _read_server(self, server: ServerConnection) -> None:
        framer = server.framer
        expected = self.expected
        out = self.out
        max_rows = self.entry.max_rows
        while expected:
            msg = framer.next()
            if msg is None:
                if len(out) > 16384:
                    channel = self.channel
                    assert channel is not None
                    channel.write(out)
                    out.clear()
                    await channel.drain()
                if not await server.receive():
                    raise ServerLost()
                continue
            kind, body, raw = msg
            if kind == pg.DATA_ROW:
                self.rows += 1
                if not self.cut and not self.quiet_until_ready:
                    if max_rows and self.rows > max_rows:
                        self.cut = True
                        # Stop the server too, rather than relay and drop the rest. A
                        # late cancel finds this backend idle (the pool hands it on only
                        # once the server has taken the cancel): it then does nothing.
                        self.cancel()
                    else:
                        out += raw
                continue
            if self.quiet_until_ready and kind != pg.READY_FOR_QUERY:
                continue
            head = expected[0]
            if kind == pg.ERROR_RESPONSE:
                fields = pg.parse_fields(body)
                if fields.get("V", fields.get("S")) in ("FATAL", "PANIC"):
                    # The server is closing this connection (a shutdown, a terminated
                    # backend): the agent is told once, below, and keeps its own session.
                    raise ServerLost(fields.get("M", ""))
                if self.cut:
                    # The cancel asked for above (57014), or another error past the limit.
                    self._stop_result(out)
                    continue
                out += raw
                self._failed(fields)
                continue
            if kind == pg.COMMAND_COMPLETE and self.cut:
                self._stop_result(out)
                continue
            completes = _COMPLETES.get(kind)
            if completes is not None and head in completes:
                expected.popleft()
                if kind == pg.PARSE_COMPLETE:
                    self.parsing.popleft()
                if kind == pg.READY_FOR_QUERY:
                    self.tx_status = body[0]
                    # The sidecar's own Sync settles only what was sent before it.
                    self.synced = head == READY or not expected
                    if head == READY:
                        self.quiet_until_ready = False
                        self._done()
                if head not in _QUIET:
                    out += raw
                if kind in (pg.COMMAND_COMPLETE, pg.PORTAL_SUSPENDED):
                    self._result_done()
                self._advance()
                continue
            if kind == pg.ROW_DESCRIPTION:
                self.rows = 0
            elif kind == pg.COMMAND_COMPLETE:
                self._result_done()
            out += raw
            if kind == pg.COPY_IN:
                self.copy_in = True
                return

    def _failed(self, fields: dict[str, str]) -> None:
        """After an error the server skips everything up to the next Sync."""
        self._skip_to_ready()
        self.entry.observe(
            self.agent, self.operation, fields.get("C", "XX000"), self.rows, self._elapsed()
        )
        self.started = None
        self.rows = 0
        self.cut = False

    def _skip_to_ready(self) -> None:
        """Drop what the server will not answer (it skips to the next Sync after an error);
        the Parses among them prepared nothing on this connection."""
        expected = self.expected
        server = self.server
        while expected and expected[0] not in (READY, READY_QUIET):
            item = expected.popleft()
            if item in (PARSE, PARSE_QUIET):
                name = self.parsing.popleft()
                if server is not None:
                    server.prepared.pop(name, None)

    def _stop_result(self, out: bytearray) -> None:
        limit = self.entry.max_rows
        out += pg.error_response(
            "53400",
            f"the result was stopped after {limit} rows: database '{self.entry.name}' returns "
            f"at most max_rows = {limit} rows per statement",
            hint="Ask for fewer rows (add LIMIT or a narrower WHERE) or page with "
            "LIMIT/OFFSET or a keyset.",
        )
        self.entry.observe(self.agent, self.operation, "53400", limit or 0, self._elapsed())
        self.started = None
        self._skip_to_ready()
        # The agent now expects nothing but ReadyForQuery: the server's other answers
        # to this batch (later statements' results) are dropped.
        self.quiet_until_ready = True
        self.rows = 0
        self.cut = False

    def _result_done(self) -> None:
        self.entry.observe(self.agent, self.operation, "00000", self.rows, self._elapsed())
        self.started = None
        self.rows = 0

    def _done(self) -> None:
        self.started = None
        self.rows = 0
        self.cut = False

    def _elapsed(self) -> float:
        return time.perf_counter() - self.started if self.started is not None else 0.0

    # -- the server connection --------------------------------------------------------

    def _maybe_release(self) -> None:
        server = self.server
        if (
            server is not None
            and self.entry.pool.config.mode == "transaction"
            and self.synced
            and not self.expected
            and self.tx_status == IDLE
            and not self.copy_in
        ):
            self.server = None
            self.entry.pool.release(server)

    def _lost(self, said: str) -> None:
        """The server connection died: the agent is told, and may go on with a new one."""
        server = self.server
        self.server = None
        if server is not None:
            self.entry.pool.release(server, reusable=False)
        self.expected.clear()
        self.parsing.clear()
        self.to_server.clear()
        self.quiet_until_ready = self.cut = self.copy_in = False
        self.skipping = False
        self.synced = True
        self.tx_status = IDLE
        self.out += pg.error_response(
            "08006",
            f"the connection between the sidecar and database '{self.entry.name}' was lost; "
            "the statement and its transaction (if any) did not complete",
            hint="Retry the transaction: the next statement gets a new server connection.",
            detail=f"The database server said: {said}" if said else None,
        )
        self.entry.observe(self.agent, self.operation, "08006", 0, self._elapsed())
        self.started = None
        self.out += pg.ready_for_query(IDLE)

    def _end(self) -> None:
        server = self.server
        self.server = None
        if server is None:
            return
        clean = self.synced and not self.expected and self.tx_status == IDLE
        if clean and self.entry.pool.config.mode == "session":
            task = asyncio.get_running_loop().create_task(_reset(self.entry, server))
            self.entry.background.add(task)
            task.add_done_callback(self.entry.background.discard)
            return
        self.entry.pool.release(server, reusable=clean)

    def cancel(self) -> None:
        """A CancelRequest of this agent: forwarded to the server it has now, if any."""
        server = self.server
        if server is None or server.cancelling is not None:
            return
        from .server import cancel

        server.cancelling = asyncio.get_running_loop().create_task(
            cancel(server.settings, server.process_id, server.secret)
        )


async def _reset(entry: Entry, server: ServerConnection) -> None:
    """Session mode: DISCARD ALL before the next agent gets the connection."""
    try:
        await server.simple("DISCARD ALL")
    except (UpstreamError, OSError, ConnectionError, pg.ProtocolError):
        entry.pool.release(server, reusable=False)
        return
    server.prepared.clear()
    entry.pool.release(server)


def _error(refusal: Refusal) -> bytes:
    return pg.error_response(refusal.sqlstate, refusal.message, hint=refusal.hint)
