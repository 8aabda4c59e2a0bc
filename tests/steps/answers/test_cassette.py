"""mode: record and mode: replay: record against a live upstream, replay with it stopped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from sidecar.app import serve
from sidecar.runtime import Sidecar
from tests.conftest import StartSidecar

SECRET = "sk-cassette-canary-51c9e2"
EVENTS = [b"data: one\n\n", b"event: tick\ndata: two\n\n", b"data: [DONE]\n\n"]
# Differ between a live answer and its replay by nature, or exist on one side only.
_UNCOMPARED = {"x-sidecar-replay", "transfer-encoding", "connection", "keep-alive"}


def api_app() -> web.Application:
    async def item(request: web.Request) -> web.Response:
        # Echoes the credential back, as some debugging endpoints do: it must not be saved.
        return web.json_response(
            {
                "id": request.match_info["id"],
                "q": request.query_string,
                "auth": request.headers.get("Authorization", ""),
                "name": "Ada Lovelace, née Byron",
            },
            headers={"X-Request-Id": "req-1", "Set-Cookie": "session=abc123secretcookie"},
        )

    async def create(request: web.Request) -> web.Response:
        body = await request.json()
        return web.json_response({"created": body["name"]}, status=201)

    async def order(request: web.Request) -> web.Response:
        return web.json_response({"zeta": 1, "alpha": [2, {"y": None, "b": "é"}]})

    async def blob(request: web.Request) -> web.Response:
        return web.Response(body=bytes(range(256)), content_type="application/octet-stream")

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in EVENTS:
            await response.write(event)
            await asyncio.sleep(0.01)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/items/{id}", item)
    app.router.add_post("/items", create)
    app.router.add_get("/order", order)
    app.router.add_get("/blob", blob)
    app.router.add_get("/stream", stream)
    return app


def policy(base: str, mode: str, extra: str = "") -> str:
    return f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth: {{type: bearer, token: "${{env:API_TOKEN}}"}}
            mode: {mode}
            cassettes:
              dir: ../tapes
              redact: [Set-Cookie]
              {extra}
        """


CALLS: list[tuple[str, str, bytes | None]] = [
    ("GET", "/api/items/7?expand=1", None),
    ("POST", "/api/items", b'{"name": "x", "request_id": "r-1"}'),
    ("GET", "/api/order", None),
    ("GET", "/api/blob", None),
    ("GET", "/api/stream", None),
]


def listed(tapes: Path) -> list[Path]:
    return sorted(tapes.glob("*.json"))


async def saved(tapes: Path, count: int) -> list[Path]:
    """The cassette files once `count` are there: a file is written just after the
    answer's last byte left, so the agent may have it a moment before."""
    for _ in range(500):
        files = listed(tapes)
        if len(files) >= count:
            return files
        await asyncio.sleep(0.01)
    return listed(tapes)


async def fetch(
    client: aiohttp.ClientSession, url: str, method: str, data: bytes | None
) -> tuple[int, dict[str, str], bytes]:
    async with client.request(method, url, data=data) as r:
        headers = {k.lower(): v for k, v in r.headers.items() if k.lower() not in _UNCOMPARED}
        return r.status, headers, await r.read()


async def test_record_then_replay_with_the_upstream_stopped(
    tmp_path: Path, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    runner = web.AppRunner(api_app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        recorder = await start_sidecar(policy(base, "record"), env={"API_TOKEN": SECRET})
        live = [await fetch(client, recorder.url + url, m, d) for m, url, d in CALLS]
    finally:
        await runner.cleanup()
    assert [status for status, _, _ in live] == [200, 201, 200, 200, 200]
    assert SECRET in json.loads(live[0][2])["auth"]  # the agent itself sees the echo
    assert b"".join(EVENTS) == live[4][2]

    tapes = tmp_path / "tapes"
    files = await saved(tapes, len(CALLS))
    assert len(files) == len(CALLS)
    for path in files:
        text = path.read_text()
        assert SECRET not in text, path
        assert "abc123secretcookie" not in text, path
        assert json.loads(text)["request"]["method"] in ("GET", "POST")
    # Readable: the JSON answer is kept parsed, the SSE answer as events.
    stream = json.loads(next(p for p in files if "stream" in p.name).read_text())
    order = json.loads(next(p for p in files if "order" in p.name).read_text())
    assert order["response"]["body_json"] == {"zeta": 1, "alpha": [2, {"y": None, "b": "é"}]}
    assert [e["data"] for e in stream["response"]["events"]] == [e.decode() for e in EVENTS]

    replayer = await start_sidecar(
        policy(base, "replay", "pacing: fast"), env={"API_TOKEN": SECRET}
    )
    for (method, url, data), (status, headers, body) in zip(CALLS, live, strict=True):
        async with client.request(method, replayer.url + url, data=data) as r:
            assert r.headers["X-Sidecar-Replay"] == "true"
            got = {k.lower(): v for k, v in r.headers.items() if k.lower() not in _UNCOMPARED}
            replayed = await r.read()
            assert r.status == status
        if url.startswith("/api/items/7"):
            # The echoed credential was redacted before it was written.
            assert json.loads(replayed)["auth"] == "[redacted]"
            assert got.pop("set-cookie") == "[redacted]"
            headers.pop("set-cookie")
            assert got.pop("content-length") != ""
            headers.pop("content-length")
        else:
            assert replayed == body
        assert got == headers

    # Paced replay of the SSE answer gives the same bytes.
    paced = await start_sidecar(policy(base, "replay"), env={"API_TOKEN": SECRET})
    assert (await fetch(client, paced.url + "/api/stream", "GET", None))[2] == b"".join(EVENTS)

    # Nothing recorded for this call: 501 no_recording naming it, the upstream untouched.
    async with client.get(f"{replayer.url}/api/items/8?expand=1") as r:
        assert r.status == 501
        assert r.headers["X-Sidecar-Error"] == "no_recording"
        assert r.headers["X-Sidecar-Replay"] == "true"
        problem = await r.json()
        assert problem["reason"] == "no_recording"
        assert "GET /items/8?expand=1" in problem["detail"]
        assert SECRET not in await r.text()
    # Another body on the same path is another call.
    async with client.post(f"{replayer.url}/api/items", data=b'{"name": "y"}') as r:
        assert r.status == 501


async def test_ignored_json_fields_and_passthrough(
    upstream: Callable[[web.Application], Awaitable[str]],
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    base = await upstream(api_app())
    recorder = await start_sidecar(policy(base, "record"), env={"API_TOKEN": SECRET})
    async with client.post(f"{recorder.url}/api/items", data=CALLS[1][2]) as r:
        assert r.status == 201
    tapes = recorder.policies.parent / "tapes"
    assert len(await saved(tapes, 1)) == 1

    replayer = await start_sidecar(
        policy(
            base,
            "replay",
            "match: {ignore_json_fields: [request_id]}\n              on_missing: passthrough",
        ),
        env={"API_TOKEN": SECRET},
    )
    # Another request_id matches the recording: it is answered without the upstream.
    async with client.post(
        f"{replayer.url}/api/items", data=b'{"name": "x", "request_id": "r-2"}'
    ) as r:
        assert r.status == 201
        assert r.headers["X-Sidecar-Replay"] == "true"
        assert await r.json() == {"created": "x"}
    # No recording: passed through to the live upstream, which answers it.
    async with client.get(f"{replayer.url}/api/items/9") as r:
        assert r.status == 200
        assert "X-Sidecar-Replay" not in r.headers
        assert (await r.json())["id"] == "9"
    # Passthrough calls are not recorded.
    assert len(list(tapes.glob("*.json"))) == 1


async def test_a_query_credential_never_reaches_a_cassette(
    upstream: Callable[[web.Application], Awaitable[str]],
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    base = await upstream(api_app())
    recorder = await start_sidecar(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth: {{type: query, name: key, value: "${{env:API_KEY}}"}}
            mode: record
        """,
        env={"API_KEY": SECRET},
    )
    async with client.get(f"{recorder.url}/api/items/3?key=agent-own&page=2") as r:
        assert r.status == 200
        assert SECRET in (await r.json())["q"]  # the upstream got it, and echoed it
    tapes = recorder.policies / "cassettes" / "api"
    files = await saved(tapes, 1)
    assert len(files) == 1
    text = files[0].read_text()
    assert SECRET not in text
    assert json.loads(text)["request"]["query"] == "page=2"

    replayer = await start_sidecar(
        {
            "policy.yaml": f"""
            version: 1
            services:
              api:
                upstream: {base}
                auth: {{type: query, name: key, value: "${{env:API_KEY}}"}}
                mode: replay
                cassettes: ../policies0/cassettes/api
            """
        },
        env={"API_KEY": SECRET},
    )
    async with client.get(f"{replayer.url}/api/items/3?page=2") as r:
        assert r.status == 200
        assert r.headers["X-Sidecar-Replay"] == "true"
        assert SECRET not in await r.text()


async def test_the_mode_of_every_service_set_at_start(
    tmp_path: Path, client: aiohttp.ClientSession
) -> None:
    """`sidecar run --mode record|replay` (SIDECAR_MODE): live services follow it."""
    runner = web.AppRunner(api_app(), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        f"version: 1\nservices:\n  api:\n    upstream: {base}\n"
        "  offline:\n    upstream: http://127.0.0.1:9\n    mode: mock\n"
        "    mock: [{body: mocked}]\n"
    )

    async def started(mode: str) -> tuple[Sidecar, list[Any], str]:
        sidecar = Sidecar(str(policies), mode=mode)
        assert (await sidecar.reload("startup")).ok
        listeners = await serve(sidecar, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))
        return sidecar, listeners, f"http://127.0.0.1:{listeners[0].addresses[0][1]}"

    recorder, listeners, url = await started("record")
    try:
        live = await fetch(client, f"{url}/api/order", "GET", None)
        assert "x-sidecar-replay" not in live[1]
        assert len(await saved(policies / "cassettes" / "api", 1)) == 1
    finally:
        await runner.cleanup()
        for listener in listeners:
            await listener.cleanup()
        await recorder.close()

    replayer, listeners, url = await started("replay")
    try:
        async with client.get(f"{url}/api/order") as r:
            assert r.headers["X-Sidecar-Replay"] == "true"
            assert await r.read() == live[2]
        async with client.get(f"{url}/offline/x") as r:  # a mock service stays mocked
            assert r.headers["X-Sidecar-Mock"] == "true"
            assert await r.text() == "mocked"
    finally:
        for listener in listeners:
            await listener.cleanup()
        await replayer.close()
