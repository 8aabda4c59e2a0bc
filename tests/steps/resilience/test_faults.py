"""faults: injected latency, aborts, resets, slow answers and cut SSE streams,
switched at runtime by the admin port and always visible."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict

from sidecar.core.call import Call, Reply, StaticReply
from sidecar.core.problems import ProblemError
from sidecar.policy.testing import Faults as FaultsConfig
from sidecar.steps.resilience.faults import Faults
from tests.conftest import StartSidecar

SECRET = "sk-fault-canary-91c2"
BIG = bytes(range(256)) * 80  # 20 KiB


class Upstream:
    """Counts calls; /big answers BIG, /events streams six SSE events, else JSON."""

    def __init__(self) -> None:
        self.hits = 0
        self.authorization: list[str] = []

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.StreamResponse:
            self.hits += 1
            self.authorization.append(request.headers.get("Authorization", ""))
            if request.path == "/big":
                return web.Response(body=BIG, content_type="application/octet-stream")
            if request.path == "/events":
                response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await response.prepare(request)
                for i in range(6):
                    # Split inside an event's blank line: counting must not depend on chunks.
                    await response.write(f"id: {i}\ndata: event {i}\n".encode())
                    await response.write(b"\n")
                await response.write_eof()
                return response
            return web.json_response({"live": True})

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app


def policy(base: str, faults: str) -> str:
    return f"""
        version: 1
        services:
          api:
            upstream: {base}
            auth: {{type: bearer, token: "${{env:API_TOKEN}}"}}
            faults: {faults}
          calm:
            upstream: {base}
        """


async def start(start_sidecar: StartSidecar, base: str, faults: str):  # type: ignore[no-untyped-def]
    return await start_sidecar(policy(base, faults), env={"API_TOKEN": SECRET})


async def test_delay_and_abort_answer_without_calling_the_upstream(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    sc = await start(
        start_sidecar, base, "{delay: {fixed: 10ms}, abort: {ratio: 1.0, status: 500}}"
    )
    async with client.get(f"{sc.url}/api/x") as r:
        assert r.status == 500
        assert r.headers["X-Sidecar-Fault"] == "delay,abort"
        assert r.headers["X-Sidecar-Error"] == "fault_injected"
        assert r.headers["Content-Type"] == "application/problem+json"
        text = await r.text()
        problem = json.loads(text)
        assert problem["status"] == 500
        assert problem["reason"] == "fault_injected"
        assert "faults.abort" in problem["detail"]
        assert SECRET not in text
    assert up.hits == 0
    # Another service of the same upstream is untouched.
    async with client.get(f"{sc.url}/calm/x") as r:
        assert r.status == 200
        assert "X-Sidecar-Fault" not in r.headers
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    assert 'sidecar_faults_injected_total{kind="abort",service="api"} 1.0' in text
    assert 'sidecar_faults_injected_total{kind="delay",service="api"} 1.0' in text
    labels = 'code="500",method="GET",reason="fault_injected",service="api"'
    assert f"sidecar_request_duration_seconds_count{{{labels}}} 1.0" in text


async def test_ratio_zero_never_injects(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    sc = await start(start_sidecar, base, "{abort: {ratio: 0.0}, reset: {ratio: 0}}")
    for _ in range(20):
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.status == 200
            assert "X-Sidecar-Fault" not in r.headers
    assert up.hits == 20
    assert up.authorization[-1] == f"Bearer {SECRET}"


async def test_reset_cuts_the_agents_connection(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    sc = await start(start_sidecar, base, "{reset: {ratio: 1.0}}")
    with pytest.raises(aiohttp.ClientError):
        async with client.get(f"{sc.url}/api/x") as r:
            assert r.headers["X-Sidecar-Fault"] == "reset"
            await r.read()
    assert up.hits == 0
    # The sidecar itself is fine: the next connection gets its answer.
    async with client.get(f"{sc.url}/calm/x") as r:
        assert r.status == 200
    async with client.get(f"{sc.admin}/metrics") as r:
        text = await r.text()
    assert 'sidecar_faults_injected_total{kind="reset",service="api"} 1.0' in text


async def test_bandwidth_limit_still_delivers_the_whole_answer(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    sc = await start(start_sidecar, base, "{bandwidth: {per_second: 200KiB}}")
    async with client.get(f"{sc.url}/api/big") as r:
        assert r.status == 200
        assert r.headers["X-Sidecar-Fault"] == "bandwidth"
        assert r.headers["Content-Length"] == str(len(BIG))
        assert await r.read() == BIG


async def read_events(r: aiohttp.ClientResponse) -> tuple[bytes, bool]:
    """What arrived, and whether the stream was cut rather than ended."""
    got = b""
    try:
        async for data in r.content.iter_any():
            got += data
    except aiohttp.ClientPayloadError:
        return got, True
    return got, False


async def test_sse_stream_cut_after_n_events(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    sc = await start(start_sidecar, base, "{sse: {cut_after: 3}}")
    async with client.get(f"{sc.url}/api/events") as r:
        assert r.status == 200
        assert r.headers["X-Sidecar-Fault"] == "sse"
        got, cut = await read_events(r)
    assert cut
    assert got == b"".join(f"id: {i}\ndata: event {i}\n\n".encode() for i in range(3))
    # An answer that is not SSE is left alone.
    async with client.get(f"{sc.url}/api/big") as r:
        assert "X-Sidecar-Fault" not in r.headers
        assert await r.read() == BIG
    async with client.get(f"{sc.url}/calm/events") as r:
        got, cut = await read_events(r)
    assert not cut
    assert got.count(b"\n\n") == 6


async def test_faults_for_some_agents_only(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    sc = await start(start_sidecar, base, "{agents: [chaos-*], abort: {status: 429}}")
    async with client.get(f"{sc.url}/api/x", headers={"X-Agent-Id": "chaos-1"}) as r:
        assert r.status == 429
        assert r.headers["X-Sidecar-Fault"] == "abort"
    for headers in ({"X-Agent-Id": "calm-1"}, {}):
        async with client.get(f"{sc.url}/api/x", headers=headers) as r:
            assert r.status == 200
            assert "X-Sidecar-Fault" not in r.headers


async def test_admin_switches_faults_without_a_reload(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    sc = await start(start_sidecar, base, "{enabled: false, abort: {status: 503}}")
    version = sc.sidecar.router.version if sc.sidecar.router else None
    async with client.get(f"{sc.url}/api/x") as r:
        assert r.status == 200
    async with client.get(f"{sc.admin}/services") as r:
        services = (await r.json())["services"]
    assert services["api"]["faults"]["enabled"] is False
    assert services["api"]["faults"]["abort"] == {"ratio": 1.0, "status": 503}
    assert services["calm"]["faults"] is None
    for path in ("/services", "/faults", "/config"):
        async with client.get(f"{sc.admin}{path}") as r:
            assert SECRET not in await r.text()
    async with client.get(f"{sc.admin}/metrics") as r:
        assert 'sidecar_faults_enabled{service="api"} 0.0' in await r.text()

    async with client.post(f"{sc.admin}/faults", json={"service": "api", "enabled": True}) as r:
        assert r.status == 200
        assert (await r.json())["faults"]["api"]["enabled"] is True
    async with client.get(f"{sc.url}/api/x") as r:
        assert r.status == 503
        assert r.headers["X-Sidecar-Error"] == "fault_injected"
    assert sc.sidecar.router is not None and sc.sidecar.router.version == version
    async with client.get(f"{sc.admin}/services") as r:
        faults = (await r.json())["services"]["api"]["faults"]
    assert faults["enabled"] is True
    assert faults["injected"]["abort"] == 1
    async with client.get(f"{sc.admin}/metrics") as r:
        assert 'sidecar_faults_enabled{service="api"} 1.0' in await r.text()

    # A reload that leaves the faults block alone keeps the switch as it is.
    sc.write("more.yaml", f"version: 1\nservices:\n  other:\n    upstream: {base}\n")
    async with client.post(f"{sc.admin}/reload") as r:
        assert r.status == 200
    assert sc.sidecar.router is not None and sc.sidecar.router.version != version
    async with client.get(f"{sc.url}/api/x") as r:
        assert r.status == 503

    # The query-string form, for every service at once.
    async with client.post(f"{sc.admin}/faults?enabled=false") as r:
        assert r.status == 200
    async with client.get(f"{sc.url}/api/x") as r:
        assert r.status == 200
    async with client.get(f"{sc.admin}/faults") as r:
        assert (await r.json())["faults"]["api"]["enabled"] is False

    for body, status in (
        ({"service": "calm", "enabled": True}, 404),
        ({"service": "api"}, 400),
        ({"enabled": True, "ratio": 1}, 400),
        ({"enabled": True, "service": ["api"]}, 400),
    ):
        async with client.post(f"{sc.admin}/faults", json=body) as r:
            assert r.status == status, body
    async with client.post(f"{sc.admin}/faults", data=b"{not json") as r:
        assert r.status == 400
    # A web page cannot switch chaos on.
    async with client.post(
        f"{sc.admin}/faults?enabled=true", headers={"Origin": "http://evil.example"}
    ) as r:
        assert r.status == 403


async def forward(call: Call) -> Reply:
    return StaticReply(200, None, b"ok")


async def aborts(step: Faults, calls: int) -> int:
    aborted = 0
    for _ in range(calls):
        call = Call(
            service="api", method="GET", target="/", headers=CIMultiDict(), body=None, agent=None
        )
        try:
            await step(call, forward)
        except ProblemError as err:
            assert err.reason == "fault_injected"
            aborted += 1
    return aborted


async def test_ratio_is_honoured_over_many_calls_with_a_fixed_seed() -> None:
    # The step alone with a fake next: 1,000 calls, seeded, no network.
    config = FaultsConfig.model_validate({"seed": 7, "abort": {"ratio": 0.3}})
    counted: list[tuple[str, str]] = []
    step = Faults(service="api", config=config, injected=[lambda s, k: counted.append((s, k))])
    aborted = await aborts(step, 1000)
    # Binomial(1000, 0.3) has a standard deviation of about 14.5: five of them either side.
    assert 227 < aborted < 373
    assert counted == [("api", "abort")] * aborted
    # The same seed makes the same run.
    assert await aborts(Faults(service="api", config=config, injected=[]), 1000) == aborted


async def test_spans_name_the_fault_and_the_mock(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    from tests.otlp_receiver import Receiver

    receiver = Receiver()
    collector = await upstream(receiver.app())
    up = Upstream()
    base = await upstream(up.app())
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            faults: {{delay: {{fixed: 1ms}}, abort: {{status: 502}}}}
          fake:
            upstream: {base}
            mode: mock
            mock: [{{body: ok}}]
        """,
        env={"OTEL_EXPORTER_OTLP_ENDPOINT": collector},
    )
    async with client.get(f"{sc.url}/api/x") as r:
        assert r.status == 502
    async with client.get(f"{sc.url}/fake/x") as r:
        assert r.status == 200
    assert await asyncio.to_thread(sc.sidecar.telemetry.force_flush)
    servers = {s.attributes["sidecar.service"]: s for s in receiver.spans if s.kind == "server"}
    assert servers["api"].attributes["sidecar.fault"] == "delay,abort"
    assert servers["api"].attributes["sidecar.error.reason"] == "fault_injected"
    assert servers["fake"].attributes["sidecar.mock"] is True
    assert up.hits == 0


async def test_retries_never_repeat_a_fault_and_mocks_can_be_faulted(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    up = Upstream()
    base = await upstream(up.app())
    events = "".join(f"data: {i}\\n\\n" for i in range(5))
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          api:
            upstream: {base}
            retry: {{attempts: 3, on: [503, reset]}}
            circuit_breaker: {{min_requests: 1, failure_ratio: 0.1}}
            faults: {{abort: {{status: 503}}}}
          fake:
            upstream: {base}
            mode: mock
            mock:
              - match: {{path: /events}}
                headers: {{Content-Type: text/event-stream}}
                body: "{events}"
            faults: {{sse: {{cut_after: 2}}}}
        """
    )
    for _ in range(3):
        async with client.get(f"{sc.url}/api/x") as r:
            # Not a retried 503, nor an open breaker: the fault, once per call.
            assert r.headers["X-Sidecar-Error"] == "fault_injected"
    async with client.get(f"{sc.admin}/services") as r:
        services = (await r.json())["services"]
    assert services["api"]["faults"]["injected"]["abort"] == 3
    assert services["api"]["circuit_breaker"]["state"] == "closed"
    assert up.hits == 0
    async with client.get(f"{sc.url}/fake/events") as r:
        assert r.headers["X-Sidecar-Mock"] == "true"
        assert r.headers["X-Sidecar-Fault"] == "sse"
        got, cut = await read_events(r)
    assert cut
    assert got == b"data: 0\n\ndata: 1\n\n"


async def test_a_websocket_handshake_is_delayed_and_still_tunnels(
    upstream, start_sidecar: StartSidecar, client: aiohttp.ClientSession
) -> None:
    async def socket(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_str(f"echo:{msg.data}")
        return ws

    app = web.Application()
    app.router.add_get("/ws", socket)
    base = await upstream(app)
    sc = await start_sidecar(
        f"""
        version: 1
        services:
          rt:
            upstream: {base}
            faults: {{delay: {{fixed: 1ms}}, bandwidth: {{per_second: 1KiB}}}}
        """
    )
    async with client.ws_connect(f"{sc.url}/rt/ws") as ws:
        await ws.send_str("hi")
        assert (await asyncio.wait_for(ws.receive(), 5)).data == "echo:hi"
    async with client.get(f"{sc.admin}/faults") as r:
        assert (await r.json())["faults"]["rt"]["injected"]["delay"] == 1
