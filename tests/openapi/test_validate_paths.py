"""Validation results that must not change with the per-call shortcuts of the validate
step: a body that arrived with its head is taken at once, one still arriving is read as
before; each answer here is compared with the one the other way gives."""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import StartSidecar, echo_app

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


async def _start(start_sidecar: StartSidecar, upstream: Any) -> str:
    api = await upstream(echo_app())
    sc = await start_sidecar(
        {
            "policy.yaml": f"""
                version: 1
                services:
                  api:
                    upstream: {api}
                    openapi: openapi.json
                    validate: {{requests: enforce}}
                """,
            "openapi.json": json.dumps(DOCUMENT),
        }
    )
    return sc.url


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
    url = await _start(start_sidecar, upstream)
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
