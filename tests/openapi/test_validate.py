"""Request validation against a real OpenAPI document, through the real sidecar.

The upstream is a real aiohttp server that records what reached it; the
document is the public Petstore (tests/data/openapi). A refused call must
never reach the upstream; a reported one must reach it unchanged.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import StartSidecar

DATA = Path(__file__).resolve().parents[1] / "data" / "openapi"
PETSTORE = DATA / "petstore.yaml"
PET = {"name": "doggie", "photoUrls": ["https://example.com/a.png"], "status": "sold"}


class Recorder:
    """An upstream that records each call and answers 200 JSON (or what a test sets)."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.status = 200
        self.content_type = "application/json"

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            body = await request.read()
            self.calls.append(
                {
                    "method": request.method,
                    "path": request.raw_path,
                    "headers": dict(request.headers),
                    "body": body,
                }
            )
            return web.Response(
                status=self.status, body=b'{"ok": true}', content_type=self.content_type
            )

        app = web.Application(client_max_size=64 << 20)
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def policy(upstream: str, validate: str, *, extra: str = "", spec: Path = PETSTORE) -> str:
    return f"""
        version: 1
        services:
          pets:
            upstream: {upstream}
            openapi: ${{file:{spec}}}
            validate: {validate}
            {extra}
        """


@pytest.fixture
async def pets(upstream: Any) -> tuple[Recorder, str]:
    recorder = Recorder()
    return recorder, await upstream(recorder.app())


async def problem(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    assert resp.headers["Content-Type"].startswith("application/problem+json")
    body: dict[str, Any] = json.loads(await resp.read())
    assert body["reason"] == resp.headers["X-Sidecar-Error"]
    return body


async def test_valid_calls_pass_unchanged(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}"))
    raw = json.dumps(PET).encode()
    async with client.post(
        f"{sc.url}/pets/pet", data=raw, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/pets/pet/findByStatus?status=sold&status=pending") as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/pets/pet/42") as resp:
        assert resp.status == 200
    # Not JSON: only the media type is checked against the document.
    async with client.post(
        f"{sc.url}/pets/pet", data=b"<pet/>", headers={"Content-Type": "application/xml"}
    ) as resp:
        assert resp.status == 200
    assert [c["path"] for c in recorder.calls] == [
        "/pet",
        "/pet/findByStatus?status=sold&status=pending",
        "/pet/42",
        "/pet",
    ]
    assert recorder.calls[0]["body"] == raw


async def test_an_invalid_body_is_refused_with_each_error_and_never_sent(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}"))
    bad = {"name": None, "photoUrls": "x", "status": "gone", "tags": [{"id": "seven"}]}
    async with client.post(f"{sc.url}/pets/pet", json=bad) as resp:
        assert resp.status == 422
        body = await problem(resp)
    assert body["reason"] == "invalid_request"
    assert body["service"] == "pets"
    assert body["operation"] == "addPet"
    errors = {(e["in"], e["pointer"]): e["message"] for e in body["errors"]}
    assert errors == {
        ("body", "/name"): 'null is not of type "string"',
        ("body", "/photoUrls"): '"x" is not of type "array"',
        ("body", "/status"): '"gone" is not one of "available", "pending" or "sold"',
        ("body", "/tags/0/id"): '"seven" is not of type "integer"',
    }
    assert "addPet" in body["detail"] and "/name" in body["detail"]
    # A required property missing: the pointer is the object that lacks it.
    async with client.post(f"{sc.url}/pets/pet", json={"name": "x"}) as resp:
        body = await problem(resp)
    assert body["errors"] == [
        {"in": "body", "pointer": "", "message": '"photoUrls" is a required property'}
    ]
    assert recorder.calls == []


async def test_parameters_are_checked_as_their_types(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}"))
    async with client.get(f"{sc.url}/pets/pet/abc") as resp:
        assert resp.status == 422
        body = await problem(resp)
    assert body["errors"] == [
        {"in": "path", "name": "petId", "pointer": "", "message": '"abc" is not of type "integer"'}
    ]
    async with client.get(f"{sc.url}/pets/pet/findByStatus?status=sold&status=lost") as resp:
        body = await problem(resp)
    assert body["errors"] == [
        {
            "in": "query",
            "name": "status",
            "pointer": "/1",
            "message": '"lost" is not one of "available", "pending" or "sold"',
        }
    ]
    async with client.get(f"{sc.url}/pets/pet/findByStatus") as resp:
        body = await problem(resp)
    assert body["errors"] == [
        {"in": "query", "name": "status", "pointer": "", "message": "is required"}
    ]
    async with client.get(f"{sc.url}/pets/store/order/11") as resp:
        body = await problem(resp)
    assert body["errors"][0]["message"] == "11 is greater than the maximum of 10"
    async with client.get(f"{sc.url}/pets/store/order/10") as resp:
        assert resp.status == 200
    assert [c["path"] for c in recorder.calls] == ["/store/order/10"]


async def test_malformed_json_wrong_and_missing_content_type(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}"))
    async with client.post(
        f"{sc.url}/pets/pet", data=b'{"name": "x",', headers={"Content-Type": "application/json"}
    ) as resp:
        body = await problem(resp)
    [error] = body["errors"]
    assert error["in"] == "body" and error["message"].startswith("not valid JSON")
    async with client.post(
        f"{sc.url}/pets/pet", data=json.dumps(PET), headers={"Content-Type": "text/plain"}
    ) as resp:
        body = await problem(resp)
    assert body["errors"][0]["message"] == (
        "Content-Type text/plain is not one of: application/json, application/xml"
    )
    async with client.post(f"{sc.url}/pets/pet") as resp:
        body = await problem(resp)
    assert body["errors"][0]["message"] == "a request body is required"
    assert recorder.calls == []


async def test_a_one_megabyte_body(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}"))
    big = {**PET, "photoUrls": [f"https://example.com/{i:08d}.png" for i in range(32_000)]}
    raw = json.dumps(big).encode()
    assert len(raw) > 1 << 20
    async with client.post(
        f"{sc.url}/pets/pet", data=raw, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 200
    assert recorder.calls[0]["body"] == raw
    # The same size, one bad item deep inside: found, and the answer stays small.
    big["photoUrls"][31_999] = 7
    big["name"] = "x" * (1 << 20)
    big["status"] = "y" * (1 << 20)
    async with client.post(f"{sc.url}/pets/pet", json=big) as resp:
        assert resp.status == 422
        text = await resp.read()
    body = json.loads(text)
    errors = {e["pointer"]: e["message"] for e in body["errors"]}
    assert set(errors) == {"/photoUrls/31999", "/status"}
    assert errors["/photoUrls/31999"] == '7 is not of type "string"'
    # The schema's message quotes the value: cut short, so the answer stays small.
    assert errors["/status"].startswith('"yyyy') and errors["/status"].endswith("…")
    assert len(text) < 4096
    assert len(recorder.calls) == 1


async def test_chunked_body_cannot_be_validated_and_is_refused(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}"))

    async def chunks() -> Any:
        yield json.dumps(PET).encode()

    async with client.post(
        f"{sc.url}/pets/pet", data=chunks(), headers={"Content-Type": "application/json"}
    ) as resp:
        body = await problem(resp)
    assert resp.status == 422
    assert "without Content-Length" in body["errors"][0]["message"]
    assert recorder.calls == []


async def test_report_counts_and_logs_but_sends(
    start_sidecar: StartSidecar,
    pets: tuple[Recorder, str],
    client: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: report}"))
    bad = {"name": 5, "photoUrls": []}
    with caplog.at_level(logging.WARNING, logger="sidecar.validate"):
        async with client.post(f"{sc.url}/pets/pet", json=bad) as resp:
            assert resp.status == 200
            assert "X-Sidecar-Error" not in resp.headers
    assert json.loads(recorder.calls[0]["body"]) == bad
    assert "addPet" in caplog.text and "/name" in caplog.text
    async with client.get(f"{sc.admin}/metrics") as resp:
        metrics = await resp.text()
    assert (
        'sidecar_openapi_request_violations_total{action="reported",operation="addPet",'
        'service="pets"} 1.0' in metrics
    )


async def test_unknown_operations_forbidden(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{unknown_operations: forbid}"))
    async with client.get(f"{sc.url}/pets/pets") as resp:
        assert resp.status == 404
        body = await problem(resp)
    assert body["reason"] == "unknown_operation"
    assert "describes no path" in body["detail"]
    async with client.patch(f"{sc.url}/pets/pet/7") as resp:
        body = await problem(resp)
    assert "only DELETE, GET, POST" in body["detail"]
    # OpenAPI paths are exact: a trailing slash is another path.
    async with client.get(f"{sc.url}/pets/pet/7/") as resp:
        assert resp.status == 404
    async with client.get(f"{sc.url}/pets/pet/7") as resp:
        assert resp.status == 200
    assert len(recorder.calls) == 1
    async with client.get(f"{sc.admin}/metrics") as resp:
        metrics = await resp.text()
    assert (
        'sidecar_openapi_request_violations_total{action="refused",operation="_unknown",'
        'service="pets"} 3.0' in metrics
    )


async def test_unknown_operations_allowed_by_default(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}"))
    async with client.get(f"{sc.url}/pets/not/in/the/document") as resp:
        assert resp.status == 200
    assert len(recorder.calls) == 1


async def test_response_drift_is_counted_and_the_answer_unchanged(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: off, responses: report}"))
    # getPetById answers 200 with JSON or XML: as the document says.
    async with client.get(f"{sc.url}/pets/pet/1") as resp:
        assert resp.status == 200
    recorder.content_type = "text/html"
    async with client.get(f"{sc.url}/pets/pet/1") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/html")
    # addPet documents only 405: a 200 is drift in status.
    recorder.content_type = "application/json"
    async with client.post(f"{sc.url}/pets/pet", json={"anything": 1}) as resp:
        assert resp.status == 200
        assert await resp.json() == {"ok": True}
    async with client.get(f"{sc.admin}/metrics") as resp:
        metrics = await resp.text()
    drift = [line for line in metrics.splitlines() if line.startswith("sidecar_openapi_response")]
    assert sorted(drift) == [
        'sidecar_openapi_response_drift_total{kind="content_type",operation="getPetById",'
        'service="pets"} 1.0',
        'sidecar_openapi_response_drift_total{kind="status",operation="addPet",service="pets"} 1.0',
    ]
    assert len(recorder.calls) == 3


async def test_the_credential_never_shows_in_a_refusal_or_metrics(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    token = "sk-live-very-secret-0123456789"
    sc = await start_sidecar(
        policy(url, "{requests: enforce}", extra='auth: {type: bearer, token: "${env:PET_TOKEN}"}'),
        env={"PET_TOKEN": token},
    )
    async with client.get(
        f"{sc.url}/pets/pet/abc", headers={"Authorization": "Bearer agent-own"}
    ) as resp:
        text = await resp.text()
        assert resp.status == 422
        assert token not in text and token not in str(resp.headers)
    async with client.get(f"{sc.url}/pets/pet/1") as resp:
        assert resp.status == 200
    assert recorder.calls[0]["headers"]["Authorization"] == f"Bearer {token}"
    for page in ("/metrics", "/config", "/services"):
        async with client.get(f"{sc.admin}{page}") as resp:
            assert token not in await resp.text()


async def test_document_next_to_the_policy_and_reloaded_when_it_changes(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    from tests.helpers import eventually

    _, url = pets
    text = PETSTORE.read_text()
    # Kept among the policy files: read as the service's document, not as a policy.
    sc = await start_sidecar(
        {
            "policy.yaml": f"""
                version: 1
                services:
                  pets:
                    upstream: {url}
                    openapi: petstore.yaml
                """,
            "petstore.yaml": text,
        },
        watch=True,
    )
    async with client.get(f"{sc.url}/pets/store/order/11") as resp:
        assert resp.status == 422
    sc.write("petstore.yaml", text.replace("maximum: 10", "maximum: 100"))

    async def accepted() -> bool:
        async with client.get(f"{sc.url}/pets/store/order/11") as resp:
            return resp.status == 200

    await eventually(accepted, "the changed document to be used")


async def test_openapi_31_document(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    sc = await start_sidecar(policy(url, "{requests: enforce}", spec=DATA / "train-travel.yaml"))
    good = {
        "trip_id": "4f4e4e1c-c824-4d63-b37a-d8d698862f1d",
        "passenger_name": "John Doe",
        "has_bicycle": True,
        "has_dog": False,
    }
    async with client.post(f"{sc.url}/pets/bookings", json=good) as resp:
        assert resp.status == 200, await resp.text()
    async with client.post(f"{sc.url}/pets/bookings", json={**good, "has_dog": "yes"}) as resp:
        body = await problem(resp)
    assert {(e["pointer"], e["message"]) for e in body["errors"]} == {
        ("/has_dog", '"yes" is not of type "boolean"')
    }
    assert len(recorder.calls) == 1


async def test_the_credential_parameter_is_not_asked_of_the_agent(
    tmp_path: Path,
    start_sidecar: StartSidecar,
    pets: tuple[Recorder, str],
    client: aiohttp.ClientSession,
) -> None:
    """Documents often list the API key as a required parameter; the sidecar adds it."""
    recorder, url = pets
    document = {
        "openapi": "3.0.3",
        "paths": {
            "/h": {
                "get": {
                    "parameters": [
                        {
                            "name": "X-Api-Key",
                            "in": "header",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                        {
                            "name": "q",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {"200": {"description": "ok"}},
                }
            },
            "/q": {
                "get": {
                    "parameters": [
                        {
                            "name": "api_key",
                            "in": "query",
                            "required": True,
                            "schema": {"type": "string"},
                        },
                    ],
                    "responses": {"200": {"description": "ok"}},
                }
            },
        },
    }
    spec = tmp_path / "doc.json"
    spec.write_text(json.dumps(document))
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          h:
            upstream: {url}
            openapi: ${{file:{spec}}}
            auth: {{type: header, name: x-api-key, value: hkey}}
          q:
            upstream: {url}
            openapi: ${{file:{spec}}}
            auth: {{type: query, name: api_key, value: qkey}}
        """
    )
    async with client.get(f"{sc.url}/h/h?q=1") as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/h/h") as resp:
        body = await problem(resp)
    assert [e["name"] for e in body["errors"]] == ["q"]  # only what the agent must send
    async with client.get(f"{sc.url}/q/q") as resp:
        assert resp.status == 200
    sent = {k.lower(): v for k, v in recorder.calls[0]["headers"].items()}
    assert sent["x-api-key"] == "hkey"
    assert recorder.calls[1]["path"] == "/q?api_key=qkey"


async def test_read_only_properties_are_not_required_of_a_request(
    tmp_path: Path,
    start_sidecar: StartSidecar,
    pets: tuple[Recorder, str],
    client: aiohttp.ClientSession,
) -> None:
    recorder, url = pets
    schema = {
        "type": "object",
        "required": ["id", "name"],
        "properties": {"id": {"type": "integer", "readOnly": True}, "name": {"type": "string"}},
    }
    document = {
        "openapi": "3.0.3",
        "paths": {
            "/things": {
                "post": {
                    "requestBody": {"content": {"application/json": {"schema": schema}}},
                    "responses": {"201": {"description": "made"}},
                }
            }
        },
    }
    spec = tmp_path / "doc.json"
    spec.write_text(json.dumps(document))
    sc = await start_sidecar(policy(url, "{requests: enforce}", spec=spec))
    async with client.post(f"{sc.url}/pets/things", json={"name": "x"}) as resp:
        assert resp.status == 200
    async with client.post(f"{sc.url}/pets/things", json={"id": 1}) as resp:
        body = await problem(resp)
    assert body["errors"][0]["message"] == '"name" is a required property'
    assert len(recorder.calls) == 1


async def test_allow_rules_name_operations_of_the_document(
    start_sidecar: StartSidecar, pets: tuple[Recorder, str], client: aiohttp.ClientSession
) -> None:
    recorder, url = pets
    rules = (
        "allow:\n"
        "              - {agents: [reader], operations: [getPetById, find*]}\n"
        "              - {agents: [admin]}"
    )
    sc = await start_sidecar(policy(url, "{requests: report}", extra=rules))
    reader = {"X-Agent-Id": "reader"}
    async with client.get(f"{sc.url}/pets/pet/42", headers=reader) as resp:
        assert resp.status == 200
    async with client.get(f"{sc.url}/pets/pet/findByStatus?status=sold", headers=reader) as resp:
        assert resp.status == 200
    async with client.delete(f"{sc.url}/pets/pet/42", headers=reader) as resp:
        assert resp.status == 403
        assert (await problem(resp))["reason"] == "forbidden"
    # A path outside the document is no operation: only the rule without operations allows it.
    async with client.get(f"{sc.url}/pets/nowhere", headers=reader) as resp:
        assert resp.status == 403
    async with client.delete(f"{sc.url}/pets/pet/42", headers={"X-Agent-Id": "admin"}) as resp:
        assert resp.status == 200
    assert [(c["method"], c["path"]) for c in recorder.calls] == [
        ("GET", "/pet/42"),
        ("GET", "/pet/findByStatus?status=sold"),
        ("DELETE", "/pet/42"),
    ]


def test_operations_must_exist_in_the_document_and_need_one(tmp_path: Path) -> None:
    from sidecar.policy.loader import PolicyError, load_policy

    (tmp_path / "p.yaml").write_text(
        "version: 1\n"
        "services:\n"
        "  pets:\n"
        "    upstream: http://127.0.0.1:9\n"
        f"    openapi: ${{file:{PETSTORE}}}\n"
        "    allow: [{operations: [getPetByID, nothing*]}]\n"
        "  plain:\n"
        "    upstream: http://127.0.0.1:9\n"
        "    allow: [{operations: [getPetById]}]\n"
    )
    with pytest.raises(PolicyError) as caught:
        load_policy(str(tmp_path))
    text = "\n".join(str(p) for p in caught.value.problems)
    assert "p.yaml:6:27: unknown operation 'getPetByID'" in text
    assert "did you mean 'getPetById'?" in text
    assert "p.yaml:6:39: operation glob 'nothing*' matches no operationId" in text
    assert "p.yaml:9:14: operations need an 'openapi' document on service 'plain'" in text
