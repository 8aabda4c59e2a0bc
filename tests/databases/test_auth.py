"""The sidecar logs in upstream with md5 and cleartext too, not only SCRAM."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest

from .pg_server import DATABASE, PostgresServer


@pytest.mark.parametrize(("role", "method"), [("md5_agent", "md5"), ("plain_agent", "password")])
async def test_upstream_login_methods(
    postgres: PostgresServer, start_sidecar: Any, role: str, method: str
) -> None:
    postgres.add_login(role, f"pw-{role}", method)
    running = await start_sidecar(
        f"""
        version: 1
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{postgres.port}/{DATABASE}
            tls: {{mode: disable}}
            auth: {{username: {role}, password: pw-{role}}}
        """
    )
    host, port = running.sidecar.databases.address("shop")
    dsn = f"postgresql://bot:x@{host}:{port}/{DATABASE}"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT current_user, count(*) FROM orders")
        assert await cur.fetchone() == (role, 500)
