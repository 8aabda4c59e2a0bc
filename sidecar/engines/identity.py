"""Verified agent identity: a presented API key or JWT turned into an agent name.

A key is looked up by its SHA-256; a JWT is verified against the issuer's public
keys (jwks.py, imported only by policies that verify JWTs: pyjwt's cryptography
backend costs megabytes that a sidecar with API keys, or none, never needs). The
protocols decide where the credential comes from and how a refusal reads: the HTTP
identity step (steps/access/identity.py), the webhook gate and the database connector.

A credential once proven is remembered (verdicts.py), so an agent presenting the same
one again costs a dict lookup, not a hash or a signature check: keyed by the exact
text presented, held no longer than the token's `exp`, emptied when the key set
changes, bounded in size. A policy that changes `agents:` (a key removed) builds new
`Credentials`, and with them an empty cache.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

from ..policy.models import Agents
from .refused import KeysUnavailable, Refused
from .verdicts import NEVER, Verdicts

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
        self.verdicts = Verdicts()
        self._jwt: JwtVerifier | None = None
        if agents.verify is not None:
            # Imported only by policies that verify JWTs: pyjwt's cryptography backend
            # costs megabytes that a sidecar with API keys (or none) never needs.
            from .jwks import JwtVerifier

            # It empties the verdicts when its key set changes: a key that left the set
            # must stop proving anything at once.
            self._jwt = JwtVerifier(agents.verify, verdicts=self.verdicts)

    def prefetch(self) -> None:
        """Start fetching the key set now, so the first call does not wait for it."""
        if self._jwt is not None:
            self._jwt.prefetch()

    async def identify(self, presented: str) -> str:
        agent = self.verdicts.get(presented)
        if agent is not None:
            return agent
        credential = presented
        if credential[:7].lower() == "bearer ":
            credential = credential[7:].strip()
        if self._by_hash:
            name = self._by_hash.get(hashlib.sha256(credential.encode()).hexdigest())
            if name is not None:
                self.verdicts.put(presented, name, NEVER)
                return name
        if self._jwt is None:
            raise Refused("the key is not one of agents.keys")
        # No await between the verification and remembering it: a key set that changes
        # meanwhile empties the verdicts after this one is in, never before.
        agent, expires = await self._jwt.verified(credential)
        self.verdicts.put(presented, agent, expires)
        return agent

    def retire(self) -> None:
        if self._jwt is not None:
            self._jwt.retire()


def new(agents: Agents) -> Credentials:
    """The key set of `agents:`, fetching started (shared with the database connector)."""
    credentials = Credentials(agents)
    credentials.prefetch()
    return credentials
