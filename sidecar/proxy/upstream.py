"""The last step of every chain: send the call to the upstream over a pooled session.

One `Upstream` (one aiohttp ClientSession and connection pool) per service
and upstream origin. It lives in the state store, so a reload that keeps the
origin keeps the warm connections; a retired one closes once idle.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import aiohttp
from yarl import URL

from ..call import Call, Reply
from ..problems import ProblemError
from . import websocket

log = logging.getLogger("sidecar.upstream")


class Upstream:
    def __init__(self, *, service: str, upstream: str, connect_timeout: float):
        parts = urlsplit(upstream)
        self.service = service
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = parts.path.rstrip("/")
        self.connect_timeout = connect_timeout
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=None, sock_connect=connect_timeout
        )
        # Every call's URL starts with this; only call.target is appended per call.
        self._url_prefix = self.origin + self.base_path
        self._session: aiohttp.ClientSession | None = None
        # Calls using this pool, counted by the egress handler from the start of the
        # chain to the last byte relayed; a retired pool closes only at zero.
        self.inflight = 0

    def _open(self) -> aiohttp.ClientSession:
        # Made lazily: the session must be created inside the running loop.
        connector = aiohttp.TCPConnector(
            limit=0,  # the sidecar's own limits decide concurrency, not the pool
            keepalive_timeout=30,
            ttl_dns_cache=60,
            enable_cleanup_closed=False,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # no cookie may pass from one agent to another
            auto_decompress=False,  # bytes pass through untouched, Content-Encoding kept
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=self._timeout,
            trust_env=False,
            raise_for_status=False,
        )
        return self._session

    async def __call__(self, call: Call) -> Reply:
        session = self._session or self._open()
        url = URL(self._url_prefix + call.target, encoded=True)
        try:
            if call.upgrade:
                return await websocket.connect(session, url, call.headers)
            return await session.request(
                call.method,
                url,
                headers=call.headers,
                data=call.body,
                allow_redirects=False,
                compress=None,
            )
        except ProblemError:
            raise
        except aiohttp.ClientError as exc:
            raise self._problem(exc) from None
        except TimeoutError:
            raise self._problem(aiohttp.ServerTimeoutError()) from None

    def _problem(self, exc: aiohttp.ClientError) -> ProblemError:
        """The sidecar's answer for a failed exchange, with the cause retry/breaker act on."""
        if isinstance(exc.__cause__, ProblemError):
            # Raised while streaming the agent's body (too large); aiohttp wraps it.
            return exc.__cause__
        service = self.service
        if isinstance(exc, aiohttp.ConnectionTimeoutError):
            return ProblemError(
                "upstream_unreachable",
                f"The upstream of service '{service}' did not accept a connection within "
                f"{self.connect_timeout:g}s; try again later.",
                service=service,
                cause="connect-error",
            )
        if isinstance(exc, aiohttp.ClientConnectorError):
            return ProblemError(
                "upstream_unreachable",
                f"The sidecar could not connect to the upstream of service '{service}' "
                f"({_describe(exc)}); try again later.",
                service=service,
                cause="connect-error",
            )
        if isinstance(exc, aiohttp.ServerTimeoutError):
            return ProblemError(
                "upstream_timeout",
                f"The upstream of service '{service}' stopped sending data.",
                service=service,
                cause="timeout",
            )
        return ProblemError(
            "upstream_unreachable",
            f"The upstream of service '{service}' closed the connection before answering; "
            "try again later.",
            service=service,
            cause="reset",
        )

    def retire(self) -> None:
        """Close the pool once no call is using it; a reload swapped it out."""
        if self._session is not None:
            asyncio.get_running_loop().create_task(self._close_when_idle(self._session))

    async def _close_when_idle(self, session: aiohttp.ClientSession) -> None:
        # `inflight` spans a call from its first step to its last relayed byte, so
        # at zero every connection is back in the pool. Retiring is rare and the
        # count has no event to wait on: poll, slowly.
        while self.inflight:  # noqa: ASYNC110
            await asyncio.sleep(0.5)
        await session.close()


def _describe(exc: aiohttp.ClientConnectorError) -> str:
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "its TLS certificate was not accepted"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "the TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return f"cannot resolve {exc.host}"
    return f"{exc.host}:{exc.port} refused or dropped the connection"
