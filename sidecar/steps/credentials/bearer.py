"""The step of every cloud kind whose credential is a bearer access token (Google, Azure).

The token comes from a `Refreshing` source (refresh.py): fetched once for all
calls, renewed before it expires. As with OAuth2 (steps/credentials/oauth2.py), an
upstream 401 means the token was revoked: it is dropped, a new one fetched,
and the call sent once more if its body can be sent again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from ...core.call import Call, Handler, Reply, make_replayable
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...policy.base import AUTHORIZATION
from .refresh import Fetch, Refreshing

log = logging.getLogger("sidecar.auth")


class TokenFailed(Exception):
    """A token fetch failed; `why` is safe to show (no credential, no token)."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class TokenSource:
    """An access token fetched by `fetch`, cached and renewed (refresh.py); a failed
    fetch is logged once and answers `auth_failed` to every call that waited for it."""

    def __init__(
        self,
        *,
        service: str,
        kind: str,
        fetch: Fetch[str],
        refresh_before: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.kind = kind
        self._fetch = fetch
        self.refreshing: Refreshing[str] = Refreshing(
            self._logged, refresh_before=refresh_before, clock=clock
        )

    async def _logged(self) -> tuple[str, float]:
        try:
            return await self._fetch()
        except TokenFailed as exc:
            log.warning("service %s: %s token fetch failed: %s", self.service, self.kind, exc.why)
            raise

    def fresh(self) -> str | None:
        return self.refreshing.fresh()

    async def get(self) -> str:
        try:
            return await self.refreshing.get()
        except TokenFailed as exc:
            raise ProblemError(
                Reason.auth_failed,
                f"The sidecar could not get a {self.kind} access token for service "
                f"'{self.service}': {exc.why}. The call was not sent; try again later.",
                service=self.service,
            ) from None

    def retire(self) -> None:
        return None


class BearerToken:
    def __init__(self, *, source: TokenSource) -> None:
        self.source = source

    async def __call__(self, call: Call, next: Handler) -> Reply:
        source = self.source
        token = source.fresh()
        if token is None:
            token = await source.get()
        call.set_header(AUTHORIZATION, f"Bearer {token}")
        replayable = await make_replayable(call)
        reply = await next(call)
        if reply.status != 401:
            return reply
        if source.refreshing.fresh() == token:
            source.refreshing.invalidate()
        if not replayable:
            return reply
        reply.release()
        call.set_header(AUTHORIZATION, f"Bearer {await source.get()}")
        return await next(call)
