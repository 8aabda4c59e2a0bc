"""The compiled document on its own: matching, parameter types, 3.0 and 3.1 schemas."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict

from sidecar.openapi import OpenAPIError, Spec, parse
from sidecar.policy.loader import PolicyError, load_policy


def spec(document: dict[str, Any]) -> Spec:
    return Spec(parse(json.dumps(document).encode(), source="doc.json"), source="doc.json")


def op(**extra: Any) -> dict[str, Any]:
    return {"responses": {"200": {"description": "ok"}}, **extra}


def errors(s: Spec, method: str, target: str, body: Any = None) -> list[str]:
    path, _, query = target.partition("?")
    found = s.match(method, path)
    assert found is not None and found.operation is not None
    raw = None if body is None else json.dumps(body).encode()
    headers = CIMultiDict({"Content-Type": "application/json"} if raw else {})
    return [
        str(v)
        for v in found.operation.check_request(
            path_params=found.path_params, query=query, headers=headers, body=raw
        )
    ]


def test_a_literal_segment_wins_whatever_the_order() -> None:
    s = spec(
        {
            "openapi": "3.0.3",
            "paths": {
                "/users/{id}": {"get": op(operationId="byId")},
                "/users/me": {"get": op(operationId="me")},
                "/files/{name}.json": {"get": op(operationId="json")},
                "/files/{path}": {"get": op(operationId="any")},
                "/": {"get": op(operationId="root")},
            },
        }
    )

    def which(path: str) -> str | None:
        return s.operation_id("GET", path)

    assert which("/users/me") == "me"
    assert which("/users/42?x=1") == "byId"
    assert which("/files/a.json") == "json"
    assert which("/files/a.txt") == "any"
    assert which("/") == "root"
    assert which("/users/42/") is None  # exact paths: the slash makes another one
    assert which("/users") is None
    assert s.operation_id("HEAD", "/users/me") == "me"  # a HEAD is a GET without body
    found = s.match("GET", "/files/a%2Fb")
    assert found is not None and found.path_params == {"path": "a/b"}
    found = s.match("DELETE", "/users/me")
    assert found is not None and found.operation is None and found.methods == ("GET",)


def test_openapi_30_nullable_and_references() -> None:
    s = spec(
        {
            "openapi": "3.0.3",
            "paths": {
                "/n": {
                    "post": op(
                        requestBody={
                            "required": True,
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/N"}}
                            },
                        }
                    )
                }
            },
            "components": {
                "schemas": {
                    "N": {
                        "type": "object",
                        "properties": {
                            "a": {"type": "string", "nullable": True},
                            "b": {"type": "string", "enum": ["x"], "nullable": True},
                            "c": {"allOf": [{"$ref": "#/components/schemas/C"}], "nullable": True},
                            "d": {"type": "integer"},
                            "child": {"$ref": "#/components/schemas/N"},
                        },
                    },
                    "C": {"type": "object", "required": ["id"]},
                }
            },
        }
    )
    assert errors(s, "POST", "/n", {"a": None, "b": None, "c": None, "child": {"a": None}}) == []
    assert errors(s, "POST", "/n", {"d": None, "child": {"child": {"c": {}}}}) == [
        "body at '/d': null is not of type \"integer\"",
        "body at '/child/child/c': {} is not valid under any of the schemas listed in the "
        "'anyOf' keyword",
    ]


def test_openapi_31_type_lists_and_2020_12_keywords() -> None:
    s = spec(
        {
            "openapi": "3.1.0",
            "paths": {
                "/t/{n}": {
                    "parameters": [
                        {"name": "n", "in": "path", "required": True, "schema": {"type": "integer"}}
                    ],
                    "put": op(
                        parameters=[
                            {
                                "name": "tags",
                                "in": "query",
                                "explode": False,
                                "schema": {"type": "array", "items": {"type": "integer"}},
                            },
                            {
                                "name": "X-Mode",
                                "in": "header",
                                "required": True,
                                "schema": {"const": "fast"},
                            },
                        ],
                        requestBody={
                            "content": {
                                "application/merge-patch+json": {
                                    "schema": {
                                        "type": "object",
                                        "properties": {"v": {"type": ["number", "null"]}},
                                        "prefixItems": [],
                                        "unevaluatedProperties": False,
                                    }
                                }
                            }
                        },
                    ),
                }
            },
        }
    )
    found = s.match("PUT", "/t/7")
    assert found is not None and found.operation is not None
    operation = found.operation

    def check(query: str, headers: dict[str, str], body: bytes | None) -> list[str]:
        return [
            str(v)
            for v in operation.check_request(
                path_params=found.path_params, query=query, headers=CIMultiDict(headers), body=body
            )
        ]

    ok = {"X-Mode": "fast", "Content-Type": "application/merge-patch+json"}
    assert check("tags=1,2", ok, b'{"v": null}') == []
    assert check("tags=1,x", {**ok, "X-Mode": "slow"}, b'{"v": 1, "w": 2}') == [
        "query parameter 'tags' at '/1': \"x\" is not of type \"integer\"",
        "header parameter 'X-Mode': \"fast\" was expected",
        "body: Unevaluated properties are not allowed ('w' was unexpected)",
    ]


def test_documents_that_cannot_be_used() -> None:
    with pytest.raises(OpenAPIError, match=r"'openapi' must be 3\.0\.x or 3\.1\.x"):
        parse(b'{"openapi": "4.0.0"}', source="d")
    with pytest.raises(OpenAPIError, match="points outside the document"):
        spec({"openapi": "3.0.0", "paths": {"/a": {"get": op(parameters=[{"$ref": "x.yaml#/p"}])}}})
    with pytest.raises(OpenAPIError, match="not valid JSON or YAML"):
        parse(b"openapi: [", source="d")


def test_policy_errors_point_at_their_keys(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "services:\n"
        "  b:\n"
        "    upstream: http://x\n"
        "    openapi: ${file:relative.json}\n"
        "    validate: {requests: maybe}\n"
    )
    # Checked once the file's own keys are valid: a document to read, validate's partner.
    (tmp_path / "q.yaml").write_text(
        "version: 1\n"
        "services:\n"
        "  a:\n"
        "    upstream: http://x\n"
        "    validate: {requests: report}\n"
        "  c:\n"
        "    upstream: http://x\n"
        "    openapi: missing.json\n"
    )
    with pytest.raises(PolicyError) as err:
        load_policy(str(tmp_path))
    assert [str(p).removeprefix(str(tmp_path) + "/") for p in err.value.problems] == [
        "p.yaml:5:14: a ${file:} path must be absolute: 'relative.json'",
        "p.yaml:6:26: Input should be 'enforce', 'report' or 'off'",
        "q.yaml:5:5: validate needs an 'openapi' document to validate against",
        f"q.yaml:8:14: cannot read OpenAPI document {tmp_path}/missing.json: "
        "No such file or directory",
    ]
