"""Validation results that must not change with the per-call shortcuts of the validate
step: a body that arrived with its head is taken at once, one still arriving is read as
before; what a Content-Type decides is kept per body; a JSON body is parsed by orjson
unless json's scanner must (or may only) parse it."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from sidecar.core.call import Call
from sidecar.openapi.document import Document
from sidecar.openapi.spec import MEDIA_CACHE_SIZE, Spec, Violation, _parse, _use_orjson
from tests.conftest import StartSidecar
from tests.openapi.conftest import enforcing

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "t", "version": "1"},
    "paths": {
        "/items": {
            "post": {
                "operationId": "addItem",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string", "minLength": 1},
                                    "count": {"type": "integer", "maximum": 10},
                                },
                            }
                        },
                        "text/plain": {},
                    },
                },
                "responses": {"200": {"description": "ok"}},
            }
        }
    },
}


async def post(
    url: str, body: bytes, *, content_type: str | None = "application/json", late: bool = False
) -> tuple[int, dict[str, Any]]:
    """POST /api/items over a raw connection: with `late`, the body is written a moment
    after the head, so the sidecar sees it still arriving."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = f"POST /api/items HTTP/1.1\r\nHost: {parts.netloc}\r\nConnection: close\r\n"
    if content_type is not None:
        head += f"Content-Type: {content_type}\r\n"
    head += f"Content-Length: {len(body)}\r\n\r\n"
    if late:
        writer.write(head.encode())
        await writer.drain()
        await asyncio.sleep(0.2)
        writer.write(body)
    else:
        writer.write(head.encode() + body)
    answer = await reader.read()
    writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


BODIES = [
    # (body, status, errors when refused)
    (b'{"name":"x","count":3}', 200, None),
    (
        b'{"name":"","count":11,"extra":1}',
        422,
        [
            {
                "in": "body",
                "pointer": "",
                "message": "Additional properties are not allowed ('extra' was unexpected)",
            },
            {"in": "body", "pointer": "/count", "message": "11 is greater than the maximum of 10"},
            {"in": "body", "pointer": "/name", "message": '"" is shorter than 1 character'},
        ],
    ),
    (b'{"name": "x",', 422, None),  # not JSON: the message is json's own
]


@pytest.mark.parametrize(("body", "status", "errors"), BODIES)
async def test_a_body_still_arriving_is_validated_as_one_that_came_with_its_head(
    start_sidecar: StartSidecar, upstream: Any, body: bytes, status: int, errors: Any
) -> None:
    url = await enforcing(start_sidecar, upstream, DOCUMENT)
    whole = await post(url, body)
    late = await post(url, body, late=True)
    assert whole == late
    assert whole[0] == status
    answer = whole[1]
    if status == 200:
        assert answer["body"] == body.decode()  # sent upstream as the agent wrote it
    elif errors is not None:
        assert sorted(answer["errors"], key=lambda e: e["pointer"]) == errors
    else:
        assert answer["errors"][0]["message"].startswith("not valid JSON: ")


CONTENT_TYPES = [
    # (Content-Type, body, status, first error message)
    ("application/json", b'{"name":"x"}', 200, None),
    ("Application/JSON; charset=utf-8", b'{"name":"x"}', 200, None),
    ("application/json;charset=UTF-8", b'{"name":3}', 422, '3 is not of type "string"'),
    # Listed but not JSON: its bytes are not checked.
    ("text/plain; charset=utf-8", b"not json at all", 200, None),
    (
        "application/xml",
        b"<a/>",
        422,
        "Content-Type application/xml is not one of: application/json, text/plain",
    ),
    (
        None,
        b'{"name":"x"}',
        422,
        "Content-Type is missing; send one of: application/json, text/plain",
    ),
    (
        "",
        b'{"name":"x"}',
        422,
        "Content-Type is missing; send one of: application/json, text/plain",
    ),
]


async def test_each_content_type_is_decided_the_same_every_time(
    start_sidecar: StartSidecar, upstream: Any
) -> None:
    url = await enforcing(start_sidecar, upstream, DOCUMENT)
    for _ in range(2):  # the second round from what was kept of the first
        for content_type, body, status, message in CONTENT_TYPES:
            got, answer = await post(url, body, content_type=content_type)
            assert got == status, (content_type, answer)
            if message is None:
                assert answer["body"] == body.decode()
            else:
                assert answer["errors"][0]["message"] == message


def test_what_a_body_gets_is_the_same_once_kept_and_after_the_cache_is_full() -> None:
    operation = Spec(Document(DOCUMENT, "3.1.0", "digest"), source="t").operations["addItem"]
    assert operation.body is not None
    spellings = [None, "", "application/json", "text/plain", "text/html", "*/*"] + [
        f"application/json; charset=utf-{n}" for n in range(MEDIA_CACHE_SIZE + 10)
    ]

    def errors(content_type: str | None) -> list[Violation]:
        out: list[Violation] = []
        assert operation.body is not None
        operation.body.check(content_type, b'{"name": 7}', out)
        return out

    first = [errors(c) for c in spellings]
    assert first == [errors(c) for c in spellings]  # kept, then dropped when full
    assert first[2] == [Violation("body", None, "/name", '7 is not of type "string"')]
    assert first[3] == []
    assert first[4][0].message == (
        "Content-Type text/html is not one of: application/json, text/plain"
    )
    assert all(e == first[2] for e in first[6:])


DEEP = b"[" * 5000 + b"]" * 5000
# Nested deeper than Python's recursion limit, not than orjson's.
DEEPISH = b'{"a":' * 990 + b"[1e30]" + b"}" * 990


@pytest.mark.parametrize(
    "body",
    [
        b'{"name":"x","count":3}',
        b' {"a": [1, 2.5, null, true, false]}\r\n',
        b'{"a":1,"b":2,"a":3}',
        b"-0",
        b"-0.0",
        b"[0.1, 1E2, 1e-7, 5e-324, 1.7976931348623157e308, 1.5e-400]",
        b"1e400",
        b"[123456789012345678, -123456789012345678]",
        b"9223372036854775807",
        b"-9223372036854775808",
        b"18446744073709551615",
        b"18446744073709551616",
        b"-9223372036854775809",
        b"123456789012345678901234567890",
        b'{"a": [1e19, -1e300, 9223372036854775808.0]}',
        b"[9223372036854775808, 18446744073709551615, 9223372036854775807.0]",
        b'{"id": "12345678901234567890"}',
        b"NaN",
        b"[Infinity, -Infinity]",
        b"\xef\xbb\xbf{}",
        '{"a":"é"}'.encode("utf-16"),
        '{"a":"é"}'.encode("utf-32"),
        b'"\\ud800"',
        b'{"\\ud83d\\ude00": "\\u0000"}',
        b'{"a":"\x01"}',
        b"[1,]",
        b'{"a":1}x',
        b"[1,2",
        b"\xff",
        b"",
        b"   ",
        DEEP,
        DEEPISH,
    ],
)
def test_a_body_parses_as_json_loads_parses_it_with_orjson_too(body: bytes) -> None:
    """Values compared by repr (1 and 1.0 are equal, their JSON Schema messages are not),
    errors by message: json's is the one the agent reads."""
    _use_orjson()

    def outcome(parse: Any) -> tuple[str, str]:
        try:
            return "ok", repr(parse(body))
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return type(exc).__name__, str(exc)

    assert outcome(_parse) == outcome(json.loads)


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ([(b"Host", b"h"), (b"Content-Type", b"application/json")], "application/json"),
        (
            [(b"CONTENT-TYPE", b"Application/JSON; charset=utf-8")],
            "Application/JSON; charset=utf-8",
        ),
        ([(b"content-type", b"a/b"), (b"Content-Type", b"c/d")], "a/b"),  # the first one
        ([(b"Content-Length", b"2"), (b"X-Content-Type", b"x/y")], None),
        ([(b"Content-Type", b"text/plain; name=\xe9")], "text/plain; name=\xe9"),  # latin-1
        ([], None),
    ],
)
def test_the_content_type_is_the_first_field_as_bytes_or_decoded(
    fields: list[tuple[bytes, bytes]], expected: str | None
) -> None:
    def call() -> Call:
        return Call(
            service="s", method="POST", target="/", body=b"{}", agent=None, raw_headers=fields
        )

    assert call().header("Content-Type") == expected
    decoded = call()
    assert decoded.headers is not None  # decoded: read from the fields, not the bytes
    assert decoded.raw_headers is None
    assert decoded.header("Content-Type") == expected
