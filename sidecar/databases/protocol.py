"""The PostgreSQL v3 wire protocol: framing, decoders and encoders, no I/O and no policy.

A message is a type byte, a 4-byte big-endian length that counts itself, and a
body; the client's first packet (startup, SSLRequest, GSSENCRequest,
CancelRequest) has no type byte. Everything here works on bytes, so it is
unit-tested on byte strings (as Envoy's postgres filter decoder is).
https://www.postgresql.org/docs/current/protocol-message-formats.html
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

PROTOCOL_3 = 196608  # 3.0
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102
# A startup packet larger than this is not a client we want to talk to.
MAX_STARTUP = 10_000
# Messages past this size from an agent are refused (PostgreSQL's own limit is 1 GB).
MAX_MESSAGE = 64 * 1024 * 1024

# Message types, as ints (a bytes index yields ints).
QUERY = ord("Q")
PARSE = ord("P")
BIND = ord("B")
DESCRIBE = ord("D")
EXECUTE = ord("E")
SYNC = ord("S")
FLUSH = ord("H")
CLOSE = ord("C")
TERMINATE = ord("X")
FUNCTION_CALL = ord("F")
PASSWORD = ord("p")
COPY_DATA = ord("d")
COPY_DONE = ord("c")
COPY_FAIL = ord("f")

AUTHENTICATION = ord("R")
PARAMETER_STATUS = ord("S")
BACKEND_KEY_DATA = ord("K")
READY_FOR_QUERY = ord("Z")
ERROR_RESPONSE = ord("E")
NOTICE_RESPONSE = ord("N")
ROW_DESCRIPTION = ord("T")
DATA_ROW = ord("D")
COMMAND_COMPLETE = ord("C")
EMPTY_QUERY = ord("I")
PARSE_COMPLETE = ord("1")
BIND_COMPLETE = ord("2")
CLOSE_COMPLETE = ord("3")
NO_DATA = ord("n")
PARAMETER_DESCRIPTION = ord("t")
PORTAL_SUSPENDED = ord("s")
COPY_IN = ord("G")
COPY_OUT = ord("H")
COPY_BOTH = ord("W")
NOTIFICATION = ord("A")

AUTH_OK = 0
AUTH_CLEARTEXT = 3
AUTH_MD5 = 5
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

_HEADER = struct.Struct("!BI")
_INT32 = struct.Struct("!I")
_INT16 = struct.Struct("!H")


class ProtocolError(Exception):
    """The peer broke the protocol; the connection cannot go on."""


class Framer:
    """Splits a byte stream into (type, body) messages; feed it whatever the socket gave."""

    __slots__ = ("_buffer", "_pos")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> None:
        if self._pos:
            del self._buffer[: self._pos]
            self._pos = 0
        self._buffer += data

    def next(self) -> tuple[int, bytes, bytes] | None:
        """The next whole message as (type, body, raw bytes), or None until more is fed."""
        buffer = self._buffer
        pos = self._pos
        if len(buffer) - pos < 5:
            return None
        kind, length = _HEADER.unpack_from(buffer, pos)
        if length < 4 or length > MAX_MESSAGE:
            raise ProtocolError(f"message of length {length}")
        end = pos + 1 + length
        if len(buffer) < end:
            return None
        raw = bytes(buffer[pos:end])
        self._pos = end
        return kind, raw[5:], raw

    @property
    def pending(self) -> int:
        return len(self._buffer) - self._pos


# -- decoders -------------------------------------------------------------------------


def cstring(body: bytes, offset: int) -> tuple[str, int]:
    """The NUL-terminated string at offset, and the offset after its NUL."""
    end = body.find(b"\0", offset)
    if end < 0:
        raise ProtocolError("string without its NUL terminator")
    return body[offset:end].decode("utf-8", "replace"), end + 1


@dataclass(frozen=True, slots=True)
class Startup:
    """The first packet: a startup message (with its parameters) or a special request."""

    code: int
    params: Mapping[str, str]
    process_id: int = 0
    secret: int = 0


def parse_startup(packet: bytes) -> Startup:
    """A whole first packet, its length included."""
    if len(packet) < 8:
        raise ProtocolError("startup packet too short")
    (code,) = _INT32.unpack_from(packet, 4)
    if code == CANCEL_REQUEST:
        if len(packet) != 16:
            raise ProtocolError("CancelRequest of the wrong length")
        pid, secret = struct.unpack_from("!II", packet, 8)
        return Startup(code, {}, pid, secret)
    if code != PROTOCOL_3:
        return Startup(code, {})
    params: dict[str, str] = {}
    offset = 8
    while offset < len(packet) and packet[offset] != 0:
        key, offset = cstring(packet, offset)
        value, offset = cstring(packet, offset)
        params[key] = value
    return Startup(code, params)


def parse_fields(body: bytes) -> dict[str, str]:
    """ErrorResponse / NoticeResponse fields by their code letter ('C' SQLSTATE, 'M', ...)."""
    fields: dict[str, str] = {}
    offset = 0
    while offset < len(body) and body[offset] != 0:
        code = chr(body[offset])
        value, offset = cstring(body, offset + 1)
        fields[code] = value
    return fields


def parse_parse(body: bytes) -> tuple[str, str, bytes]:
    """Parse: (statement name, query text, the parameter types part as sent)."""
    name, offset = cstring(body, 0)
    query, offset = cstring(body, offset)
    return name, query, body[offset:]


def parse_bind(body: bytes) -> tuple[str, str, int]:
    """Bind: (portal, statement name, offset of what follows the names)."""
    portal, offset = cstring(body, 0)
    statement, offset = cstring(body, offset)
    return portal, statement, offset


def parse_target(body: bytes) -> tuple[int, str]:
    """Describe / Close: ('S' or 'P' as an int, name)."""
    if not body:
        raise ProtocolError("Describe/Close without a target")
    name, _ = cstring(body, 1)
    return body[0], name


def parse_row_description(body: bytes) -> list[tuple[str, int]]:
    """RowDescription: (column name, type oid) of each column."""
    (count,) = _INT16.unpack_from(body, 0)
    offset = 2
    columns = []
    for _ in range(count):
        name, offset = cstring(body, offset)
        (type_oid,) = _INT32.unpack_from(body, offset + 6)
        columns.append((name, type_oid))
        offset += 18
    return columns


def parse_data_row(body: bytes) -> list[bytes | None]:
    (count,) = _INT16.unpack_from(body, 0)
    offset = 2
    values: list[bytes | None] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", body, offset)
        offset += 4
        if length < 0:
            values.append(None)
        else:
            values.append(body[offset : offset + length])
            offset += length
    return values


def parse_auth(body: bytes) -> tuple[int, bytes]:
    """Authentication*: (code, the rest: md5 salt, SASL mechanisms or data)."""
    (code,) = _INT32.unpack_from(body, 0)
    return code, body[4:]


def sasl_mechanisms(data: bytes) -> list[str]:
    return [m.decode() for m in data.split(b"\0") if m]


# -- encoders -------------------------------------------------------------------------


def message(kind: int, body: bytes) -> bytes:
    return _HEADER.pack(kind, len(body) + 4) + body


def _cstr(text: str) -> bytes:
    return text.encode() + b"\0"


def startup_message(params: Mapping[str, str]) -> bytes:
    body = _INT32.pack(PROTOCOL_3) + b"".join(_cstr(k) + _cstr(v) for k, v in params.items())
    body += b"\0"
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return struct.pack("!II", 8, SSL_REQUEST)


def cancel_request(process_id: int, secret: int) -> bytes:
    return struct.pack("!IIII", 16, CANCEL_REQUEST, process_id, secret)


def error_response(
    sqlstate: str,
    text: str,
    *,
    severity: str = "ERROR",
    hint: str | None = None,
    detail: str | None = None,
) -> bytes:
    body = b"S" + _cstr(severity) + b"V" + _cstr(severity) + b"C" + _cstr(sqlstate)
    body += b"M" + _cstr(text)
    if detail:
        body += b"D" + _cstr(detail)
    if hint:
        body += b"H" + _cstr(hint)
    return message(ERROR_RESPONSE, body + b"\0")


def authentication(code: int, data: bytes = b"") -> bytes:
    return message(AUTHENTICATION, _INT32.pack(code) + data)


AUTH_OK_MESSAGE = authentication(AUTH_OK)


def parameter_status(name: str, value: str) -> bytes:
    return message(PARAMETER_STATUS, _cstr(name) + _cstr(value))


def backend_key_data(process_id: int, secret: int) -> bytes:
    return message(BACKEND_KEY_DATA, struct.pack("!II", process_id, secret))


def ready_for_query(status: int) -> bytes:
    return message(READY_FOR_QUERY, bytes((status,)))


READY_IDLE = ready_for_query(ord("I"))


def password_message(data: bytes) -> bytes:
    return message(PASSWORD, data)


def sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return message(PASSWORD, _cstr(mechanism) + _INT32.pack(len(data)) + data)


def query(sql: str) -> bytes:
    return message(QUERY, _cstr(sql))


def parse(name: str, sql: str, types: bytes = b"\0\0") -> bytes:
    return message(PARSE, _cstr(name) + _cstr(sql) + types)


def bind(portal: str, statement: str, params: Iterable[str | None]) -> bytes:
    """Bind with text parameters and text results."""
    values = list(params)
    body = _cstr(portal) + _cstr(statement) + _INT16.pack(0) + _INT16.pack(len(values))
    for value in values:
        if value is None:
            body += struct.pack("!i", -1)
        else:
            encoded = value.encode()
            body += _INT32.pack(len(encoded)) + encoded
    return message(BIND, body + _INT16.pack(0))


def rename_bind(body: bytes, statement: str) -> bytes:
    """The Bind message `body` came from, with its statement name replaced."""
    portal, _, offset = parse_bind(body)
    return message(BIND, _cstr(portal) + _cstr(statement) + body[offset:])


def rename_parse(statement: str, query_text: str, types: bytes) -> bytes:
    return message(PARSE, _cstr(statement) + _cstr(query_text) + types)


def target(kind: int, which: int, name: str) -> bytes:
    """Describe or Close of a statement ('S') or portal ('P')."""
    return message(kind, bytes((which,)) + _cstr(name))


def execute(portal: str = "", max_rows: int = 0) -> bytes:
    return message(EXECUTE, _cstr(portal) + _INT32.pack(max_rows))


SYNC_MESSAGE = message(SYNC, b"")
FLUSH_MESSAGE = message(FLUSH, b"")
TERMINATE_MESSAGE = message(TERMINATE, b"")
