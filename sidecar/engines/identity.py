"""Verified agent identity: a presented API key or JWT turned into an agent name.

A key is looked up by its SHA-256; a JWT is verified against the issuer's public
keys (jwks.py, imported only by policies that verify JWTs: pyjwt's cryptography
backend costs megabytes that a sidecar with API keys, or none, never needs). The
protocols decide where the credential comes from and how a refusal reads: the HTTP
identity step (steps/access/identity.py), the webhook gate and the database connector.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ..policy.models import Agents
from .refused import KeysUnavailable, Refused

if TYPE_CHECKING:
    from .jwks import JwtVerifier

__all__ = ["Credentials", "KeysUnavailable", "Refused", "new"]


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


def new(agents: Agents) -> Credentials:
    """The key set of `agents:`, fetching started (shared with the database connector)."""
    credentials = Credentials(agents)
    credentials.prefetch()
    return credentials
