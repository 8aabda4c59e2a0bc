"""OAuth2 client credentials (RFC 6749 4.4): fetch, cache and refresh an access token.

The token lives in a `TokenSource` kept in the state store, keyed by the
auth settings secrets included: a reload that keeps them keeps the token, a
rotated client secret starts fresh. One token request at a time: however
many calls find the token missing or expired, they all wait for the same
request. Within `refresh_before` of expiry the current token is still used
while a new one is fetched in the background. An upstream 401 means the
token was revoked: it is dropped, a new one fetched and the call sent once
more.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from authlib.oauth2.auth import ClientAuth
from authlib.oauth2.rfc6749.parameters import prepare_token_request

from ...core.call import Call, Handler, Reply, make_replayable
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.base import AUTHORIZATION
from ...policy.loaded import ServicePolicy
from ...policy.models import OAuth2ClientCredentials

log = logging.getLogger("sidecar.auth")

# A token response without expires_in: assume an hour (a 401 still replaces it sooner).
DEFAULT_LIFETIME = 3600.0
TOKEN_REQUEST_TIMEOUT = 10.0
# The clock token lifetimes are measured with; tests replace it before building.
CLOCK: Callable[[], float] = time.monotonic
_ERROR_CODE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# RFC 6750 b64token, so the value can never break the Authorization header.
_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")


class TokenSource:
    """The cached access token of one set of client credentials."""

    def __init__(
        self,
        *,
        service: str,
        spec: OAuth2ClientCredentials,
        connect_timeout: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self._url = spec.token_url
        parts = urlsplit(spec.token_url)
        # For logs: never the query, where a careless URL might carry a credential.
        self._where = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
        self._client = ClientAuth(
            spec.client_id.reveal(), spec.client_secret.reveal(), spec.auth_method
        )
        self._form = prepare_token_request(
            "client_credentials", scope=spec.scope, audience=spec.audience
        )
        self._refresh_before = spec.refresh_before
        self._timeout = aiohttp.ClientTimeout(
            total=TOKEN_REQUEST_TIMEOUT, sock_connect=connect_timeout
        )
        self._clock = clock
        self._header: str | None = None  # "Bearer <token>"
        self._refresh_at = 0.0
        self._expires_at = 0.0
        self._pending: asyncio.Task[str] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._retired = False
        self.requests = 0  # token requests sent
        self.waiting = 0  # calls waiting for a token request to finish

    async def header(self) -> str:
        """The Authorization value to send now."""
        header = self._header
        if header is not None:
            now = self._clock()
            if now < self._refresh_at:
                return header
            if now < self._expires_at:
                self._start()  # still valid: refresh behind the call, not in front of it
                return header
        task = self._start()
        self.waiting += 1
        try:
            # Shielded: a caller giving up (its timeout) must not cancel the others' request.
            return await asyncio.shield(task)
        finally:
            self.waiting -= 1

    def invalidate(self, header: str) -> None:
        """The upstream refused `header`; forget it unless it was already replaced."""
        if self._header == header:
            self._header = None
            self._expires_at = self._refresh_at = 0.0

    def _start(self) -> asyncio.Task[str]:
        task = self._pending
        if task is None:
            task = self._pending = asyncio.get_running_loop().create_task(self._fetch())
            task.add_done_callback(_consume)
        return task

    async def _fetch(self) -> str:
        try:
            sent = self._clock()
            token, lifetime = await self._request()
            lifetime = lifetime or DEFAULT_LIFETIME
            # Counted from when the request was sent: the token may be a little older.
            self._header = f"Bearer {token}"
            self._expires_at = sent + lifetime
            self._refresh_at = self._expires_at - min(self._refresh_before, lifetime / 2)
            log.debug("service %s: new access token, valid %gs", self.service, lifetime)
            return self._header
        finally:
            self._pending = None
            if self._retired:
                await self._close()

    async def _request(self) -> tuple[str, float | None]:
        headers = {
            "Content-Type": "application/x-www-form-urlencoded",
            "Accept": "application/json",
        }
        url, headers, body = self._client.prepare("POST", self._url, headers, self._form)
        session = self._session or self._open()
        self.requests += 1
        try:
            async with session.post(url, data=body.encode(), headers=headers) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError:
            raise self._failed(
                f"the token endpoint did not answer within {TOKEN_REQUEST_TIMEOUT:g}s"
            ) from None
        except aiohttp.ClientError:
            raise self._failed("the token endpoint could not be reached") from None
        try:
            data: Any = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            raise self._failed(f"the token endpoint answered HTTP {status} without a JSON object")
        error = data.get("error")
        if status != 200 or error is not None:
            code = f" ({error})" if isinstance(error, str) and _ERROR_CODE.match(error) else ""
            raise self._failed(f"the token endpoint answered HTTP {status}{code}")
        token = data.get("access_token")
        kind = data.get("token_type", "Bearer")
        if not isinstance(token, str) or not _TOKEN.match(token):
            raise self._failed("the token endpoint's answer has no usable access_token")
        if not isinstance(kind, str) or kind.lower() != "bearer":
            raise self._failed("the token endpoint issued a token that is not a Bearer token")
        expires_in = data.get("expires_in")
        try:
            lifetime = float(expires_in) if expires_in is not None else None
        except (TypeError, ValueError):
            lifetime = None
        if lifetime is not None and lifetime <= 0:
            lifetime = None
        return token, lifetime

    def _failed(self, why: str) -> ProblemError:
        log.warning("service %s: token request to %s failed: %s", self.service, self._where, why)
        return ProblemError(
            Reason.auth_failed,
            f"The sidecar could not get an access token for service '{self.service}': {why}. "
            "The call was not sent; try again later.",
            service=self.service,
        )

    def _open(self) -> aiohttp.ClientSession:
        # Made lazily: the session must be created inside the running loop.
        self._session = aiohttp.ClientSession(
            timeout=self._timeout, cookie_jar=aiohttp.DummyCookieJar(), trust_env=False
        )
        return self._session

    def retire(self) -> None:
        """A reload replaced these credentials. Calls still waiting for a token get it:
        the session closes once the request in flight (if any) has finished."""
        self._retired = True
        if self._pending is None and self._session is not None:
            asyncio.get_running_loop().create_task(self._close())

    async def _close(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            await session.close()


def _consume(task: asyncio.Task[str]) -> None:
    # A background refresh may fail with nobody awaiting it; it is logged already.
    if not task.cancelled():
        task.exception()


class OAuth2Auth:
    def __init__(self, *, source: TokenSource) -> None:
        self.source = source

    async def __call__(self, call: Call, next: Handler) -> Reply:
        source = self.source
        header = await source.header()
        call.headers[AUTHORIZATION] = header
        replayable = await make_replayable(call)
        reply = await next(call)
        if reply.status != 401:
            return reply
        source.invalidate(header)
        if not replayable:
            return reply  # the body is gone; the agent sees the 401 and may try again
        reply.release()
        call.headers[AUTHORIZATION] = await source.header()
        return await next(call)


def build(
    service: ServicePolicy, spec: OAuth2ClientCredentials, *, state: StateBuild
) -> OAuth2Auth:
    connect = service.spec.timeout.connect
    source = state.get(
        service.name,
        "oauth2",
        (spec, connect),
        lambda: TokenSource(service=service.name, spec=spec, connect_timeout=connect, clock=CLOCK),
    )
    return OAuth2Auth(source=source)
