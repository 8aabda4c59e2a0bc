"""Google access tokens with google-auth: a service-account key, an external-account
file (workload identity federation), or the metadata server (GKE, Compute Engine).

google-auth is synchronous: each refresh runs in a thread (one at a time,
refresh.py), with its requests transport, so the event loop never waits on
it. Imported only by policies that use `auth: {type: gcp}`.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from ...core.state import StateBuild
from ...policy.cloud import GcpAuth
from ...policy.loaded import ServicePolicy
from .bearer import BearerToken, TokenFailed, TokenSource

# A token without an expiry (unusual): assume an hour, a 401 replaces it sooner.
DEFAULT_LIFETIME = 3600.0


class GoogleToken:
    def __init__(self, spec: GcpAuth) -> None:
        self._spec = spec
        self._credentials: Any = None
        self._transport: Any = None

    def _load(self) -> Any:
        # Each kind's own loader: google-auth's generic one is deprecated, since a file of
        # an unexpected kind could make it call where the file says.
        from google.auth.transport.requests import Request

        spec = self._spec
        self._transport = Request()
        if spec.credentials is None:
            from google.auth import compute_engine

            return compute_engine.Credentials(scopes=spec.scopes)  # type: ignore[no-untyped-call]
        info = json.loads(spec.credentials.reveal())
        if info.get("type") == "service_account":
            from google.oauth2 import service_account

            load = service_account.Credentials.from_service_account_info
            return load(info, scopes=spec.scopes)  # type: ignore[no-untyped-call]
        source = info.get("credential_source") or {}
        if str(source.get("environment_id", "")).startswith("aws"):
            from google.auth import aws

            return aws.Credentials.from_info(info, scopes=spec.scopes)  # type: ignore[no-untyped-call]
        from google.auth import identity_pool

        return identity_pool.Credentials.from_info(info, scopes=spec.scopes)  # type: ignore[no-untyped-call]

    def _refresh(self) -> tuple[str, float]:
        """In a worker thread: google-auth blocks on its HTTP calls."""
        try:
            if self._credentials is None:
                self._credentials = self._load()
            credentials = self._credentials
            credentials.refresh(self._transport)
        except Exception as exc:  # google-auth raises many kinds
            # Its message may quote the token endpoint's answer: only the kind is told.
            raise TokenFailed(f"google-auth could not refresh ({type(exc).__name__})") from None
        token = credentials.token
        if not isinstance(token, str) or not token:
            raise TokenFailed("google-auth returned no token")
        expiry = credentials.expiry
        if expiry is None:
            return token, DEFAULT_LIFETIME
        lifetime = expiry.replace(tzinfo=UTC).timestamp() - datetime.now(UTC).timestamp()
        return token, max(lifetime, 1.0)

    async def fetch(self) -> tuple[str, float]:
        return await asyncio.to_thread(self._refresh)

    def close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.session.close()  # its requests.Session's pooled connections


class _Source(TokenSource):
    def __init__(self, *, service: str, google: GoogleToken, refresh_before: float) -> None:
        super().__init__(
            service=service, kind="Google", fetch=google.fetch, refresh_before=refresh_before
        )
        self._google = google

    def retire(self) -> None:
        # A refresh in its thread keeps the transport; the session then goes with the object.
        if not self.refreshing.busy:
            self._google.close()


def build(service: ServicePolicy, spec: GcpAuth, *, state: StateBuild) -> BearerToken:
    def make() -> TokenSource:
        return _Source(
            service=service.name, google=GoogleToken(spec), refresh_before=spec.refresh_before
        )

    return BearerToken(source=state.get(service.name, "gcp", spec, make))
