"""The last step of every chain: send the call to the upstream over a pooled connection.

One `Upstream` (one keep-alive `Pool`) per service and upstream origin. It
lives in the state store, so a reload that keeps the origin keeps the warm
connections; a retired one closes once idle.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final
from urllib.parse import urlsplit

from ..core.call import Call, Reply
from ..core.problems import ProblemError
from ..core.reasons import Reason
from .pool import ConnectError, ConnectTimeout, Pool, ResetError, Resolver, UpstreamError

log = logging.getLogger("sidecar.upstream")

# One DNS cache for the process: every pool resolves through it.
RESOLVER: Final = Resolver(ttl=60.0)
_UPGRADE_HEADERS: Final = (("Connection", "Upgrade"), ("Upgrade", "websocket"))


class Upstream:
    def __init__(self, *, service: str, upstream: str, connect_timeout: float):
        parts = urlsplit(upstream)
        self.service = service
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self.pool = Pool(
            self.origin,
            connect_timeout=connect_timeout,
            idle_timeout=30.0,
            resolver=RESOLVER,
        )
        # Calls using this pool, counted by the egress from the start of the chain
        # to the last byte relayed; a retired pool closes only at zero.
        self.inflight = 0

    async def __call__(self, call: Call) -> Reply:
        if call.upgrade:
            # Hop-by-hop, so dropped from the agent's request: this hop asks again.
            call.headers.update(_UPGRADE_HEADERS)  # update: a retry must not send them twice
        raw = call.raw_headers  # None once a step (or the upgrade) decoded them
        try:
            return await self.pool.request(
                call.method,
                self.base_path + call.target,
                call.headers.items() if raw is None else (),
                call.body,
                content_length=call.content_length,
                raw_headers=raw,
            )
        except UpstreamError as exc:
            raise self._problem(exc) from None

    def _problem(self, exc: UpstreamError) -> ProblemError:
        """The sidecar's answer for a failed exchange, with the cause retry/breaker act on."""
        service = self.service
        if isinstance(exc, ConnectTimeout):
            return ProblemError(
                Reason.upstream_unreachable,
                f"The upstream of service '{service}' did not accept a connection within "
                f"{self.connect_timeout:g}s; try again later.",
                service=service,
                cause="connect-error",
            )
        if isinstance(exc, ConnectError):
            return ProblemError(
                Reason.upstream_unreachable,
                f"The sidecar could not connect to the upstream of service '{service}' "
                f"({exc}); try again later.",
                service=service,
                cause="connect-error",
            )
        if not isinstance(exc, ResetError):
            log.warning("unexpected upstream error of %s: %s", service, type(exc).__name__)
        return ProblemError(
            Reason.upstream_unreachable,
            f"The upstream of service '{service}' closed the connection before answering; "
            "try again later.",
            service=service,
            cause="reset",
        )

    def retire(self) -> None:
        """Close the pool once no call is using it; a reload swapped it out."""
        asyncio.get_running_loop().create_task(self._close_when_idle())

    async def _close_when_idle(self) -> None:
        # `inflight` spans a call from its first step to its last relayed byte, so
        # at zero every connection is back in the pool. Retiring is rare and the
        # count has no event to wait on: poll, slowly.
        while self.inflight:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        self.pool.close()
