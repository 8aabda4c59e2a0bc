"""The composition root: what builds the running sidecar's faces and opens them.

runtime.py holds the policy, reloads and state; the connectors (http/, databases/,
webhooks/) and the admin serve it, the alert rules watch it. Only this module knows all
of them, so the runtime imports neither the admin, a listener nor the alerts.
`compose` adds what watches a new sidecar; `serve` opens each connector's listeners
from one list, in order; a connector is anything with a name and `open()`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
from collections.abc import Iterable
from typing import Protocol

from .admin import admin_app, probes_app
from .alerts.engine import AlertEngine
from .databases.hub import DatabaseHub
from .http.listener import App, Listener
from .http.listener import serve as listen_http
from .runtime import ReloadResult, Sidecar
from .webhooks.listener import ingress_app

log = logging.getLogger("sidecar")


class ListenError(Exception):
    """A listener could not be opened (port in use, address not on this host...)."""


Bound = Listener


def compose(sidecar: Sidecar) -> Sidecar:
    """`sidecar` as `sidecar run` serves it: its alert rules evaluated on the runtime's
    timer and shown in its metrics (`sidecar_alerts`) and console.

    Before the first reload, which hands the alert receivers' delivery settings to the
    webhook queue. The tests' sidecars are composed the same way (tests/conftest.py).
    """
    engine = AlertEngine(sidecar)
    sidecar.monitors.append(engine)
    sidecar.telemetry.metrics.alerts.source = engine.gauge_rows
    return sidecar


class Connector(Protocol):
    """One of the sidecar's faces: opens its listeners, and is told when it cannot."""

    name: str

    async def open(self) -> list[Bound]:
        """The HTTP listeners it opened (a connector that follows the policy, like the
        databases', opens its own and answers none: reloads open and close them)."""
        ...


class HttpListener:
    """An HTTP/1.1 listener serving one app: egress, admin, probes or ingress."""

    def __init__(
        self, name: str, address: tuple[str, int], app: App, *, backlog: int = 100
    ) -> None:
        self.name = name
        self.address = address
        self.app = app
        self.backlog = backlog

    async def open(self) -> list[Bound]:
        host, port = self.address
        try:
            return [await listen_http(self.app, host, port, backlog=self.backlog, name=self.name)]
        except OSError as exc:
            raise _listen_error(self.address, exc) from exc


class DatabaseListeners:
    """One loopback listener per `databases:` entry; later reloads open and close them."""

    name = "databases"

    def __init__(self, hub: DatabaseHub) -> None:
        self.hub = hub

    async def open(self) -> list[Bound]:
        try:
            await self.hub.start()
        except OSError as exc:
            raise ListenError(exc.strerror or str(exc)) from exc
        return []


def _own_listeners(sidecar: Sidecar, addresses: Iterable[tuple[str, int]]) -> None:
    """The bound addresses (port 0 picked one): what reloads and deliveries refuse."""
    sidecar.listeners = tuple(dict.fromkeys((str(h), int(p)) for h, p in addresses))
    sidecar.webhooks.listeners = sidecar.listeners


def _listen_error(address: tuple[str, int], exc: OSError) -> ListenError:
    host, port = address
    # The errno's own words ("address already in use"), not the event loop's wrapping.
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return ListenError(f"cannot listen on {where}: {reason[:1].lower()}{reason[1:]}")


def _open_ingress_later(sidecar: Sidecar, address: tuple[str, int], runners: list[Bound]) -> None:
    """Open the ingress listener once a reload first declares an inbound webhook.

    The runner joins `runners`, so whoever stops the others stops it too.
    """
    opening: list[asyncio.Task[None]] = []

    async def open_now() -> None:
        try:
            [runner] = await HttpListener("ingress", address, ingress_app(sidecar.webhooks)).open()
        except ListenError as exc:
            log.error("inbound webhooks declared, but %s", exc)
            return
        runners.append(runner)
        bound = runner.addresses[0][:2]
        _own_listeners(sidecar, (*sidecar.listeners, bound))
        log.info("ingress (inbound webhooks) on http://%s:%d", *bound)

    def on_reload(result: ReloadResult) -> None:
        if opening or not (result.ok and sidecar.webhooks.inbound_paths):
            return
        opening.append(asyncio.get_running_loop().create_task(open_now()))

    sidecar.on_reload.append(on_reload)


async def serve(
    sidecar: Sidecar,
    *,
    listen: tuple[str, int],
    admin: tuple[str, int] | None,
    drain: float = 10.0,
    ingress: tuple[str, int] | None = None,
    probes: tuple[str, int] | None = None,
) -> list[Bound]:
    """Open every connector's listeners; ListenError (with nothing left open) when one
    cannot be.

    In the order of one list: egress first, then admin and probes; the ingress listener
    next, and only when the policy declares an inbound webhook (it never serves anything
    else): if none does yet, it opens when a reload first declares one. The database
    connector last: one listener per `databases:` entry.
    """
    if admin is not None and not is_loopback(admin[0]) and sidecar.admin_token is None:
        # Anyone who reaches the port could reload, replay webhooks and read the figures.
        raise ListenError(
            f"the admin listener {admin[0]}:{admin[1]} is not a loopback address and no admin "
            "token is set: set admin.token in the policy (or SIDECAR_ADMIN_TOKEN, or "
            "SIDECAR_ADMIN_TOKEN_FILE), or bind --admin to 127.0.0.1"
        )
    connectors: list[Connector] = [HttpListener("egress", listen, sidecar.handler, backlog=1024)]
    if admin is not None:
        # Bound to anything but loopback, every admin path needs the token.
        app = admin_app(sidecar, protected=not is_loopback(admin[0]))
        connectors.append(HttpListener("admin", admin, app))
    if probes is not None:
        connectors.append(HttpListener("probes", probes, probes_app(sidecar)))
    if ingress is not None and sidecar.webhooks.inbound_paths:
        connectors.append(HttpListener("ingress", ingress, ingress_app(sidecar.webhooks)))
    connectors.append(DatabaseListeners(sidecar.databases))
    bound: list[Bound] = []
    try:
        for connector in connectors:
            bound.extend(await connector.open())
        if ingress is not None and not sidecar.webhooks.inbound_paths:
            _open_ingress_later(sidecar, ingress, bound)
        known = [a[:2] for made in bound for a in made.addresses]
        if ingress is not None and not sidecar.webhooks.inbound_paths and ingress[1]:
            known.append(ingress)
        _own_listeners(sidecar, known)
    except BaseException:
        for made in bound:
            await made.cleanup()
        raise
    sidecar.start_background()
    return bound


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything
