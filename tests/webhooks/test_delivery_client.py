"""Deliveries on the sidecar's own HTTP/1.1 client (http/pool.py): what each kind of
failure records, the address guard, redirects, large answers and TLS, against real
servers on loopback."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import textwrap
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme
from aiohttp import web

from sidecar.webhooks.delivery import DeliverySettings, DeliveryWorker
from sidecar.webhooks.queue import Attempt, DeliveryStatus, Direction, Queue, Target
from tests.helpers import eventually, probe, sidecar_process

from .conftest import Receiver

Start = Callable[..., Any]
WHSEC = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


@pytest.fixture
async def deliver(store: Queue) -> AsyncIterator[Start]:
    """One outbound event to `url`, attempted once (a one-step schedule): its attempt."""
    workers: list[DeliveryWorker] = []

    async def attempt(url: str, *, public_only: bool = False, within: float = 5.0) -> Attempt:
        settings = DeliverySettings(
            schedule=(0.0,),
            jitter=0.0,
            timeout=within,
            urls={"sink": url},
            public_only=frozenset({"sink"} if public_only else ()),
        )
        if not workers:
            workers.append(DeliveryWorker(store, {(Direction.outbound, "events"): settings}))
            await workers[0].start()
        else:
            workers[0].configure({(Direction.outbound, "events"): settings})
        accepted = await store.accept(
            direction=Direction.outbound,
            source="events",
            event_type=None,
            headers=[],
            body=b'{"n": 1}',
            targets=[Target("sink", url)],
        )
        attempts: list[Attempt] = []

        async def attempted() -> bool:
            view = await store.message(accepted.message_id)
            assert view is not None
            delivery = view.deliveries[0]
            attempts[:] = delivery.attempts
            return delivery.status is not DeliveryStatus.pending

        await eventually(attempted, "the attempt to be recorded")
        return attempts[0]

    yield attempt
    for worker in workers:
        await worker.stop()


async def test_a_target_that_does_not_answer_in_time_is_a_timeout(
    deliver: Start, upstream: Start
) -> None:
    hits: list[bytes] = []

    async def hang(request: web.Request) -> web.Response:
        hits.append(await request.read())
        await asyncio.Event().wait()
        return web.Response()

    app = web.Application()
    app.router.add_post("/", hang)
    attempt = await deliver(await upstream(app) + "/", within=0.2)
    assert hits == [b'{"n": 1}']
    assert (attempt.status_code, attempt.error) == (None, "no answer within 0.2s")


async def test_a_failed_answer_records_its_status_and_a_redirect_is_not_followed(
    deliver: Start, receiver: Start
) -> None:
    elsewhere: Receiver = await receiver((200, {}))
    moved: Receiver = await receiver((302, {"Location": elsewhere.url + "/x"}))
    attempt = await deliver(moved.url + "/in?token=t")
    assert (attempt.status_code, attempt.error) == (302, None)
    assert attempt.failure == "HTTP 302"
    assert moved.targets == ["/in?token=t"] and elsewhere.received == []
    headers, body = moved.received[0]
    assert body == b'{"n": 1}'
    assert headers["Content-Type"] == "application/json"
    assert headers["User-Agent"] == "agent-sidecar"


async def test_a_url_with_other_than_ascii_goes_percent_encoded(
    deliver: Start, receiver: Start
) -> None:
    sink: Receiver = await receiver((200, {}))
    attempt = await deliver(sink.url + "/日本?q=€")
    assert attempt.status_code == 200
    # As aiohttp's yarl sent it: UTF-8, percent-encoded.
    assert sink.targets == ["/%E6%97%A5%E6%9C%AC?q=%E2%82%AC"]


async def test_no_listener_is_a_connect_error(deliver: Start) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    attempt = await deliver(f"http://127.0.0.1:{port}/in")
    assert attempt.status_code is None
    assert attempt.error is not None and attempt.error.startswith("could not connect: ")


async def test_a_public_only_endpoint_is_refused_on_loopback_by_address_and_by_name(
    deliver: Start, receiver: Start
) -> None:
    sink: Receiver = await receiver((200, {}))
    port = sink.url.rpartition(":")[2]
    literal = await deliver(f"http://127.0.0.1:{port}/in", public_only=True)
    by_name = await deliver(f"http://localhost:{port}/in", public_only=True)
    for attempt in (literal, by_name):
        assert attempt.status_code is None
        assert attempt.error is not None and attempt.error.startswith("refused: "), attempt
        assert "loopback" in attempt.error and "allow_private" in attempt.error
    assert "localhost resolves to" in (by_name.error or "")
    assert sink.received == []
    # Without the restriction (allow_private) the same name is delivered to.
    allowed = await deliver(f"http://localhost:{port}/in")
    assert allowed.status_code == 200 and len(sink.received) == 1


async def test_a_large_answer_is_not_held_and_the_next_delivery_still_goes(
    deliver: Start, upstream: Start
) -> None:
    served: list[int] = []

    async def big(request: web.Request) -> web.StreamResponse:
        served.append(len(await request.read()))
        response = web.StreamResponse(status=200)
        await response.prepare(request)
        chunk = b"x" * 65536
        with_more = True
        try:
            for _ in range(64):  # 4 MiB, more than a delivery reads
                await response.write(chunk)
        except ConnectionError:
            with_more = False
        if with_more:
            await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/", big)
    url = await upstream(app) + "/"
    first = await deliver(url)
    second = await deliver(url)
    assert (first.status_code, second.status_code) == (200, 200)
    assert served == [8, 8]


def _tls_server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    return context


async def _tls_receiver(context: ssl.SSLContext, sink: Receiver) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(sink.app(), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    return runner, runner.addresses[0][1]


async def test_an_https_target_whose_certificate_is_not_trusted_is_a_connect_error(
    deliver: Start,
) -> None:
    sink = Receiver()
    runner, port = await _tls_receiver(_tls_server_context(trustme.CA()), sink)
    try:
        attempt = await deliver(f"https://127.0.0.1:{port}/in")
    finally:
        await runner.cleanup()
    assert attempt.status_code is None
    assert attempt.error == "could not connect: TLSError"
    assert sink.received == []


@pytest.mark.process
async def test_an_https_endpoint_is_delivered_to_over_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    sink = Receiver()
    runner, port = await _tls_receiver(_tls_server_context(ca), sink)
    policies = tmp_path / "p"
    policies.mkdir()
    (policies / "policy.yaml").write_text(
        textwrap.dedent(
            f"""
            version: 1
            webhooks:
              outbound:
                events:
                  signing: {{secrets: ["{WHSEC}"]}}
                  endpoints:
                    - {{name: tls, url: "https://localhost:{port}/in", allow_private: true}}
            """
        )
    )
    # The process trusts the receiver's CA the way an operator would make it do so.
    env = {**os.environ, "SSL_CERT_FILE": str(ca_file)}
    try:
        async with (
            sidecar_process(policies, "--data-dir", str(tmp_path / "d"), env=env) as sidecar,
            aiohttp.ClientSession() as client,
        ):
            async with client.post(f"{sidecar.url}/_webhooks/events", json={"n": 1}) as r:
                assert r.status == 202
            await eventually(lambda: len(sink.received) == 1, "the delivery over TLS")
    finally:
        await runner.cleanup()
    headers, body = sink.received[0]
    assert json.loads(body) == {"n": 1}
    assert "webhook-signature" in headers


_NO_AIOHTTP = """
import asyncio, json, sys, tempfile
from sidecar.webhooks.delivery import DeliverySettings, DeliveryWorker
from sidecar.webhooks.queue import Direction, Target
from sidecar.webhooks.sqlite_store import SqliteStore

async def main():
    got = asyncio.Event()

    async def receive(reader, writer):
        await reader.readuntil(b"\\r\\n\\r\\n")
        got.set()
        writer.write(b"HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\n\\r\\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(receive, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/in"
    store = await SqliteStore.open(tempfile.mkdtemp())
    settings = {(Direction.outbound, "events"): DeliverySettings((0.0,), 0.0, 5.0)}
    worker = DeliveryWorker(store, settings)
    await worker.start()
    await store.accept(direction=Direction.outbound, source="events", event_type=None,
                       headers=[], body=b"{}", targets=[Target("sink", url)])
    await asyncio.wait_for(got.wait(), 10)
    await worker.stop()
    await store.close()
    print(json.dumps("aiohttp" in sys.modules))

asyncio.run(main())
"""


@pytest.mark.process
def test_delivering_loads_no_aiohttp() -> None:
    """aiohttp costs megabytes per pod (tests/test_footprint.py): deliveries no longer
    need it."""
    assert probe(_NO_AIOHTTP) is False
