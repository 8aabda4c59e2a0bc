"""Shared fixtures: real servers on loopback, the real sidecar, a real client.

- `upstream(app)` starts an aiohttp Application on 127.0.0.1:<free port>.
- `start_sidecar(policy_yaml, ...)` writes policy files into a temp directory
  and runs the actual Sidecar (egress + admin listeners) in this event loop.
- `client` is a plain aiohttp ClientSession.
- `closed_port` is a loopback port where nothing listens, for the whole test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

_ROOT = Path(__file__).resolve().parent.parent


def _stale_compiled_modules() -> str | None:
    """Why the compiled modules (`make compiled`) would test old code, if they would:
    Python imports a module's .so before its .py, so an edit after the last build
    would go untested. None when they are current, or when there are none."""
    built = [p.stat().st_mtime for p in (_ROOT / "sidecar").rglob("*.so")]
    if not built:
        return None
    oldest = min(built)
    for source in [_ROOT / "setup.py", *(_ROOT / "sidecar").rglob("*.py")]:
        if source.stat().st_mtime > oldest:
            return (
                f"{source.relative_to(_ROOT)} changed after the compiled modules were built: "
                "run `make compiled` (or `make clean-compiled` to test interpreted)"
            )
    return None


if (_stale := _stale_compiled_modules()) is not None:
    pytest.exit(_stale, returncode=2)

from sidecar.alerts.engine import AlertEngine, engine_of  # noqa: E402
from sidecar.app import compose, serve  # noqa: E402
from sidecar.runtime import Sidecar  # noqa: E402


@dataclass
class RunningSidecar:
    sidecar: Sidecar
    policies: Path
    url: str  # egress, e.g. http://127.0.0.1:41234
    admin: str
    runners: list[web.BaseRunner] = field(default_factory=list)

    @property
    def alert_engine(self) -> AlertEngine:
        """The alert rules `compose` added, as `sidecar run` has them."""
        engine = engine_of(self.sidecar)
        assert engine is not None
        return engine

    def write(self, name: str, text: str) -> Path:
        """Write (or overwrite) a policy file atomically, the way a careful editor does."""
        path = self.policies / name
        tmp = self.policies / f".{name}.tmp"
        tmp.write_text(textwrap.dedent(text))
        os.replace(tmp, path)
        return path


def _port(runner: web.BaseRunner) -> int:
    address = runner.addresses[0]
    return int(address[1])


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Start aiohttp apps on loopback; returns their base URL."""
    runners: list[web.AppRunner] = []

    async def start(app: web.Application) -> str:
        # handler_cancellation: an upstream handler stops when the sidecar hangs up,
        # as a real server's work would; shutdown_timeout keeps teardown quick.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{_port(runner)}"

    yield start
    for runner in runners:
        await runner.cleanup()


StartSidecar = Callable[..., Awaitable[RunningSidecar]]


@pytest.fixture
async def start_sidecar(tmp_path: Path) -> AsyncIterator[StartSidecar]:
    started: list[RunningSidecar] = []

    async def start(
        policy: str | Mapping[str, str],
        *,
        env: Mapping[str, str] | None = None,
        watch: bool = False,
        debounce_ms: int = 50,
    ) -> RunningSidecar:
        directory = tmp_path / f"policies{len(started)}"
        directory.mkdir()
        files = {"policy.yaml": policy} if isinstance(policy, str) else dict(policy)
        for name, text in files.items():
            (directory / name).write_text(textwrap.dedent(text))
        # Composed as `sidecar run` composes it: the alert rules included.
        sidecar = compose(Sidecar(str(directory), env=env))
        result = await sidecar.reload("startup")
        assert result.ok, result.errors
        runners = await serve(sidecar, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))
        if watch:
            sidecar.start_watching(debounce_ms=debounce_ms)
            await asyncio.wait_for(sidecar.watching.wait(), 10)
        running = RunningSidecar(
            sidecar=sidecar,
            policies=directory,
            url=f"http://127.0.0.1:{_port(runners[0])}",
            admin=f"http://127.0.0.1:{_port(runners[1])}",
            runners=runners,
        )
        started.append(running)
        return running

    yield start
    for running in started:
        for runner in running.runners:
            await runner.cleanup()
        await running.sidecar.close()


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port where a connect is refused (ECONNREFUSED) for the whole test.

    The socket stays bound but never listens: the port cannot be handed to
    anyone else meanwhile, unlike a port found free and then released.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


@pytest.fixture
async def client() -> AsyncIterator[aiohttp.ClientSession]:
    # auto_decompress off: tests see exactly the bytes the sidecar sent.
    async with aiohttp.ClientSession(auto_decompress=False) as session:
        yield session


def echo_app() -> web.Application:
    """An upstream that answers with what it received, as JSON."""

    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        payload: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "raw_path": request.raw_path,
            "query": request.query_string,
            "headers": {k: v for k, v in request.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        return web.json_response(payload)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


class Counting:
    """An upstream that counts hits and answers with `status` and `headers`."""

    def __init__(self) -> None:
        self.hits = 0
        self.status = 200
        self.headers: dict[str, str] = {}
        self.body = b'{"ok": true}'

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            self.hits += 1
            return web.Response(
                status=self.status,
                body=self.body,
                headers=self.headers,
                content_type="application/json",
            )

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", handle)
        return app
