"""Verified agent identity: a JWT checked against a JWKS, or a per-agent API key.

With `agents.verify` or `agents.keys` set, every call must carry a credential in
`agents.credential_header` (default `X-Agent-Token`; `Bearer <credential>` is
accepted too). A key is looked up by its SHA-256; a JWT is verified against the
issuer's public keys. The name found (the key's agent, or the token's `claim`)
becomes `call.agent`, whatever `X-Agent-Id` said. The credential itself is
removed from the call before anything else sees it: the upstream never gets it,
and the service's own `auth` step injects the upstream's credential later.

A thin adapter over the identity engine (engines/identity.py), which the database
connector and the webhook gate share: one `Credentials` serves every service of a
policy (held in the state store under the fingerprint of `agents:`), so the key set
is fetched once and survives reloads that leave `agents:` alone.
"""

from __future__ import annotations

from collections.abc import Awaitable

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...engines.identity import Credentials, KeysUnavailable, Refused, new
from ...policy.loaded import ServicePolicy
from .. import Step

_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="agent-sidecar"'}


class Identify:
    """The step: the first of every chain when `agents:` asks for verified identity."""

    def __init__(self, *, service: str, credentials: Credentials) -> None:
        self.service = service
        self.credentials = credentials
        self.header = credentials.header
        # Credentials proven before (Credentials.verdicts), read here without a call.
        self._verdicts = credentials.verdicts

    def __call__(self, call: Call, next: Handler) -> Awaitable[Reply]:
        # Not a coroutine: a credential proven before (nearly every call) goes on as the
        # next step's awaitable, with no coroutine of this step's in the chain. A refusal
        # raises here, where the step before (or the listener) awaits it.
        # Gone before anything else (logs, upstream) can see it; read from the raw
        # fields, so the others are not all decoded for it.
        presented = call.pop_all(self.header)
        credential = presented[0].strip() if len(presented) == 1 else ""
        if not credential:
            # The self-declared name counts for nothing once identity is verified.
            call.agent = None
            raise self._refusal(
                f"send your credential in the {self.header} header"
                if not presented
                else f"send one {self.header} header, not several"
            )
        agent = self._verdicts.get(credential)
        if agent is None:
            call.agent = None
            return self._identify(call, next, credential)
        call.agent = agent
        return next(call)

    async def _identify(self, call: Call, next: Handler, credential: str) -> Reply:
        try:
            call.agent = await self.credentials.identify(credential)
        except Refused as exc:
            raise self._refusal(str(exc)) from None
        except KeysUnavailable:
            raise ProblemError(
                Reason.auth_failed,
                f"The sidecar could not fetch the keys to verify agents' tokens for service "
                f"'{self.service}'; retry later.",
                service=self.service,
            ) from None
        return await next(call)

    def _refusal(self, why: str) -> ProblemError:
        return ProblemError(
            Reason.unauthenticated,
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
