"""The wire decoder and encoder on byte strings, and the first packets on a real listener."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from sidecar.databases import protocol as pg

from .pg_server import DATABASE, PASSWORD, USER, PostgresServer


def test_framer_joins_messages_split_anywhere() -> None:
    stream = pg.query("SELECT 1") + pg.SYNC_MESSAGE + pg.parse("s1", "SELECT $1")
    for cut in range(1, len(stream)):
        framer = pg.Framer()
        got = []
        for part in (stream[:cut], stream[cut:]):
            framer.feed(part)
            while (msg := framer.next()) is not None:
                got.append((chr(msg[0]), msg[1]))
        assert got == [("Q", b"SELECT 1\0"), ("S", b""), ("P", b"s1\0SELECT $1\0\0\0")]


def test_framer_refuses_a_nonsense_length() -> None:
    framer = pg.Framer()
    framer.feed(b"Q" + struct.pack("!I", 2))
    with pytest.raises(pg.ProtocolError):
        framer.next()


def test_startup_packets() -> None:
    startup = pg.parse_startup(pg.startup_message({"user": "bot", "database": "shop"}))
    assert startup.code == pg.PROTOCOL_3
    assert dict(startup.params) == {"user": "bot", "database": "shop"}
    assert pg.parse_startup(pg.ssl_request()).code == pg.SSL_REQUEST
    assert pg.parse_startup(struct.pack("!II", 8, pg.GSSENC_REQUEST)).code == pg.GSSENC_REQUEST
    cancel = pg.parse_startup(pg.cancel_request(1234, 99))
    assert (cancel.code, cancel.process_id, cancel.secret) == (pg.CANCEL_REQUEST, 1234, 99)


def test_error_response_round_trip() -> None:
    raw = pg.error_response("42501", "no", hint="ask for less", detail="why")
    framer = pg.Framer()
    framer.feed(raw)
    msg = framer.next()
    assert msg is not None and msg[0] == pg.ERROR_RESPONSE
    fields = pg.parse_fields(msg[1])
    assert (fields["C"], fields["M"], fields["H"], fields["D"], fields["S"]) == (
        "42501",
        "no",
        "ask for less",
        "why",
        "ERROR",
    )


def test_bind_renamed_keeps_its_parameters() -> None:
    raw = pg.bind("p", "client_name", ["1", None])
    renamed = pg.rename_bind(raw[5:], "sidecar_abc")
    assert renamed == pg.bind("p", "sidecar_abc", ["1", None])
    portal, statement, _ = pg.parse_bind(renamed[5:])
    assert (portal, statement) == ("p", "sidecar_abc")


def test_row_description_and_data_row() -> None:
    column = b"id\0" + struct.pack("!IhIhih", 0, 0, 23, 4, -1, 0)
    body = struct.pack("!H", 1) + column
    assert pg.parse_row_description(body) == [("id", 23)]
    row = struct.pack("!H", 2) + struct.pack("!i", 1) + b"7" + struct.pack("!i", -1)
    assert pg.parse_data_row(row) == [b"7", None]


async def test_first_packets_on_the_listener(postgres: PostgresServer, start_sidecar: Any) -> None:
    running = await start_sidecar(
        f"""
        version: 1
        databases:
          shop:
            listen: 127.0.0.1:0
            upstream: postgres://127.0.0.1:{postgres.port}/{DATABASE}
            auth: {{username: {USER}, password: {PASSWORD}}}
        """
    )
    host, port = running.sidecar.databases.address("shop")
    reader, writer = await asyncio.open_connection(host, port)
    # GSSENCRequest and SSLRequest are both answered 'N'; then the startup goes on.
    writer.write(struct.pack("!II", 8, pg.GSSENC_REQUEST))
    assert await reader.readexactly(1) == b"N"
    writer.write(pg.ssl_request())
    assert await reader.readexactly(1) == b"N"
    writer.write(pg.startup_message({"user": "raw-agent", "database": DATABASE}))
    framer = pg.Framer()
    kinds: list[int] = []
    while pg.READY_FOR_QUERY not in kinds:
        framer.feed(await asyncio.wait_for(reader.read(65536), 10))
        while (msg := framer.next()) is not None:
            kinds.append(msg[0])
    assert kinds[0] == pg.AUTHENTICATION and pg.BACKEND_KEY_DATA in kinds
    writer.write(pg.TERMINATE_MESSAGE)
    writer.close()
    # A cancel with a key nobody holds is dropped without an answer.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(pg.cancel_request(1, 2))
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
    # A direct TLS handshake (PostgreSQL 17 clients) is not served: the socket closes.
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"\x16\x03\x01\x00\x05hello")
    assert await asyncio.wait_for(reader.read(), 10) == b""
    writer.close()
