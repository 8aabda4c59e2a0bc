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


async def test_upstream_login_with_a_client_certificate(
    postgres: PostgresServer, start_sidecar: Any, tmp_path: Any
) -> None:
    postgres.add_login("cert_agent", "unused", "cert")
    cert, key = postgres.client_cert("cert_agent")
    (tmp_path / "ca.pem").write_text(postgres.ca_pem)
    (tmp_path / "client.pem").write_text(cert)
    (tmp_path / "client.key").write_text(key)
    running = await start_sidecar(
        f"""
        version: 1
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{postgres.port}/{DATABASE}
            tls:
              mode: verify-full
              ca: "${{file:{tmp_path}/ca.pem}}"
              cert: "${{file:{tmp_path}/client.pem}}"
              key: "${{file:{tmp_path}/client.key}}"
            auth: {{username: cert_agent}}
        """
    )
    host, port = running.sidecar.databases.address("shop")
    dsn = f"postgresql://bot:x@{host}:{port}/{DATABASE}"
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT current_user, count(*) FROM orders")
        assert await cur.fetchone() == ("cert_agent", 500)
