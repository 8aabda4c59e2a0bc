"""Agents' PostgreSQL clients through the sidecar to a real PostgreSQL: pooling and protocol."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import textwrap
from typing import Any

import asyncpg
import psycopg
import pytest
import sqlalchemy
from sqlalchemy.ext.asyncio import create_async_engine

from tests.conftest import RunningSidecar

from .pg_server import DATABASE, PASSWORD, USER, PostgresServer, pg_bin


def policy(pg: PostgresServer, *, extra: str = "", pool: str = "{size: 10}") -> str:
    return f"""
        version: 1
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{pg.port}/{DATABASE}
            tls: {{mode: disable}}
            auth: {{username: {USER}, password: {PASSWORD}}}
            pool: {pool}
        {extra}
        """


def dsn(running: RunningSidecar, agent: str = "research-1", password: str = "x") -> str:
    host, port = running.sidecar.databases.address("shop")
    return f"postgresql://{agent}:{password}@{host}:{port}/{DATABASE}?sslmode=prefer"


async def test_psycopg_queries_through_the_sidecar(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres))
    async with await psycopg.AsyncConnection.connect(dsn(running)) as conn:
        cur = await conn.execute("SELECT count(*), current_user FROM orders WHERE id <= %s", (10,))
        assert await cur.fetchone() == (10, USER)
        cur = await conn.execute("SELECT current_setting('application_name')")
        assert (await cur.fetchone() or [""])[0] == "agent-sidecar/shop"


async def test_two_hundred_agents_share_a_pool_of_ten(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, pool="{size: 10, wait_timeout: 20s}"))

    async def agent(i: int) -> int:
        async with await psycopg.AsyncConnection.connect(dsn(running, f"agent-{i}")) as conn:
            total = 0
            for _ in range(3):
                cur = await conn.execute("SELECT id FROM orders WHERE id = %s", (i % 500 + 1,))
                total += (await cur.fetchone() or [0])[0]
            return total

    results = await asyncio.gather(*(agent(i) for i in range(200)))
    assert results == [3 * (i % 500 + 1) for i in range(200)]
    backends = postgres.psql(
        f"SELECT count(*) FROM pg_stat_activity WHERE usename = '{USER}'"
    ).strip()
    assert int(backends) <= 10
    stats = running.sidecar.databases.stats()["shop"]["pool"]
    assert stats["in_use"] == 0 and stats["idle"] <= 10


async def test_asyncpg_prepared_statements_in_transaction_mode(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    # A pool of 2 and 6 agents: each agent's statements run on server connections
    # that other agents' statements were prepared on, and the other way round.
    running = await start_sidecar(policy(postgres, pool="{size: 2, mode: transaction}"))

    async def agent(i: int) -> list[Any]:
        conn = await asyncpg.connect(dsn(running, f"bot-{i}"))
        try:
            stmt = await conn.prepare("SELECT item FROM orders WHERE id = $1")
            got = [await stmt.fetchval(n) for n in (i + 1, i + 2)]
            got.append(await conn.fetchval("SELECT amount FROM orders WHERE id = $1", i + 3))
            async with conn.transaction():
                got.append(await conn.fetchval("SELECT count(*) FROM orders WHERE id < $1", 5))
            return got
        finally:
            await conn.close()

    results = await asyncio.gather(*(agent(i) for i in range(6)))
    for i, got in enumerate(results):
        assert got[:2] == [f"item {i + 1}", f"item {i + 2}"]
        assert float(got[2]) == (i + 3) * 1.5
        assert got[3] == 4


async def test_sqlalchemy_and_psql(postgres: PostgresServer, start_sidecar: Any) -> None:
    running = await start_sidecar(policy(postgres))
    url = dsn(running).replace("postgresql://", "postgresql+psycopg://")
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(sqlalchemy.text("SELECT id FROM orders ORDER BY id LIMIT 3"))
            assert [r[0] for r in rows] == [1, 2, 3]
    finally:
        await engine.dispose()
    host, port = running.sidecar.databases.address("shop")
    proc = await asyncio.create_subprocess_exec(
        pg_bin("psql") or "psql",
        "-h",
        host,
        "-p",
        str(port),
        "-U",
        "psql-agent",
        "-d",
        DATABASE,
        "-At",
        "-c",
        "SELECT max(id) FROM orders",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={"PGPASSWORD": "anything", "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert out.decode().strip() == "500", err


async def test_cancel_reaches_the_agents_own_query(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, pool="{size: 1}"))
    conn = await asyncpg.connect(dsn(running, "impatient"))
    try:
        with pytest.raises(asyncio.TimeoutError):
            # asyncpg sends a CancelRequest when its timeout fires.
            await conn.fetchval("SELECT pg_sleep(10)", timeout=0.5)
        assert await conn.fetchval("SELECT 41 + 1") == 42
    finally:
        await conn.close()


async def test_a_stale_cancel_does_not_hit_another_agents_query(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, pool="{size: 1}"))
    first = await psycopg.AsyncConnection.connect(dsn(running, "first"), autocommit=True)
    second = await psycopg.AsyncConnection.connect(dsn(running, "second"), autocommit=True)
    try:
        await first.execute("SELECT 1")  # its server connection went back to the pool
        slow = asyncio.create_task(second.execute("SELECT pg_sleep(0.8), 'done'"))
        await asyncio.sleep(0.3)
        await (
            first.cancel_safe()
        )  # `first` holds no server connection now: nothing may be cancelled
        cur = await slow
        assert (await cur.fetchone() or ["", ""])[1] == "done"
    finally:
        await first.close()
        await second.close()


async def test_upstream_restart_gives_a_clear_error_and_the_pool_recovers(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, pool="{size: 2}"))
    conn = await psycopg.AsyncConnection.connect(dsn(running), autocommit=True)
    try:
        await conn.execute("BEGIN")
        await conn.execute("SELECT 1")
        await asyncio.to_thread(postgres.stop, "fast")
        await asyncio.to_thread(postgres.start)
        with pytest.raises(psycopg.OperationalError, match="was lost"):
            await conn.execute("SELECT 2")
        cur = await conn.execute("SELECT count(*) FROM orders")
        assert await cur.fetchone() == (500,)
    finally:
        await conn.close()


async def test_password_rotation_takes_effect_for_new_connections(
    postgres: PostgresServer, start_sidecar: Any, tmp_path: Any
) -> None:
    secret = tmp_path / "password"
    secret.write_text(PASSWORD + "\n")
    text = policy(postgres, pool="{size: 1, idle_timeout: 1h}").replace(
        f"password: {PASSWORD}", f'password: "${{file:{secret}}}"'
    )
    running = await start_sidecar(text, watch=True)
    try:
        async with await psycopg.AsyncConnection.connect(dsn(running)) as conn:
            await conn.execute("SELECT 1")
            rotated = "rotated-Canary-2b9e"
            postgres.set_password(rotated)
            reloaded = asyncio.Event()
            running.sidecar.on_reload.append(lambda r: reloaded.set() if r.changed else None)
            secret.write_text(rotated + "\n")
            await asyncio.wait_for(reloaded.wait(), 10)
            # The server connection logged in with the old password goes on serving...
            await conn.execute("SELECT 2")
        # ...and once it is gone, a new one logs in with the new password.
        postgres.psql(
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{USER}'"
        )
        await asyncio.sleep(0.2)
        async with await psycopg.AsyncConnection.connect(dsn(running)) as conn:
            cur = await conn.execute("SELECT 3")
            assert await cur.fetchone() == (3,)
    finally:
        postgres.set_password(PASSWORD)


async def test_reload_changes_rules_without_dropping_the_session(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        await conn.execute("SELECT count(*) FROM orders")
        rules = "{size: 3}\n            allow: [{tables: [public.customers], statements: [select]}]"
        (running.policies / "policy.yaml").write_text(textwrap.dedent(policy(postgres, pool=rules)))
        result = await running.sidecar.reload("test")
        assert result.ok and result.changed, result.errors
        # The same agent connection, now under the new rules.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            await conn.execute("SELECT count(*) FROM orders")
        assert running.sidecar.databases.stats()["shop"]["pool"]["size"] == 3


async def test_session_mode_resets_the_server_between_agents(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, pool="{size: 1, mode: session}"))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        await conn.execute("SET work_mem = '7MB'")
        await conn.execute("PREPARE mine AS SELECT 1")
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT current_setting('work_mem'), count(*) FROM pg_prepared_statements"
        )
        assert await cur.fetchone() == ("4MB", 0)


async def test_a_full_pool_makes_agents_wait_then_refuses_with_53400(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres, pool="{size: 1, wait_timeout: 300ms}"))
    holder = await psycopg.AsyncConnection.connect(dsn(running, "holder"))
    waiter = await psycopg.AsyncConnection.connect(dsn(running, "waiter"), autocommit=True)
    try:
        await holder.execute("SELECT 1")  # an open transaction keeps the only connection
        with pytest.raises(psycopg.Error) as err:
            await waiter.execute("SELECT 2")
        assert err.value.diag.sqlstate == "53400"
        assert "Retry" in (err.value.diag.message_hint or "")
        await holder.commit()
        cur = await waiter.execute("SELECT 3")
        assert await cur.fetchone() == (3,)
    finally:
        await holder.close()
        await waiter.close()


async def test_copy_out_and_in_are_relayed(postgres: PostgresServer, start_sidecar: Any) -> None:
    postgres.psql(f"CREATE TABLE IF NOT EXISTS notes (n int); ALTER TABLE notes OWNER TO {USER}")
    running = await start_sidecar(policy(postgres))
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        cur = conn.cursor()
        async with cur.copy("COPY notes (n) FROM STDIN") as copy:
            for n in range(3):
                await copy.write_row((n,))
        out = b""
        async with cur.copy("COPY (SELECT n FROM notes ORDER BY n) TO STDOUT") as copy:
            async for data in copy:
                out += bytes(data)
        assert out == b"0\n1\n2\n"
        cur = await conn.execute("SELECT count(*) FROM notes")
        assert await cur.fetchone() == (3,)


async def test_tls_to_the_upstream_verifies_the_server(
    postgres: PostgresServer, start_sidecar: Any, tmp_path: Any
) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text(postgres.ca_pem)
    tls = f'{{mode: verify-full, ca: "${{file:{ca}}}"}}'
    running = await start_sidecar(policy(postgres).replace("{mode: disable}", tls))
    async with await psycopg.AsyncConnection.connect(dsn(running)) as conn:
        cur = await conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        assert await cur.fetchone() == (True,)
    # A server whose certificate the CA did not sign is refused before any password is sent.
    import trustme

    ca.write_text(trustme.CA().cert_pem.bytes().decode())
    other = await start_sidecar(policy(postgres).replace("{mode: disable}", tls))
    with pytest.raises(psycopg.OperationalError, match="TLS to the database server failed"):
        await psycopg.AsyncConnection.connect(dsn(other))


async def test_reload_moves_and_removes_listeners(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    running = await start_sidecar(policy(postgres))
    before = running.sidecar.databases.address("shop")
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        free = socket.socket()
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
        free.close()
        moved = policy(postgres).replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}")
        (running.policies / "policy.yaml").write_text(textwrap.dedent(moved))
        assert (await running.sidecar.reload("test")).ok
        assert running.sidecar.databases.address("shop") == ("127.0.0.1", port)
        # The session that came in on the old address goes on.
        cur = await conn.execute("SELECT 1")
        assert await cur.fetchone() == (1,)
    async with await psycopg.AsyncConnection.connect(dsn(running), autocommit=True) as conn:
        await conn.execute("SELECT 1")
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(
            f"postgresql://a:x@{before[0]}:{before[1]}/{DATABASE}", connect_timeout=3
        )
    (running.policies / "policy.yaml").write_text("version: 1\n")
    assert (await running.sidecar.reload("test")).ok
    assert running.sidecar.databases.stats() == {}
    with pytest.raises(psycopg.OperationalError):
        await psycopg.AsyncConnection.connect(
            f"postgresql://a:x@127.0.0.1:{port}/{DATABASE}", connect_timeout=3
        )


async def test_a_statement_that_failed_to_prepare_is_prepared_again(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    postgres.psql("DROP TABLE IF EXISTS later")
    running = await start_sidecar(policy(postgres, pool="{size: 1}"))
    conn = await asyncpg.connect(dsn(running))
    try:
        with pytest.raises(asyncpg.exceptions.UndefinedTableError):
            await conn.prepare("SELECT n FROM later")
        postgres.psql(f"CREATE TABLE later (n int); ALTER TABLE later OWNER TO {USER}")
        stmt = await conn.prepare("SELECT n FROM later")
        assert await stmt.fetch() == []
    finally:
        await conn.close()


async def test_statements_past_the_bound_are_closed_and_prepared_again(
    postgres: PostgresServer, start_sidecar: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sidecar.databases import client

    monkeypatch.setattr(client, "MAX_PREPARED", 2)
    running = await start_sidecar(policy(postgres, pool="{size: 1}"))
    conn = await asyncpg.connect(dsn(running))
    try:
        texts = [f"SELECT {n} + $1::int" for n in range(5)]
        for _ in range(2):
            for n, text in enumerate(texts):
                assert await conn.fetchval(text, 1) == n + 1
        count = "SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'sidecar_%'"
        assert await conn.fetchval(count) <= 3
    finally:
        await conn.close()


async def test_the_console_shows_the_pool_and_a_saturated_pool_alerts(
    postgres: PostgresServer, start_sidecar: Any, client: Any, closed_port: int
) -> None:
    # A session-mode pool of 1 held by one agent: the console's pool row says so, and
    # the pool_saturated alert rule, which reads the same snapshot, fires.
    running = await start_sidecar(
        policy(
            postgres,
            pool="{mode: session, size: 1, wait_timeout: 5s}",
            extra=f"""
        alerts:
          evaluate_every: 50ms
          receivers:
            ops: {{format: slack, url: "http://127.0.0.1:{closed_port}/hook", allow_private: true}}
          rules:
            - {{name: pools, kind: pool_saturated, percent: 90, send_to: [ops]}}
        """,
        )
    )
    async with await psycopg.AsyncConnection.connect(dsn(running)) as conn:
        await conn.execute("SELECT 1")

        async def saturated() -> bool:
            async with client.get(f"{running.admin}/api/console") as resp:
                figures = await resp.json()
            pools = [p for p in figures["pools"] if p["name"] == "shop"]
            firing = [a for a in figures["alerts"] if a["alertname"] == "pools"]
            return bool(pools) and pools[0]["in_use"] == 1 and pools[0]["max"] == 1 and bool(firing)

        from tests.helpers import eventually

        await eventually(saturated, "the pool in the console and its alert", limit=10)


async def test_a_large_result_reaches_an_agent_that_reads_slowly(
    postgres: PostgresServer, start_sidecar: Any
) -> None:
    """Megabytes of rows while the agent does not read: the relay stops reading the
    server and resumes once the agent catches up, and every row arrives."""
    from sidecar.databases import protocol as pg

    running = await start_sidecar(policy(postgres))
    host, port = running.sidecar.databases.address("shop")
    reader, writer = await asyncio.open_connection(host, port)
    framer = pg.Framer()

    async def until_ready() -> list[int]:
        kinds: list[int] = []
        while True:
            while (msg := framer.next()) is not None:
                kinds.append(msg[0])
                if msg[0] == pg.READY_FOR_QUERY:
                    return kinds
            data = await asyncio.wait_for(reader.read(65536), 20)
            assert data, "the sidecar closed the connection"
            framer.feed(data)

    try:
        writer.write(pg.startup_message({"user": "slow-agent", "database": DATABASE}))
        await until_ready()
        writer.write(pg.query("SELECT repeat('x', 1000) FROM generate_series(1, 8000)"))
        await asyncio.sleep(1)  # the agent reads nothing while ~8 MB are on their way
        kinds = await until_ready()
        assert kinds.count(pg.DATA_ROW) == 8000
        assert pg.ERROR_RESPONSE not in kinds
        # The session goes on.
        writer.write(pg.query("SELECT 1"))
        assert (await until_ready()).count(pg.DATA_ROW) == 1
    finally:
        writer.close()
