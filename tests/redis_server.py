"""A real redis-server on a free loopback port, for tests that need a shared backend.

Import the fixture into a test module
(`from tests.redis_server import redis_server_fixture  # noqa: F401`) and take
`redis_server` as an argument: it yields a `RedisServer` with `.url`, and
`.stop()` / `.start()` to take it down and bring it back on the same port.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(Exception):
    """The port picked was taken by someone else before redis-server could bind it."""


class RedisServer:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start on a free port the first time, on the same port after a stop()."""
        if self.port:
            self._start()
            return
        # A free port can be taken between the pick and redis-server's bind: try another.
        for _ in range(5):
            self.port = free_port()
            try:
                self._start()
                return
            except PortTaken:
                continue
        raise RuntimeError("redis-server found no free port in 5 tries")

    def _start(self) -> None:
        log = self.directory / "redis.log"
        log.write_text("")
        self._process = process = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.directory),
                "--logfile",
                str(log),
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                self._process = None
                if "Address already in use" in log.read_text():
                    raise PortTaken(self.port)
                raise RuntimeError(f"redis-server exited with {process.returncode}")
            # Ready once the server on the port answers with our process's id: a
            # PONG alone could come from another test's redis that won the port.
            if _server_pid(self.port) == process.pid:
                return
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start within 10 s")
            time.sleep(0.01)

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


def _server_pid(port: int) -> int | None:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"INFO server\r\n")
            data = b""
            while b"process_id:" not in data or not data.endswith(b"\r\n"):
                chunk = conn.recv(65536)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    for line in data.decode("utf-8", "replace").splitlines():
        if line.startswith("process_id:"):
            return int(line.split(":", 1)[1])
    return None


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    directory = tmp_path / "redis"
    directory.mkdir()
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.stop()
