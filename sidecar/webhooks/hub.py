"""The webhooks of a running sidecar: one store, one delivery worker, the current policy.

The store opens (and the worker starts) the first time a policy declares
webhooks; a reload swaps the compiled Ingress/Outbox and hands the worker the
new delivery settings, while deliveries already stored keep going. The
listeners call `inbound` (ingress) and `outbound` (egress `/_webhooks/<name>`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from ..core.reasons import Reason
from ..policy.webhooks import Webhooks, WebhookStore
from .answers import Result, refused
from .subscriptions import Subscriptions

if TYPE_CHECKING:
    # Imported when a policy first declares webhooks: a sidecar without them never
    # loads sqlite3 or cryptography.
    from opentelemetry.trace import Tracer

    from ..telemetry.metrics import WebhookMetrics
    from .delivery import DeliverySettings, DeliveryWorker, SettingsKey
    from .gate import Gate
    from .inbound import InboundHook, Ingress
    from .observe import WebhookTelemetry
    from .outbound import Outbox
    from .queue import Queue

log = logging.getLogger("sidecar.webhooks")

Headers = Mapping[str, str] | list[tuple[str, str]]
# How often the queue gauges are read from the store between scrapes (for OTLP export).
QUEUE_GAUGES_EVERY = 15.0


class StoreChanged(Exception):
    """A reload asks for another queue backend than the one serving."""


class Receipt(Protocol):
    """What the listeners hold while an event is received (observe.Receipt)."""

    headers: list[tuple[str, str]]

    def done(self, result: Result) -> None: ...


class _Unobserved:
    __slots__ = ("headers",)

    def __init__(self, headers: list[tuple[str, str]]) -> None:
        self.headers = headers

    def done(self, result: Result) -> None:
        pass


class WebhookHub:
    def __init__(
        self,
        data_dir: str,
        *,
        metrics: WebhookMetrics | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.store: Queue | None = None
        self.backend: str | None = None  # the Redis URL the open store uses; None: SQLite
        self._worker: DeliveryWorker | None = None
        self._ingress: Ingress | None = None
        self._outbox: Outbox | None = None
        self._lock = asyncio.Lock()
        self._metrics = metrics
        self._tracer = tracer
        self._telemetry: WebhookTelemetry | None = None
        self._gauges: asyncio.Task[None] | None = None
        # Identity and allow rules for /_webhooks/<name> and /_events/<name> (gate.py).
        self.gate: Gate | None = None
        # Agents waiting at /_events/<name>, woken when an event is stored.
        self.subscriptions = Subscriptions()
        # The sidecar's own listeners (runtime.py): no delivery may connect to one.
        self.listeners: tuple[tuple[str, int], ...] = ()

    @property
    def inbound_paths(self) -> frozenset[str]:
        return frozenset(self._ingress.hooks) if self._ingress is not None else frozenset()

    async def apply(
        self,
        webhooks: Webhooks | None,
        extra: Mapping[SettingsKey, DeliverySettings] | None = None,
        *,
        gate: Gate | None = None,
    ) -> None:
        """Serve a (re)loaded policy's webhooks; opens the store on first use.

        `extra`: the delivery settings of other senders through the same queue
        (the alert receivers, alerts/); they open the store too.
        """
        async with self._lock:
            self.gate = gate
            if webhooks is None and not extra and self.store is None:
                return  # no webhooks ever: no database file, no worker
            from .delivery import DeliveryWorker, compile_settings
            from .inbound import Ingress
            from .observe import WebhookTelemetry
            from .outbound import Outbox

            spec = webhooks.store if webhooks is not None else None
            if self.store is None:
                self.store = await self._open(spec)
            elif spec is not None and spec.backend != self.backend:
                raise StoreChanged(
                    "webhooks.store.backend changed: restart the sidecar to move the queue"
                )
            if spec is not None:
                self.store.configure(claim_idle=spec.claim_idle, retention=spec.retention)
            if self._telemetry is None and self._metrics is not None:
                self._telemetry = WebhookTelemetry(self._metrics, self._tracer)
                self._gauges = asyncio.create_task(self._gauge_loop(), name="webhook-gauges")
            store = self.store
            self._ingress = Ingress(webhooks, store=store)
            self._outbox = Outbox(webhooks, store=store)
            settings = {**compile_settings(webhooks), **(extra or {})}
            if self._worker is None:
                self._worker = DeliveryWorker(
                    store, settings, watcher=self._telemetry, listeners=lambda: self.listeners
                )
                await self._worker.start()
                # After the worker, which sets its own: both wake on a new event.
                store.on_new_deliveries = self._on_new_deliveries
                if self._telemetry is not None:
                    self._telemetry.watch_subscriptions(self.subscriptions)
            else:
                self._worker.configure(settings)

    async def _open(self, spec: WebhookStore | None) -> Queue:
        if spec is not None and spec.backend is not None:
            # Imported only for a Redis queue: a sidecar on SQLite never loads redis.
            from .redis_store import RedisStore

            store: Queue = await RedisStore.open(
                spec.backend,
                prefix=spec.prefix,
                claim_idle=spec.claim_idle,
                retention=spec.retention,
            )
            self.backend = spec.backend
            # The prefix, not the URL: it may hold a password.
            log.info("webhook queue in Redis under %s", spec.prefix)
            return store
        from .sqlite_store import SqliteStore

        os.makedirs(self.data_dir, exist_ok=True)
        store = await SqliteStore.open(self.data_dir)
        log.info("webhook store at %s", os.path.join(self.data_dir, "webhooks.db"))
        return store

    def _on_new_deliveries(self) -> None:
        if self._worker is not None:
            self._worker.wake()
        self.subscriptions.notify()

    def subscribable(self, name: str) -> bool:
        """Is `name` an inbound webhook agents may subscribe to (`subscribe: true`)?"""
        hook = self._ingress.by_name.get(name) if self._ingress is not None else None
        return hook is not None and hook.subscribe

    def wake(self) -> None:
        """Deliveries were made due again (retry, enable): look now, not at the next tick."""
        if self._worker is not None:
            self._worker.wake()

    def hook_for(self, path: str) -> InboundHook | None:
        return self._ingress.hook_for(path) if self._ingress is not None else None

    def receipt(self, direction: str, webhook: str, headers: list[tuple[str, str]]) -> Receipt:
        """Metrics and a span for one event received; `done` it with the answer.

        `webhook` is "" for a path or name no webhook is declared at. Its
        `headers` are the ones to store: with tracing on, their trace context
        is the receipt span's, so the deliveries continue the same trace.
        """
        telemetry = self._telemetry
        if telemetry is None:
            return _Unobserved(headers)
        from .queue import Direction

        return telemetry.receipt(Direction(direction), webhook, headers)

    async def inbound(self, path: str, headers: Headers, body: bytes) -> Result:
        if self._ingress is None:
            return refused(Reason.no_route, "no inbound webhook is declared", None)
        return await self._ingress.handle(path, headers, body)

    async def outbound(self, name: str, headers: Headers, body: bytes) -> Result:
        pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        known = self._outbox is not None and name in self._outbox.groups
        receipt = self.receipt("outbound", name if known else "", pairs)
        if self._outbox is None:
            result = refused(Reason.no_route, "no outbound webhook is declared", name)
        else:
            result = await self._outbox.handle(name, receipt.headers, body)
        receipt.done(result)
        return result

    async def refresh_gauges(self) -> None:
        """Read the queue depths into the gauges now (before a scrape)."""
        store, telemetry = self.store, self._telemetry
        if store is None or telemetry is None:
            return
        try:
            telemetry.queue_depths(await store.depths())
        except Exception as exc:
            # A scrape still answers (with the last depths) while the store is down.
            log.warning("webhook queue gauges: cannot read the store: %s", type(exc).__name__)

    async def _gauge_loop(self) -> None:
        while True:
            await self.refresh_gauges()
            await asyncio.sleep(QUEUE_GAUGES_EVERY)

    async def close(self) -> None:
        if self._gauges is not None:
            self._gauges.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._gauges
            self._gauges = None
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        if self.store is not None:
            await self.store.close()
            self.store = None
