"""Hot reload: file watching, ConfigMap symlink swaps, broken files, reload under load."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from sidecar.proxy.upstream import Upstream
from tests.conftest import RunningSidecar, echo_app


def service(name: str, upstream: str, extra: str = "") -> str:
    return f"version: 1\nservices:\n  {name}:\n    upstream: {upstream}\n{extra}"


async def eventually(check: Callable[[], Awaitable[bool]], what: str, limit: float = 10) -> None:
    """Poll until `check` holds; the watcher reacts within its debounce, not instantly."""
    deadline = asyncio.get_running_loop().time() + limit
    while not await check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for: {what}")
        await asyncio.sleep(0.05)


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


async def test_unchanged_service_keeps_its_pool_changed_one_is_retired(upstream, start_sidecar):
    a = await upstream(echo_app())
    b = await upstream(echo_app())
    sc = await start_sidecar(service("a", a) + f"  b:\n    upstream: {b}\n")
    assert sc.sidecar.router is not None
    pool_a = sc.sidecar.router.routes["a"].upstream
    pool_b = sc.sidecar.router.routes["b"].upstream
    sc.write("policy.yaml", service("a", a) + f"  b:\n    upstream: {b}/v2\n")
    assert (await sc.sidecar.reload("test")).changed
    assert sc.sidecar.router.routes["a"].upstream is pool_a
    assert sc.sidecar.router.routes["b"].upstream is not pool_b
    assert isinstance(pool_b, Upstream) and pool_b._retired


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

    workers = [asyncio.ensure_future(load()) for _ in range(4)]
    for i in range(50):
        # Every other reload changes the upstream's base path, so the route,
        # its chain and its pool are rebuilt half of the time.
        extra = f"    headers: {{set: {{X-Reload: '{i}'}}}}\n"
        upstream_url = f"{base}/v{i % 2}"
        sc.write("policy.yaml", service("a", upstream_url, extra))
        assert (await sc.sidecar.reload("test")).ok
        await asyncio.sleep(0.01)
    done.set()
    await asyncio.gather(*workers)
    assert failures == []
    assert sent > 50
    assert sc.sidecar.counts.succeeded >= 50
