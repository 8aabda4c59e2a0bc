"""Hot reload: file watching, ConfigMap symlink swaps, broken files, reload under load."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import RunningSidecar, echo_app
from tests.helpers import eventually


def service(name: str, upstream: str, extra: str = "") -> str:
    return f"version: 1\nservices:\n  {name}:\n    upstream: {upstream}\n{extra}"


@dataclass
class Connections:
    """A minimal HTTP/1.1 upstream that counts the connections it was given and lost."""

    opened: int = 0
    closed: int = 0
    handlers: set[asyncio.Task[None]] = field(default_factory=set)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.handlers.add(task)
        self.writers.add(writer)
        self.opened += 1
        try:
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")  # GETs only: no body follows
                except (asyncio.IncompleteReadError, ConnectionError):
                    return  # the client closed the connection
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        finally:
            self.closed += 1
            writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.close()
        await asyncio.gather(*self.handlers, return_exceptions=True)


@contextlib.asynccontextmanager
async def counting_upstream() -> AsyncIterator[tuple[str, Connections]]:
    connections = Connections()
    server = await asyncio.start_server(connections.serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", connections
    finally:
        server.close()
        await connections.close()
        await server.wait_closed()


async def status(client: aiohttp.ClientSession, url: str) -> int:
    async with client.get(url) as r:
        await r.read()
        return r.status


async def test_watcher_picks_up_a_new_service(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(service("a", base), watch=True)
    assert await status(client, f"{sc.url}/b/x") == 404
    sc.write("b.yaml", service("b", base))

    async def served() -> bool:
        return await status(client, f"{sc.url}/b/x") == 200

    await eventually(served, "service b routed")
    assert await status(client, f"{sc.url}/a/x") == 200


async def test_broken_file_keeps_last_good_policy(upstream, start_sidecar, client, caplog):
    base = await upstream(echo_app())
    sc = await start_sidecar(service("a", base), watch=True)
    caplog.set_level(logging.ERROR, logger="sidecar")
    sc.write("policy.yaml", service("a", base, "    retyr: {attempts: 2}\n"))

    async def refused() -> bool:
        last = sc.sidecar.last_reload
        return last is not None and not last.ok

    await eventually(refused, "the broken policy is refused")
    where = f"{sc.policies}/policy.yaml:5:5"
    assert any(where in r.getMessage() and "retyr" in r.getMessage() for r in caplog.records)
    assert await status(client, f"{sc.url}/a/x") == 200
    async with client.get(f"{sc.admin}/config") as r:
        config = await r.json()
    assert config["last_reload"]["ok"] is False
    assert config["last_reload"]["errors"] == [
        f"{where}: unknown key 'retyr' (did you mean 'retry'?)"
    ]
    assert "a" in config["services"]
    assert config["reloads"]["failed"] >= 1


async def test_configmap_symlink_swap_is_seen(upstream, start_sidecar, client, tmp_path: Path):
    """Kubernetes updates a ConfigMap volume by swapping the `..data` symlink atomically."""
    base = await upstream(echo_app())
    sc = await start_sidecar(service("a", base), watch=True)
    (sc.policies / "policy.yaml").unlink()

    def publish(version: str, text: str) -> None:
        data_dir = sc.policies / f"..{version}"
        data_dir.mkdir()
        (data_dir / "policy.yaml").write_text(text)
        tmp_link = sc.policies / "..data_tmp"
        os.symlink(data_dir.name, tmp_link)
        os.replace(tmp_link, sc.policies / "..data")

    publish("2026_11_27_v1", service("a", base))
    os.symlink("..data/policy.yaml", sc.policies / "policy.yaml")
    first = sc.sidecar.policy.version if sc.sidecar.policy else None
    publish("2026_11_27_v2", service("b", base))

    async def swapped() -> bool:
        return await status(client, f"{sc.url}/b/x") == 200

    await eventually(swapped, "the swapped ConfigMap is served")
    assert sc.sidecar.policy is not None and sc.sidecar.policy.version != first
    assert await status(client, f"{sc.url}/a/x") == 404


async def test_admin_reload(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc = await start_sidecar(service("a", base))
    sc.write("policy.yaml", service("a", base, "    timeout: {total: soon}\n"))
    async with client.post(f"{sc.admin}/reload") as r:
        assert r.status == 422
        body = await r.json()
    assert body["ok"] is False
    assert body["errors"][0].startswith(f"{sc.policies}/policy.yaml:5:22: ")
    sc.write("policy.yaml", service("b", base))
    async with client.post(f"{sc.admin}/reload") as r:
        assert r.status == 200
        assert (await r.json())["changed"] is True
    assert await status(client, f"{sc.url}/b/x") == 200
    async with client.post(f"{sc.admin}/reload") as r:
        assert (await r.json())["changed"] is False  # same files, nothing swapped


async def test_unchanged_service_keeps_its_connections_changed_one_closes_them(
    start_sidecar, client
):
    async with counting_upstream() as (a, at_a), counting_upstream() as (b, at_b):
        sc = await start_sidecar(service("a", a) + f"  b:\n    upstream: {b}\n")
        assert await status(client, f"{sc.url}/a/x") == 200
        assert await status(client, f"{sc.url}/b/x") == 200
        assert (at_a.opened, at_b.opened) == (1, 1)  # one keep-alive connection each

        sc.write("policy.yaml", service("a", a) + f"  b:\n    upstream: {b}/v2\n")
        assert (await sc.sidecar.reload("test")).changed
        # The retired pool of b hangs up its idle connection; a's pool is kept, warm.
        await eventually(lambda: at_b.closed == 1, "b's old connection closed after the reload")
        assert await status(client, f"{sc.url}/a/x") == 200
        assert (at_a.opened, at_a.closed) == (1, 0)
        assert await status(client, f"{sc.url}/b/x") == 200
        assert (at_b.opened, at_b.closed) == (2, 1)  # the new pool opened its own


async def test_in_flight_call_finishes_on_the_router_it_started_on(upstream, start_sidecar, client):
    release = asyncio.Event()
    started = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        started.set()
        await release.wait()
        return web.Response(text="old upstream")

    old_app = web.Application()
    old_app.router.add_get("/slow", slow)
    old = await upstream(old_app)
    new = await upstream(echo_app())
    sc = await start_sidecar(service("a", old))

    async def call() -> tuple[int, str]:
        async with client.get(f"{sc.url}/a/slow") as r:
            return r.status, await r.text()

    pending = asyncio.ensure_future(call())
    await asyncio.wait_for(started.wait(), 5)
    sc.write("policy.yaml", service("a", new))
    assert (await sc.sidecar.reload("test")).changed
    release.set()
    assert await asyncio.wait_for(pending, 5) == (200, "old upstream")
    async with client.get(f"{sc.url}/a/slow") as r:
        assert (await r.json())["path"] == "/slow"  # the new upstream answers now


@pytest.mark.timeout(60)
async def test_fifty_reloads_under_load_lose_no_request(upstream, start_sidecar, client):
    base = await upstream(echo_app())
    sc: RunningSidecar = await start_sidecar(service("a", base), watch=True, debounce_ms=10)
    failures: list[str] = []
    done = asyncio.Event()
    sent = 0

    async def load() -> None:
        nonlocal sent
        while not done.is_set():
            try:
                async with client.get(f"{sc.url}/a/x") as r:
                    await r.read()
                    if r.status != 200:
                        failures.append(f"{r.status} {r.headers.get('X-Sidecar-Error')}")
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))
            sent += 1

    def calls_past(mark: int) -> Callable[[], bool]:
        return lambda: sent >= mark

    workers = [asyncio.ensure_future(load()) for _ in range(4)]
    for i in range(50):
        # Every other reload changes the upstream's base path, so the route,
        # its chain and its pool are rebuilt half of the time.
        extra = f"    headers: {{set: {{X-Reload: '{i}'}}}}\n"
        upstream_url = f"{base}/v{i % 2}"
        sc.write("policy.yaml", service("a", upstream_url, extra))
        assert (await sc.sidecar.reload("test")).ok
        # However fast or slow the machine, calls keep going between every two
        # reloads: each reload swaps the router under a stream of calls.
        what = f"calls completed after reload {i}"
        await eventually(calls_past(sent + len(workers)), what, every=0.002)
    done.set()
    await asyncio.gather(*workers)
    assert failures == []
    assert sc.sidecar.counts.succeeded >= 50
