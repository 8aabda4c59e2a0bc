"""Validation results that must not change with the per-call shortcuts: the matches kept
per path and method, the header fields read one by one instead of all decoded, and the
JSON body parsed without json.loads's detours."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from sidecar.openapi.document import Document
from sidecar.openapi.spec import MATCH_CACHE_SIZE, Spec, _parse
from tests.conftest import StartSidecar
from tests.openapi.conftest import enforcing

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "t", "version": "1"},
    "paths": {
        "/items/{id}": {
            "parameters": [
                {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
            ],
            "get": {"operationId": "getItem", "responses": {"200": {"description": "ok"}}},
            "post": {
                "operationId": "putItem",
                "parameters": [
                    {
                        "name": "X-Request-Id",
                        "in": "header",
                        "required": True,
                        "schema": {"type": "integer"},
                    }
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {"200": {"description": "ok"}},
            },
        }
    },
}


def _spec() -> Spec:
    return Spec(Document(DOCUMENT, "3.1.0", "digest"), source="t")


def test_a_match_is_the_same_the_second_time_and_after_the_cache_is_full() -> None:
    spec = _spec()
    for _ in range(2):
        found = spec.match("POST", "/items/7")
        assert found is not None and found.operation is not None
        assert (found.operation.operation_id, found.path_params) == ("putItem", {"id": "7"})
        other = spec.match("GET", "/items/7")  # same path, its own operation
        assert other is not None and other.operation is not None
        assert other.operation.operation_id == "getItem"
        unknown = spec.match("DELETE", "/items/7")
        assert unknown is not None and unknown.operation is None
        assert unknown.methods == ("GET", "POST")
        assert spec.match("GET", "/nothing") is None
    for n in range(MATCH_CACHE_SIZE + 10):  # more paths than kept: they are dropped
        found = spec.match("GET", f"/items/{n}")
        assert found is not None and found.path_params == {"id": str(n)}
    found = spec.match("POST", "/items/7")
    assert found is not None and found.operation is not None
    assert found.operation.operation_id == "putItem"


async def test_header_parameters_and_content_type_as_the_agent_wrote_them(
    start_sidecar: StartSidecar, upstream: Any, client: aiohttp.ClientSession, tmp_path: Any
) -> None:
    url = await enforcing(start_sidecar, upstream, DOCUMENT)
    good = json.dumps({"name": "x"}).encode()
    cases = [
        # (headers, body, status, errors)
        ({"CONTENT-TYPE": "Application/JSON; charset=utf-8", "x-request-id": "12"}, good, 200),
        ({"Content-Type": "application/json", "X-Request-Id": "abc"}, good, 422),
        ({"Content-Type": "application/json"}, good, 422),
        ({"Content-Type": "application/json", "X-Request-Id": "1"}, b'{"name": 3}', 422),
        ({"Content-Type": "text/plain", "X-Request-Id": "1"}, good, 422),
    ]
    seen = []
    for _ in range(2):  # the second round from the kept matches
        for headers, body, status in cases:
            async with client.post(f"{url}/api/items/7", data=body, headers=headers) as r:
                assert r.status == status
                answer = json.loads(await r.read())
            seen.append(answer.get("errors"))
    assert seen[:5] == seen[5:]
    assert seen[1] == [
        {
            "in": "header",
            "name": "X-Request-Id",
            "pointer": "",
            "message": '"abc" is not of type "integer"',
        }
    ]
    assert seen[2] == [
        {"in": "header", "name": "X-Request-Id", "pointer": "", "message": "is required"}
    ]
    assert seen[3] == [{"in": "body", "pointer": "/name", "message": '3 is not of type "string"'}]
    assert seen[4][0]["message"] == "Content-Type text/plain is not one of: application/json"


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1}',
        b' {"a": [1, 2.5, null, true]}\n',
        b'{"a":1}x',
        b"\xef\xbb\xbf{}",
        '{"a":"é"}'.encode("utf-16"),
        b'"\\ud800"',
        b"[1,2",
        b"\xff",
        b"",
    ],
)
def test_a_body_parses_as_json_loads_parses_it(body: bytes) -> None:
    def outcome(parse: Any) -> tuple[str, Any]:
        try:
            return "ok", parse(body)
        except (ValueError, UnicodeDecodeError) as exc:
            return "error", str(exc)

    assert outcome(_parse) == outcome(json.loads)
