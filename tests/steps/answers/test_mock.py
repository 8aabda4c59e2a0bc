"""mode: mock: inline answers from the policy, and the upstream never called."""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
from aiohttp import web

from tests.conftest import StartSidecar
from tests.policy.test_loader import errors, write

SECRET = "sk-mock-canary-7f3a"


def recording_app(seen: list[web.Request]) -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        seen.append(request)
        return web.json_response({"live": True})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def test_mock_answers_and_never_reaches_the_upstream(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    seen: list[web.Request] = []
    base = await upstream(recording_app(seen))
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth: {{type: bearer, token: "${{env:API_TOKEN}}"}}
            mode: mock
            mock:
              - match: {{method: GET, path: /users/*}}
                status: 200
                headers: {{X-Request-Id: mock-1}}
                body: {{id: 7, name: Ada}}
                delay: 20ms
              - match: {{method: POST, path: /users}}
                status: 201
                body: created
              - match: {{path: /empty}}
                status: 204
        """,
        env={"API_TOKEN": SECRET},
    )
    async with client.get(f"{sc.url}/api/users/7?expand=1") as r:
        assert r.status == 200
        assert r.headers["X-Sidecar-Mock"] == "true"
        assert r.headers["X-Request-Id"] == "mock-1"
        assert r.headers["Content-Type"] == "application/json"
        assert await r.json() == {"id": 7, "name": "Ada"}
    async with client.post(f"{sc.url}/api/users", data=b'{"name": "x"}') as r:
        assert r.status == 201
        assert r.headers["Content-Type"].startswith("text/plain")
        assert await r.text() == "created"
    async with client.delete(f"{sc.url}/api/empty") as r:
        assert r.status == 204
        assert r.headers["X-Sidecar-Mock"] == "true"
    # A HEAD is answered as its GET would be, without a body.
    async with client.head(f"{sc.url}/api/users/7") as r:
        assert r.status == 200
        assert await r.read() == b""
    # No rule: 501 no_mock, still not the upstream.
    async with client.get(f"{sc.url}/api/orders") as r:
        assert r.status == 501
        assert r.headers["X-Sidecar-Error"] == "no_mock"
        assert r.headers["X-Sidecar-Mock"] == "true"
        problem = await r.json()
        assert problem["reason"] == "no_mock"
        assert "GET /orders" in problem["detail"]
        assert SECRET not in await r.text()
    assert seen == []
    async with client.get(f"{sc.admin}/services") as r:
        assert (await r.json())["services"]["api"]["mode"] == "mock"
    async with client.get(f"{sc.admin}/config") as r:
        assert SECRET not in await r.text()


async def test_refusals_still_apply_in_mock_mode(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    # Developed offline, refused as in production: allow rules run before the mock.
    seen: list[web.Request] = []
    base = await upstream(recording_app(seen))
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            mode: mock
            allow:
              - {{agents: [reader], methods: [GET]}}
            mock:
              - {{body: ok}}
        """
    )
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Id": "reader"}) as r:
        assert r.status == 200
        assert await r.text() == "ok"
    async with client.post(f"{sc.url}/api/x", headers={"X-Agent-Id": "reader"}) as r:
        assert r.status == 403
        assert r.headers["X-Sidecar-Error"] == "forbidden"
        assert "X-Sidecar-Mock" not in r.headers
    assert seen == []


async def test_live_service_with_mock_answers_is_refused(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          api:
            upstream: https://api.example.com
            mock:
              - {body: ok}
        """,
    )
    found = errors(tmp_path)
    assert any("mock answers are used only with mode: mock" in e for e in found), found
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          api:
            upstream: https://api.example.com
            mode: mock
            mock:
              - {match: {method: FETCH}}
        """,
    )
    assert any("p.yaml:7:26: method must be * or one of" in e for e in errors(tmp_path))


API = {
    "openapi": "3.1.0",
    "info": {"title": "pets", "version": "1"},
    "paths": {
        "/pets/{id}": {
            "get": {
                "operationId": "getPet",
                "parameters": [
                    {"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}
                ],
                "responses": {
                    "404": {"description": "none"},
                    "200": {
                        "description": "a pet",
                        "content": {
                            "application/json": {
                                "examples": {"rex": {"$ref": "#/components/examples/rex"}}
                            }
                        },
                    },
                },
            },
            "delete": {"responses": {"204": {"description": "gone"}}},
        },
        "/pets": {
            "get": {
                "responses": {
                    "200": {
                        "description": "pets",
                        "content": {
                            "text/csv": {"example": "id,name\n1,rex\n"},
                            "application/json": {
                                "schema": {"type": "array", "example": [{"id": 1}]}
                            },
                        },
                    }
                }
            },
            "post": {
                "responses": {"201": {"description": "made", "content": {"application/json": {}}}}
            },
        },
    },
    "components": {"examples": {"rex": {"value": {"id": 1, "name": "Rex"}}}},
}


async def test_openapi_examples_answer_what_no_rule_does(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    seen: list[web.Request] = []
    base = await upstream(recording_app(seen))
    sc = await start_sidecar(
        {
            "policy.yaml": f"""
                version: 1
                services:
                  pets:
                    upstream: {base}
                    openapi: api.json
                    mode: mock
                    mock:
                      - {{match: {{method: GET, path: /pets/2}}, body: {{id: 2, name: Tom}}}}
                """,
            "api.json": json.dumps(API),
        }
    )
    async with client.get(f"{sc.url}/pets/pets/1") as r:
        assert r.status == 200
        assert r.headers["X-Sidecar-Mock"] == "true"
        assert await r.json() == {"id": 1, "name": "Rex"}
    # A rule of the policy wins over the document.
    async with client.get(f"{sc.url}/pets/pets/2") as r:
        assert await r.json() == {"id": 2, "name": "Tom"}
    # JSON first, from the schema's example.
    async with client.get(f"{sc.url}/pets/pets") as r:
        assert r.headers["Content-Type"] == "application/json"
        assert await r.json() == [{"id": 1}]
    async with client.delete(f"{sc.url}/pets/pets/1") as r:
        assert r.status == 204
    # No example: no_mock, which says where one could go.
    async with client.post(f"{sc.url}/pets/pets", json={}) as r:
        assert r.status == 501
        assert "OpenAPI document" in (await r.json())["detail"]
    # The document still validates calls first.
    async with client.get(f"{sc.url}/pets/pets/abc") as r:
        assert r.status == 422
    assert seen == []
