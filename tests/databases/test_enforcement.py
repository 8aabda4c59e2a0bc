"""Policy on the wire: refused statements, read-only, max_rows, rate limits, agent keys,
and the password on no surface (the canary)."""

from __future__ import annotations

import hashlib
from typing import Any

import aiohttp
import asyncpg
import psycopg
import pytest

from tests.conftest import RunningSidecar

from .pg_server import DATABASE, PASSWORD, USER, PostgresServer


def policy(pg: PostgresServer, keys: str = "", **settings: str) -> str:
    lines = "".join(f"\n            {k}: {v}" for k, v in settings.items())
    return f"""
        version: 1
        {keys}
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{pg.port}/{DATABASE}
            tls: {{mode: prefer}}
            auth: {{username: {USER}, password: {PASSWORD}}}
            pool: {{size: 4}}{lines}
        """


def dsn(running: RunningSidecar, agent: str = "research-1", password: str = "x") -> str:
    host, port = running.sidecar.databases.address("shop")
    return f"postgresql://{agent}:{password}@{host}:{port}/{DATABASE}"


@pytest.fixture(scope="module", autouse=True)
def writer_function(postgres: PostgresServer) -> None:
    # A write the statement parser cannot see: it only sees SELECT of a function.
    postgres.psql(
        "CREATE OR REPLACE FUNCTION bump() RETURNS int LANGUAGE sql AS "
        "$$ UPDATE orders SET amount = amount + 1 WHERE id = 1 RETURNING 1 $$;"
        f"ALTER FUNCTION bump() OWNER TO {USER}"
    )


async def test_a_drop_hidden_after_commit_is_refused_whole(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(
        policy(
            postgres,
            read_only="true",
            allow="[{agents: [research-*], tables: [public.orders], statements: [select]}]",
        )
    )
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        for sql in (
            "SELECT 1; COMMIT; DROP TABLE orders",
            "WITH gone AS (DELETE FROM orders RETURNING *) SELECT * FROM gone",
            "SELECT pg_read_file('/etc/passwd')",
        ):
            with pytest.raises(psycopg.Error) as refused:
                await conn.execute(sql)
            # 42501 forbidden, or 25006 for a write on a read-only database.
            assert refused.value.diag.sqlstate in ("42501", "25006"), sql
        # The session goes on; the table is still there.
        cur = await conn.execute("SELECT count(*) FROM orders")
        assert await cur.fetchone() == (500,)
    # The extended protocol (asyncpg prepares everything) is judged alike.
    conn2 = await asyncpg.connect(dsn(running))
    try:
        with pytest.raises(asyncpg.exceptions.PostgresError) as err:
            await conn2.fetch("SELECT * FROM pg_authid")
        assert err.value.sqlstate == "42501"
        assert await conn2.fetchval("SELECT count(*) FROM orders WHERE id < $1", 3) == 2
    finally:
        await conn2.close()
    assert postgres.psql("SELECT count(*) FROM orders").strip() == "500"


async def test_read_only_holds_for_a_write_the_parser_lets_through(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, read_only="true"))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            await conn.execute("SELECT bump()")
        with pytest.raises(psycopg.Error) as undo:
            await conn.execute("SET default_transaction_read_only = off")
        assert undo.value.diag.sqlstate in ("42501", "25006")
    assert postgres.psql("SELECT amount FROM orders WHERE id = 1").strip() == "1.5"


async def test_max_rows_stops_a_result_with_a_clear_error(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, max_rows="100"))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        with pytest.raises(psycopg.Error, match="stopped after 100 rows") as err:
            await conn.execute("SELECT * FROM orders")
        assert err.value.diag.sqlstate == "53400"
        cur = await conn.execute("SELECT id FROM orders LIMIT 100")
        assert len(await cur.fetchall()) == 100
    conn2 = await asyncpg.connect(dsn(running))
    try:
        with pytest.raises(asyncpg.exceptions.PostgresError, match="max_rows"):
            await conn2.fetch("SELECT * FROM orders WHERE id > $1", 0)
        assert await conn2.fetchval("SELECT 7") == 7
    finally:
        await conn2.close()


async def test_rate_limit_refuses_with_53400_and_a_retry_hint(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(
        policy(postgres, rate_limit="[{rate: 2/min, burst: 2, per: agent}]")
    )
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        await conn.execute("SELECT 1")
        await conn.execute("SELECT 2")
        with pytest.raises(psycopg.Error) as err:
            await conn.execute("SELECT 3")
        assert err.value.diag.sqlstate == "53400"
        assert "Retry after" in (err.value.diag.message_hint or "")
    # Another agent has its own bucket.
    async with await psycopg.AsyncConnection.connect(dsn(running, "other")) as conn:
        await conn.execute("SELECT 1")


async def test_agent_keys_the_password_must_be_the_agents_key(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    digest = hashlib.sha256(b"key-of-research").hexdigest()
    keys = f"agents: {{keys: {{research-1: 'sha256:{digest}'}}}}"
    running = await start_sidecar(policy(postgres, keys=keys))
    with pytest.raises(psycopg.OperationalError) as err:
        await psycopg.AsyncConnection.connect(dsn(running, "research-1", "wrong"))
    assert "28P01" in str(err.value) or "verified agent identity" in str(err.value)
    async with await psycopg.AsyncConnection.connect(
        dsn(running, "whoever", "key-of-research"), autocommit=True
    ) as conn:
        cur = await conn.execute("SELECT current_setting('application_name')")
        assert await cur.fetchone() is not None


async def test_the_password_is_on_no_surface(
    postgres: PostgresServer, start_sidecar: Any, caplog: pytest.LogCaptureFixture
) -> None:
    running = await start_sidecar(policy(postgres, read_only="true"))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        await conn.execute("SELECT * FROM orders WHERE id = 1")
        with pytest.raises(psycopg.Error) as err:
            await conn.execute("DROP TABLE orders")
        assert PASSWORD not in str(err.value)
    seen = [caplog.text]
    async with aiohttp.ClientSession() as http:
        for path in ("/databases", "/config", "/metrics", "/services"):
            async with http.get(running.admin + path) as resp:
                seen.append(await resp.text())
    databases = seen[1]
    assert '"shop"' in databases and "in_use" in databases
    assert "sidecar_db_queries" in seen[3]
    for text in seen:
        assert PASSWORD not in text


async def test_the_http_face_answers_json_rows_and_refuses_with_problem_json(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(
        policy(
            postgres,
            read_only="true",
            max_rows="50",
            allow="[{agents: [research-*], tables: [public.orders], statements: [select]}]",
        )
    )
    url = f"{running.url}/_db/shop/query"
    agent = {"X-Agent-Id": "research-1"}
    async with aiohttp.ClientSession() as http:
        sql = "SELECT id, item, amount FROM orders WHERE id <= $1 ORDER BY id"
        async with http.post(url, json={"sql": sql, "params": [2]}, headers=agent) as resp:
            assert resp.status == 200
            got = await resp.json()
        assert got["columns"] == [
            {"name": "id", "type": "int4"},
            {"name": "item", "type": "text"},
            {"name": "amount", "type": "numeric"},
        ]
        assert got["rows"] == [[1, "item 1", "1.5"], [2, "item 2", "3.0"]]
        assert got["truncated"] is False
        async with http.post(url, json={"sql": "SELECT id FROM orders"}, headers=agent) as resp:
            got = await resp.json()
        assert got["truncated"] is True and got["row_count"] == 50
        drop = {"sql": "SELECT 1; COMMIT; DROP TABLE orders"}
        async with http.post(url, json=drop, headers=agent) as resp:
            assert resp.status == 403
            assert resp.headers["Content-Type"] == "application/problem+json"
            assert resp.headers["X-Sidecar-Error"] == "forbidden"
        stranger = {"X-Agent-Id": "intruder"}
        async with http.post(url, json={"sql": "SELECT 1 FROM orders"}, headers=stranger) as resp:
            assert resp.status == 403
        async with http.post(url, json={"sql": "SELECT bump()"}, headers=agent) as resp:
            assert resp.status in (400, 403)
        async with http.post(f"{running.url}/_db/nope/query", json={"sql": "SELECT 1"}) as resp:
            assert resp.status == 404
    assert postgres.psql("SELECT count(*) FROM orders").strip() == "500"


async def test_statement_timeout_is_set_and_cannot_be_undone(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, statement_timeout="300ms"))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        cur = await conn.execute("SHOW statement_timeout")
        assert await cur.fetchone() == ("300ms",)
        with pytest.raises(psycopg.Error) as undo:
            await conn.execute("SET statement_timeout = 0")
        assert undo.value.diag.sqlstate == "42501"
        with pytest.raises(psycopg.errors.QueryCanceled):
            await conn.execute("SELECT pg_sleep(3)")
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)


async def test_the_http_face_needs_the_agents_key_when_agents_must_prove_who_they_are(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    digest = hashlib.sha256(b"key-of-research").hexdigest()
    keys = f"agents: {{keys: {{research-1: 'sha256:{digest}'}}}}"
    running = await start_sidecar(policy(postgres, keys=keys))
    url = f"{running.url}/_db/shop/query"
    body = {"sql": "SELECT current_setting('application_name') AS app"}
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json=body, headers={"X-Agent-Id": "research-1"}) as resp:
            assert resp.status == 401
            assert resp.headers["X-Sidecar-Error"] == "unauthenticated"
        token = {"X-Agent-Token": "key-of-research"}
        async with http.post(url, json=body, headers=token) as resp:
            assert resp.status == 200
            assert (await resp.json())["rows"] == [["agent-sidecar/shop"]]


async def test_a_reload_that_leaves_the_limit_alone_keeps_its_bucket(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, rate_limit="[{rate: 1/min, burst: 1}]"))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        await conn.execute("SELECT 1")
        text = (running.policies / "policy.yaml").read_text()
        (running.policies / "policy.yaml").write_text(text.replace("size: 4", "size: 5"))
        assert (await running.sidecar.reload("test")).changed
        with pytest.raises(psycopg.Error) as err:
            await conn.execute("SELECT 2")
        assert err.value.diag.sqlstate == "53400"


async def test_max_rows_stops_the_server_too(postgres: PostgresServer, start_sidecar: Any) -> None:
    running = await start_sidecar(policy(postgres, max_rows="100"))
    async with await psycopg.AsyncConnection.connect(dsn(running)) as conn:
        with pytest.raises(psycopg.Error, match="stopped after 100 rows"):
            # Fifty million rows: the server is cancelled, not drained to the end.
            await conn.execute("SELECT generate_series(1, 50000000)")
        # Like any error inside a transaction, it aborted the transaction.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        await conn.rollback()
        cur = await conn.execute("SELECT 5")
        assert await cur.fetchone() == (5,)
