"""Credential injection. The agent never holds the credential; the sidecar adds it.

Whatever the agent sent in the same header (or query parameter) is removed
before the request is prepared, so an agent cannot override or probe it.
Kinds that need state (OAuth2 tokens, minted JWTs) live in their own modules.
"""

from __future__ import annotations

import base64
from urllib.parse import quote, unquote_plus

from ...core.call import Call, Field, Handler, Reply
from ...core.state import StateBuild
from ...policy.base import AUTHORIZATION
from ...policy.cloud import AwsSigV4Auth, AzureAuth, GcpAuth
from ...policy.loaded import ServicePolicy
from ...policy.models import BasicAuth, BearerAuth, HeaderAuth, OAuth2ClientCredentials, QueryAuth
from ...policy.secrets import Secret
from .. import Step


class SetHeader:
    """Bearer, basic and header kinds: one fixed header value, computed once per load.

    A `call.Before` step: the chain runs `before` and the next step, with no
    coroutine of its own.
    """

    def __init__(self, *, name: str, value: str) -> None:
        self.name = name
        self._field = Field(name, value)

    def before(self, call: Call) -> None:
        call.set_field(self._field)

    async def __call__(self, call: Call, next: Handler) -> Reply:
        self.before(call)
        return await next(call)


class SetQuery:
    """The query kind: the parameter replaces any the agent sent under that name
    (a `call.Before` step too)."""

    def __init__(self, *, name: str, value: str) -> None:
        self.name = name
        self._pair = f"{quote(name, safe='')}={quote(value, safe='')}"

    async def __call__(self, call: Call, next: Handler) -> Reply:
        self.before(call)
        return await next(call)

    def before(self, call: Call) -> None:
        path, sep, query = call.target.partition("?")
        if sep and query:
            # The agent's other parameters stay byte for byte (`flag` is not `flag=`).
            kept = [p for p in query.split("&") if p and self._name(p) != self.name]
            kept.append(self._pair)
            call.target = f"{path}?{'&'.join(kept)}"
        else:
            call.target = f"{path}?{self._pair}"

    @staticmethod
    def _name(pair: str) -> str:
        return unquote_plus(pair.partition("=")[0])


def header_name(service: ServicePolicy) -> str | None:
    """The header an auth kind writes, so the agent's own value there is dropped first."""
    auth = service.spec.auth
    return None if auth is None else auth.credential_header


def _unresolved(auth: object) -> bool:
    return any(isinstance(value, Secret) and value.unresolved for value in vars(auth).values())


def build(service: ServicePolicy, *, state: StateBuild) -> Step | None:
    auth = service.spec.auth
    if auth is None or _unresolved(auth):
        # No credential for a service that never calls its upstream (mode: mock, or
        # replay without passthrough) when its secret is not there (policy/secrets.py).
        return None
    if isinstance(auth, BearerAuth):
        return SetHeader(name=AUTHORIZATION, value=f"Bearer {auth.token.reveal()}")
    if isinstance(auth, HeaderAuth):
        return SetHeader(name=auth.name, value=auth.value.reveal())
    if isinstance(auth, BasicAuth):
        pair = f"{auth.username.reveal()}:{auth.password.reveal()}".encode()
        return SetHeader(name=AUTHORIZATION, value=f"Basic {base64.b64encode(pair).decode()}")
    if isinstance(auth, QueryAuth):
        return SetQuery(name=auth.name, value=auth.value.reveal())
    if isinstance(auth, OAuth2ClientCredentials):
        # Imported only by policies that use them: authlib and cryptography cost
        # megabytes of memory that a sidecar with static credentials never needs.
        from . import oauth2

        return oauth2.build(service, auth, state=state)
    if isinstance(auth, AwsSigV4Auth):
        from . import aws

        return aws.build(service, auth, state=state)
    if isinstance(auth, GcpAuth):
        from . import gcp

        return gcp.build(service, auth, state=state)
    if isinstance(auth, AzureAuth):
        from . import azure

        return azure.build(service, auth, state=state)
    from . import jwt_auth

    return jwt_auth.build(auth)
