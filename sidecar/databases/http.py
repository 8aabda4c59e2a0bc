"""The HTTP face: `POST /_db/<name>/query` on egress, for tools that have no driver.

`{"sql": "...", "params": [...]}` in, JSON rows out: column names and types,
the rows, and `truncated` when max_rows cut the result. The same Guard (rules,
rate limits), pool and telemetry as the wire; refusals are problem+json.
One statement per call, run with the extended protocol, so parameters are
never spliced into the text.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

from ..core.problems import ProblemError, problem_parts
from ..core.reasons import Reason
from ..http.listener import Request, Response

if TYPE_CHECKING:
    from .entry import Entry
    from .hub import DatabaseHub
    from .server import ServerConnection

PREFIX = "/_db/"
MAX_BODY = 1 << 20

# Type names of the common OIDs (pg_type), and how their text form becomes JSON.
_TYPES = {
    16: "bool",
    17: "bytea",
    20: "int8",
    21: "int2",
    23: "int4",
    25: "text",
    114: "json",
    700: "float4",
    701: "float8",
    1043: "varchar",
    1082: "date",
    1114: "timestamp",
    1184: "timestamptz",
    1700: "numeric",
    2950: "uuid",
    3802: "jsonb",
}
_INTS = frozenset({20, 21, 23})
_FLOATS = frozenset({700, 701})
_JSON = frozenset({114, 3802})


def _value(raw: bytes | None, oid: int) -> Any:
    if raw is None:
        return None
    text = raw.decode("utf-8", "replace")
    if oid in _INTS:
        return int(text)
    if oid in _FLOATS:
        return float(text)
    if oid == 16:
        return text == "t"
    if oid in _JSON:
        return json.loads(text)
    # numeric stays text: a JSON number would lose its precision.
    return text


def _problem(reason: str, detail: str, service: str, retry_after: float | None = None) -> Response:
    status, headers, body = problem_parts(
        ProblemError(reason, detail, service=service, retry_after=retry_after), service
    )
    return Response(status=status, headers=headers, body=body)


def _json(status: int, document: dict[str, Any]) -> Response:
    body = json.dumps(document, separators=(",", ":"), default=str).encode()
    return Response(status=status, headers=[("Content-Type", "application/json")], body=body)


class DatabaseHttp:
    """The egress app for /_db/..."""

    def __init__(self, hub: DatabaseHub, agent_header: str = "X-Agent-Id") -> None:
        self.hub = hub
        self.agent_header = agent_header

    async def __call__(self, request: Request) -> Response:
        path = request.target.partition("?")[0][len(PREFIX) :]
        name, _, rest = path.partition("/")
        service = f"_db/{name}"
        entry = self.hub.entries.get(name)
        if entry is None or rest != "query":
            return _problem(
                Reason.no_route,
                f"No database is configured at {request.target.partition('?')[0]!r}; post to "
                "/_db/<database>/query with a database the policy defines.",
                service,
            )
        if request.method != "POST":
            return _problem(
                Reason.method_not_allowed, "POST a JSON {sql, params} to this path.", service
            )
        agent = await self._agent(request, service)
        if isinstance(agent, Response):
            return agent
        from ..webhooks.listener import read_limited

        raw = await read_limited(request.body, MAX_BODY)
        try:
            document = json.loads(raw)
            sql = document["sql"]
            params = document.get("params", [])
            if not isinstance(sql, str) or not isinstance(params, list):
                raise TypeError
        except (ValueError, KeyError, TypeError, AttributeError):
            return _problem(
                Reason.bad_request,
                'Send a JSON object {"sql": "SELECT ...", "params": [...]} ($1, $2 in the SQL '
                "are the params, in order).",
                service,
            )
        statement, refusal = entry.guard.judge(agent, sql)
        if refusal is None and statement is not None and statement.count != 1:
            return _problem(Reason.bad_request, "Send one statement per call.", service)
        if refusal is None:
            refusal = entry.guard.take(agent)
        operation = (
            (statement.operation, statement.collection, statement.normalized)
            if statement is not None
            else None
        )
        if refusal is not None:
            entry.observe(agent, operation, refusal.sqlstate, 0, 0.0)
            detail = refusal.message + (f" {refusal.hint}" if refusal.hint else "")
            return _problem(refusal.reason, detail, service, refusal.retry_after)
        texts = [
            None if p is None else json.dumps(p) if isinstance(p, dict | list) else _text(p)
            for p in params
        ]
        return await self._run(entry, agent, operation, sql, texts, service)

    async def _agent(self, request: Request, service: str) -> str | Response:
        credentials = self.hub.credentials
        if credentials is None:
            return request.headers.get(self.agent_header) or "anonymous"
        from ..engines.identity import KeysUnavailable, Refused

        presented = request.headers.get(credentials.header, "").strip()
        try:
            if not presented:
                raise Refused(f"send your credential in the {credentials.header} header")
            return await credentials.identify(presented)
        except Refused as exc:
            return _problem(
                Reason.unauthenticated,
                f"Database {service} needs a verified agent identity and this call has none: "
                f"{exc}.",
                service,
            )
        except KeysUnavailable:
            return _problem(
                Reason.auth_failed, "The sidecar could not fetch agents' keys.", service
            )

    async def _run(
        self,
        entry: Entry,
        agent: str,
        operation: tuple[str, str | None, str] | None,
        sql: str,
        params: list[str | None],
        service: str,
    ) -> Response:
        # Only a sidecar with databases gets here: the wire protocol is imported then.
        from . import protocol as pg
        from .pool import PoolTimeout
        from .server import UpstreamError

        started = time.perf_counter()
        try:
            conn = await entry.pool.acquire()
        except PoolTimeout:
            return _problem(
                Reason.rate_limited,
                f"Every server connection of database '{entry.name}' stayed busy.",
                service,
                retry_after=1.0,
            )
        except UpstreamError as exc:
            return _problem(Reason.upstream_unreachable, exc.text, service)
        limit = entry.max_rows
        conn.send(
            pg.parse("", sql)
            + pg.bind("", "", params)
            + pg.target(pg.DESCRIBE, ord("P"), "")
            + pg.execute("", limit)
            + pg.SYNC_MESSAGE
        )
        try:
            result = await _collect(conn)
        except (OSError, ConnectionError, pg.ProtocolError, UpstreamError):
            entry.pool.release(conn, reusable=False)
            entry.observe(agent, operation, "08006", 0, time.perf_counter() - started)
            return _problem(
                Reason.upstream_unreachable,
                f"The connection to database '{entry.name}' was lost; retry.",
                service,
            )
        status, columns, rows, truncated, command, error = result
        entry.pool.release(conn, reusable=status == ord("I"))
        elapsed = time.perf_counter() - started
        if error is not None:
            code = error.get("C", "XX000")
            entry.observe(agent, operation, code, 0, elapsed)
            return _json(
                400,
                {
                    "error": {
                        "sqlstate": code,
                        "message": error.get("M", ""),
                        "database": entry.name,
                    }
                },
            )
        entry.observe(agent, operation, "00000", len(rows), elapsed)
        return _json(
            200,
            {
                "columns": [{"name": n, "type": _TYPES.get(oid, str(oid))} for n, oid in columns],
                "rows": [[_value(v, columns[i][1]) for i, v in enumerate(r)] for r in rows],
                "row_count": len(rows),
                "truncated": truncated,
                "command": command,
            },
        )


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _collect(
    conn: ServerConnection,
) -> tuple[int, list[tuple[str, int]], list[list[bytes | None]], bool, str, dict[str, str] | None]:
    from . import protocol as pg
    from .server import UpstreamError

    framer = conn.framer
    columns: list[tuple[str, int]] = []
    rows: list[list[bytes | None]] = []
    truncated = False
    command = ""
    error: dict[str, str] | None = None
    while True:
        msg = framer.next()
        if msg is None:
            if not await conn.receive():
                raise ConnectionError("closed")
            continue
        kind, body, _ = msg
        if kind == pg.DATA_ROW:
            rows.append(pg.parse_data_row(body))
        elif kind == pg.ROW_DESCRIPTION:
            columns = pg.parse_row_description(body)
        elif kind == pg.PORTAL_SUSPENDED:
            truncated = True
        elif kind == pg.COMMAND_COMPLETE:
            command, _ = pg.cstring(body, 0)
        elif kind == pg.ERROR_RESPONSE:
            error = pg.parse_fields(body)
            if error.get("V", error.get("S")) in ("FATAL", "PANIC"):
                raise UpstreamError(error.get("C", "57P01"), error.get("M", ""))
        elif kind == pg.READY_FOR_QUERY:
            return body[0], columns, rows, truncated, command, error
