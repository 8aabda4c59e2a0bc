"""Microsoft Entra ID access tokens: managed identity (IMDS) or AKS workload identity.

- Managed identity: `GET` of the instance metadata token endpoint with
  `Metadata: true`, for the scope's resource.
- Workload identity federation: the pod's projected token (re-read at each
  fetch) sent as a client assertion to `{authority}/{tenant}/oauth2/v2.0/token`.

Plain HTTP calls with aiohttp, no Azure SDK. (Client secrets are
`oauth2_client_credentials`.)
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, Final
from urllib.parse import urlencode

import aiohttp

from ...core.state import StateBuild
from ...policy.cloud import AzureAuth, ManagedIdentity, WorkloadIdentity
from ...policy.loaded import ServicePolicy
from .bearer import BearerToken, TokenFailed, TokenSource

TOKEN_TIMEOUT: Final = 10.0
DEFAULT_LIFETIME: Final = 3600.0
_ASSERTION: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"


class EntraToken:
    def __init__(self, spec: AzureAuth) -> None:
        self._spec = spec
        self._session: aiohttp.ClientSession | None = None

    async def fetch(self) -> tuple[str, float]:
        spec = self._spec
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=TOKEN_TIMEOUT),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        try:
            if spec.workload_identity is not None:
                status, raw = await self._federated(session, spec.workload_identity)
            else:
                status, raw = await self._imds(session, spec.managed_identity or ManagedIdentity())
        except TimeoutError:
            raise TokenFailed(f"the token endpoint did not answer in {TOKEN_TIMEOUT:g}s") from None
        except aiohttp.ClientError:
            raise TokenFailed("the token endpoint could not be reached") from None
        return _parse(status, raw)

    async def _imds(
        self, session: aiohttp.ClientSession, spec: ManagedIdentity
    ) -> tuple[int, bytes]:
        params = {"api-version": "2018-02-01", "resource": _resource(self._spec.scope)}
        if spec.client_id:
            params["client_id"] = spec.client_id
        url = f"{spec.endpoint}?{urlencode(params)}"
        async with session.get(url, headers={"Metadata": "true"}) as resp:
            return resp.status, await resp.read()

    async def _federated(
        self, session: aiohttp.ClientSession, spec: WorkloadIdentity
    ) -> tuple[int, bytes]:
        path = spec.token_file or ""
        try:
            assertion = (await asyncio.to_thread(_read_text, path)).strip()
        except (OSError, UnicodeDecodeError):
            raise TokenFailed(f"the federated token file {path} could not be read") from None
        form = {
            "grant_type": "client_credentials",
            "client_id": spec.client_id or "",
            "scope": self._spec.scope,
            "client_assertion_type": _ASSERTION,
            "client_assertion": assertion,
        }
        url = f"{(spec.authority or '').rstrip('/')}/{spec.tenant_id}/oauth2/v2.0/token"
        async with session.post(url, data=form) as resp:
            return resp.status, await resp.read()

    def retire(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            asyncio.get_running_loop().create_task(session.close())


def _resource(scope: str) -> str:
    # IMDS takes a resource, Entra ID v2 a scope: https://storage.azure.com/.default.
    return scope.removesuffix("/.default")


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _parse(status: int, raw: bytes) -> tuple[str, float]:
    try:
        data: Any = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise TokenFailed(f"the token endpoint answered HTTP {status} without a JSON object")
    error = data.get("error")
    if status != 200 or error is not None:
        code = error if isinstance(error, str) and error.replace("_", "").isalnum() else ""
        raise TokenFailed(
            f"the token endpoint answered HTTP {status}" + (f" ({code})" if code else "")
        )
    token = data.get("access_token")
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n "):
        raise TokenFailed("the token endpoint's answer has no usable access_token")
    try:
        lifetime = float(data.get("expires_in", DEFAULT_LIFETIME))  # IMDS sends a string
    except (TypeError, ValueError):
        lifetime = DEFAULT_LIFETIME
    return token, lifetime if lifetime > 0 else DEFAULT_LIFETIME


class _Source(TokenSource):
    def __init__(self, *, service: str, entra: EntraToken, refresh_before: float) -> None:
        super().__init__(
            service=service,
            kind="Microsoft Entra ID",
            fetch=entra.fetch,
            refresh_before=refresh_before,
        )
        self._entra = entra

    def retire(self) -> None:
        self._entra.retire()


def build(service: ServicePolicy, spec: AzureAuth, *, state: StateBuild) -> BearerToken:
    def make() -> TokenSource:
        return _Source(
            service=service.name, entra=EntraToken(spec), refresh_before=spec.refresh_before
        )

    return BearerToken(source=state.get(service.name, "azure", spec, make))
