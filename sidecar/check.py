"""`sidecar check`: can each service be reached, and is its credential accepted?

DNS, TCP connect and TLS are probed directly; the credential is probed with one
request sent through the service's own chain of steps (the Router that
`sidecar run` builds), so it is injected exactly as for an agent's call.
A service that never calls its upstream (mode: mock, or replay without
passthrough) is not probed: it is reported `skip`, and does not fail the check.
Nothing printed here ever holds a credential: only names, statuses, timings.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict

from .core.call import Call
from .core.problems import ProblemError
from .runtime import Sidecar

TIMEOUT = 10.0


@dataclass(slots=True)
class Result:
    service: str
    ok: bool = False
    stage: str = "dns"  # the first stage that failed, or "ok"
    error: str | None = None
    status: int | None = None
    ms: dict[str, float] = field(default_factory=dict)
    cert_expires_in_days: float | None = None
    # Why the service was not probed (stage "skipped"); it counts as ok.
    skipped: str | None = None
    server_version: str | None = None  # databases: the PostgreSQL version that answered

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _ms(start: float) -> float:
    return round((time.perf_counter() - start) * 1000, 1)


async def check_service(sidecar: Sidecar, name: str) -> Result:
    assert sidecar.policy is not None and sidecar.router is not None
    service = sidecar.policy.services[name]
    spec = service.spec
    result = Result(service=name)
    if spec.files is not None:
        return await _check_files(spec.files.root, spec.files.read_only, result)
    offline = _offline(spec.mode, spec.cassettes.on_missing if spec.cassettes else None)
    if offline is not None:
        result.ok, result.stage, result.skipped = True, "skipped", offline
        return result
    url = urlsplit(spec.upstream)
    host = url.hostname or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    loop = asyncio.get_running_loop()
    try:
        start = time.perf_counter()
        infos = await asyncio.wait_for(
            loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), TIMEOUT
        )
        result.ms["dns"] = _ms(start)
        result.stage = "tcp"
        start = time.perf_counter()
        address = infos[0][4]
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(str(address[0]), int(address[1])), TIMEOUT
        )
        result.ms["tcp"] = _ms(start)
        writer.close()
        if url.scheme == "https":
            result.stage = "tls"
            start = time.perf_counter()
            # The default context: the chain must verify against the system's roots.
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    host, port, ssl=ssl.create_default_context(), server_hostname=host
                ),
                TIMEOUT,
            )
            result.ms["tls"] = _ms(start)
            cert = writer.get_extra_info("peercert") or {}
            writer.close()
            if "notAfter" in cert:
                expires = ssl.cert_time_to_seconds(cert["notAfter"])
                result.cert_expires_in_days = round((expires - time.time()) / 86400, 1)
                if expires < time.time():
                    raise ValueError("certificate expired")
        result.stage = "probe"
        await _probe(sidecar, name, result)
    except (OSError, TimeoutError, ssl.SSLError, ValueError) as exc:
        # The type and errno words only: an exception's text is not quoted blindly.
        result.error = (
            exc.strerror or type(exc).__name__
            if isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError)
            else str(exc)
            if isinstance(exc, ValueError)
            else type(exc).__name__
        )
    return result


async def _check_files(root: str, read_only: bool, result: Result) -> Result:
    """A files service has no upstream: its root must be a directory it can use."""
    result.stage = "files"
    start = time.perf_counter()
    mode = os.R_OK | os.X_OK | (0 if read_only else os.W_OK)
    usable = await asyncio.to_thread(lambda: os.path.isdir(root) and os.access(root, mode))
    result.ms["files"] = _ms(start)
    if usable:
        result.ok, result.stage = True, "ok"
    else:
        result.error = "root is not a directory the sidecar can " + (
            "read" if read_only else "read and write"
        )
    return result


def _offline(mode: str, on_missing: str | None) -> str | None:
    """Why a service never calls its upstream, or None when it may."""
    if mode == "mock":
        return "mode: mock, the upstream is never called"
    if mode == "replay" and on_missing != "passthrough":
        return "mode: replay, the upstream is never called"
    return None


async def _probe(sidecar: Sidecar, name: str, result: Result) -> None:
    assert sidecar.policy is not None and sidecar.router is not None
    probe = sidecar.policy.services[name].spec.check
    route = sidecar.router.routes[name]
    headers: CIMultiDict[str] = CIMultiDict()
    for header, value in route.set_headers:
        headers[header] = value
    call = Call(
        service=name,
        method=probe.method if probe else "GET",
        target=probe.path if probe else "/",
        headers=headers,
        body=None,
        agent=None,
    )
    start = time.perf_counter()
    try:
        reply = await asyncio.wait_for(route.handler(call), TIMEOUT)
    except ProblemError as exc:
        result.ms["probe"] = _ms(start)
        result.status = exc.status
        result.error = f"refused by the sidecar: {exc.reason}"
        return
    try:
        result.status = reply.status
        body = reply.body
        if body is not None:
            async for _ in body:
                pass
    finally:
        reply.release()
    result.ms["probe"] = _ms(start)
    expect = probe.expect if probe and probe.expect else None
    status = reply.status
    accepted = status in expect if expect else status < 500 and status not in (401, 403)
    if accepted:
        result.ok, result.stage = True, "ok"
    else:
        result.error = (
            f"credential not accepted (HTTP {status})"
            if status
            in (
                401,
                403,
            )
            else f"unexpected HTTP {status}"
        )


async def check_database(sidecar: Sidecar, name: str) -> Result:
    """TCP, then the sidecar's own login (TLS as the policy says, auth), then SELECT 1."""
    from .databases.server import UpstreamError, connect

    entry = sidecar.databases.entries[name]
    settings = entry.settings
    result = Result(service=name, stage="tcp")
    try:
        start = time.perf_counter()
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(settings.host, settings.port), TIMEOUT
        )
        result.ms["tcp"] = _ms(start)
        writer.close()
        result.stage = "login"
        start = time.perf_counter()
        conn = await connect(settings)
        result.ms["login"] = _ms(start)
        try:
            cert = conn.writer.get_extra_info("peercert") or {}
            if "notAfter" in cert:
                expires = ssl.cert_time_to_seconds(cert["notAfter"])
                result.cert_expires_in_days = round((expires - time.time()) / 86400, 1)
            result.stage = "query"
            start = time.perf_counter()
            await asyncio.wait_for(conn.simple("SELECT 1"), TIMEOUT)
            result.ms["query"] = _ms(start)
            result.server_version = conn.params.get("server_version")
            result.ok, result.stage = True, "ok"
        finally:
            conn.close()
    except UpstreamError as exc:
        result.error = f"{exc.text} (SQLSTATE {exc.sqlstate})"
    except (OSError, TimeoutError) as exc:
        result.error = (
            exc.strerror or type(exc).__name__ if isinstance(exc, OSError) else "timed out"
        )
    return result


async def run_checks(policies: str, services: list[str]) -> tuple[list[Result], list[str]]:
    """Each named service's result (all when none named), and any load errors."""
    with tempfile.TemporaryDirectory(prefix="sidecar-check-") as data_dir:
        sidecar = Sidecar(policies, data_dir=data_dir)
        try:
            loaded = await sidecar.reload("check")
            if not loaded.ok or sidecar.policy is None:
                return [], list(loaded.errors)
            databases = sidecar.databases.entries
            names = services or sorted(sidecar.policy.services) + sorted(databases)
            unknown = [n for n in names if n not in sidecar.policy.services and n not in databases]
            if unknown:
                nor = " (nor database)" if databases else ""
                return [], [f"unknown service '{n}'{nor}" for n in unknown]
            results = await asyncio.gather(
                *(
                    check_service(sidecar, n)
                    if n in sidecar.policy.services
                    else check_database(sidecar, n)
                    for n in names
                )
            )
            return list(results), []
        finally:
            await sidecar.close()


def format_lines(results: list[Result], *, colour: bool) -> list[str]:
    """One line per service, in aligned columns: mark, service, what, timings."""
    rows = []
    for result in results:
        times = " ".join(f"{k} {v:g}ms" for k, v in result.ms.items())
        if result.skipped is not None:
            mark, what = "skip", result.skipped
        elif result.ok:
            mark, what = "ok", f"HTTP {result.status}"
            if result.server_version is not None:
                what = f"PostgreSQL {result.server_version}"
        else:
            mark, what = "FAIL", f"{result.stage}: {result.error}"
        if result.cert_expires_in_days is not None:
            what += f", certificate expires in {result.cert_expires_in_days:g} days"
        rows.append((mark, result.service, what, times))
    name_width = max((len(r[1]) for r in rows), default=0)
    what_width = max((len(r[2]) for r in rows), default=0)
    lines = []
    for mark, service, what, times in rows:
        # Padded before colouring: escape codes take no room on the screen.
        shown = f"{mark:<4}"
        if colour:
            code = {"ok": "32", "skip": "33"}.get(mark, "31")
            shown = f"\033[{code}m{shown}\033[0m"
        lines.append(f"{shown} {service:<{name_width}}  {what:<{what_width}}  {times}".rstrip())
    return lines
