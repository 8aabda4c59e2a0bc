"""Verified agent identity: a JWT checked against a JWKS, or a per-agent API key.

With `agents.verify` or `agents.keys` set, every call must carry a credential in
`agents.credential_header` (default `X-Agent-Token`; `Bearer <credential>` is
accepted too). A key is looked up by its SHA-256; a JWT is verified against the
issuer's public keys. The name found (the key's agent, or the token's `claim`)
becomes `call.agent`, whatever `X-Agent-Id` said. The credential itself is
removed from the call before anything else sees it: the upstream never gets it,
and the service's own `auth` step injects the upstream's credential later.

One `Credentials` serves every service of a policy (held in the state store under
the fingerprint of `agents:`), so the key set is fetched once and survives reloads
that leave `agents:` alone. JWT verification and the key set live in jwks.py,
imported only by policies that verify JWTs.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ..call import Call, Handler, Reply
from ..policy.loader import ServicePolicy
from ..policy.models import Agents
from ..problems import ProblemError
from ..state import StateBuild
from . import Step

if TYPE_CHECKING:
    from .jwks import JwtVerifier


class Refused(Exception):
    """The credential does not prove an identity; the text says why, never quoting it."""


class KeysUnavailable(Exception):
    """No key set could be fetched yet: the sidecar's problem, not the agent's."""


class Credentials:
    """Turns a presented credential into an agent name, or refuses it."""

    def __init__(self, agents: Agents) -> None:
        self.header = agents.credential_header
        self._by_hash = {
            digest.removeprefix("sha256:"): name for name, digest in agents.keys.items()
        }
        self._jwt: JwtVerifier | None = None
        if agents.verify is not None:
            # Imported only by policies that verify JWTs: pyjwt's cryptography backend
            # costs megabytes that a sidecar with API keys (or none) never needs.
            from .jwks import JwtVerifier

            self._jwt = JwtVerifier(agents.verify)

    def prefetch(self) -> None:
        """Start fetching the key set now, so the first call does not wait for it."""
        if self._jwt is not None:
            self._jwt.prefetch()

    async def identify(self, presented: str) -> str:
        if presented[:7].lower() == "bearer ":
            presented = presented[7:].strip()
        if self._by_hash:
            name = self._by_hash.get(hashlib.sha256(presented.encode()).hexdigest())
            if name is not None:
                return name
        if self._jwt is None:
            raise Refused("the key is not one of agents.keys")
        return await self._jwt.verify(presented)

    def retire(self) -> None:
        if self._jwt is not None:
            self._jwt.retire()


_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="agent-sidecar"'}


class Identify:
    """The step: the first of every chain when `agents:` asks for verified identity."""

    def __init__(self, *, service: str, credentials: Credentials) -> None:
        self.service = service
        self.credentials = credentials
        self.header = credentials.header

    async def __call__(self, call: Call, next: Handler) -> Reply:
        # Gone before anything else (logs, upstream) can see it; read from the raw
        # fields, so the others are not all decoded for it.
        presented = call.pop_all(self.header)
        # The self-declared name counts for nothing once identity is verified.
        call.agent = None
        if len(presented) != 1 or not presented[0].strip():
            raise self._refusal(
                f"send your credential in the {self.header} header"
                if not presented
                else f"send one {self.header} header, not several"
            )
        try:
            call.agent = await self.credentials.identify(presented[0].strip())
        except Refused as exc:
            raise self._refusal(str(exc)) from None
        except KeysUnavailable:
            raise ProblemError(
                "auth_failed",
                f"The sidecar could not fetch the keys to verify agents' tokens for service "
                f"'{self.service}'; retry later.",
                service=self.service,
            ) from None
        return await next(call)

    def _refusal(self, why: str) -> ProblemError:
        return ProblemError(
            "unauthenticated",
            f"Service '{self.service}' needs a verified agent identity and this call has "
            f"none: {why}.",
            service=self.service,
            headers=_CHALLENGE,
        )


def build(service: ServicePolicy, *, state: StateBuild) -> Step | None:
    agents = service.agents
    if agents.verify is None and not agents.keys:
        return None
    credentials = state.get("", "identity", agents, lambda: new(agents))
    return Identify(service=service.name, credentials=credentials)


def new(agents: Agents) -> Credentials:
    """The key set of `agents:`, fetching started (shared with the database connector)."""
    credentials = Credentials(agents)
    credentials.prefetch()
    return credentials
