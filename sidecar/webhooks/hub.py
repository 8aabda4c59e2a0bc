"""The webhooks of a running sidecar: one store, one delivery worker, the current policy.

The store opens (and the worker starts) the first time a policy declares
webhooks; a reload swaps the compiled Ingress/Outbox and hands the worker the
new delivery settings, while deliveries already stored keep going. The
listeners call `inbound` (ingress) and `outbound` (egress `/_webhooks/<name>`).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from ..policy.webhooks import Webhooks
from .answers import Reason, Result, refused

if TYPE_CHECKING:
    # Imported when a policy first declares webhooks: a sidecar without them never
    # loads sqlite3 or cryptography.
    from .delivery import DeliveryWorker
    from .inbound import InboundHook, Ingress
    from .outbound import Outbox
    from .store import Store

log = logging.getLogger("sidecar.webhooks")

Headers = Mapping[str, str] | list[tuple[str, str]]


class WebhookHub:
    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.store: Store | None = None
        self._worker: DeliveryWorker | None = None
        self._ingress: Ingress | None = None
        self._outbox: Outbox | None = None
        self._lock = asyncio.Lock()

    @property
    def inbound_paths(self) -> frozenset[str]:
        return frozenset(self._ingress.hooks) if self._ingress is not None else frozenset()

    async def apply(self, webhooks: Webhooks | None) -> None:
        """Serve a (re)loaded policy's webhooks; opens the store on first use."""
        async with self._lock:
            if webhooks is None and self.store is None:
                return  # no webhooks ever: no database file, no worker
            from .delivery import DeliveryWorker, compile_settings
            from .inbound import Ingress
            from .outbound import Outbox
            from .store import Store

            if self.store is None:
                os.makedirs(self.data_dir, exist_ok=True)
                self.store = await Store.open(self.data_dir)
                log.info("webhook store at %s", os.path.join(self.data_dir, "webhooks.db"))
            store = self.store
            self._ingress = Ingress(webhooks, store=store)
            self._outbox = Outbox(webhooks, store=store)
            settings = compile_settings(webhooks)
            if self._worker is None:
                self._worker = DeliveryWorker(store, settings)
                await self._worker.start()
            else:
                self._worker.configure(settings)

    def wake(self) -> None:
        """Deliveries were made due again (retry, enable): look now, not at the next tick."""
        if self._worker is not None:
            self._worker.wake()

    def hook_for(self, path: str) -> InboundHook | None:
        return self._ingress.hook_for(path) if self._ingress is not None else None

    async def inbound(self, path: str, headers: Headers, body: bytes) -> Result:
        if self._ingress is None:
            return refused(Reason.no_route, "no inbound webhook is declared", None)
        return await self._ingress.handle(path, headers, body)

    async def outbound(self, name: str, headers: Headers, body: bytes) -> Result:
        if self._outbox is None:
            return refused(Reason.no_route, "no outbound webhook is declared", name)
        return await self._outbox.handle(name, headers, body)

    async def close(self) -> None:
        if self._worker is not None:
            await self._worker.stop()
            self._worker = None
        if self.store is not None:
            await self.store.close()
            self.store = None
