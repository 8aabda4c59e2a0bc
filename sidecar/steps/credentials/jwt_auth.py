"""JWT minting: the sidecar signs a short-lived token and sends it as `Bearer <jwt>`.

The key is parsed once per load (a bad key is a policy error, reported by
`sidecar validate`). One token is minted and reused until it comes close to
its expiry, so signing (about a millisecond with RSA) happens once per
token lifetime, not per call.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable

import jwt

from ...core.call import Call, Handler, Reply
from ...policy.jwt_keys import signing_key
from ...policy.models import JwtAuth


class MintJwt:
    def __init__(self, *, spec: JwtAuth, clock: Callable[[], float] = time.time) -> None:
        self.name = spec.header
        self._key = signing_key(spec.algorithm, spec.key.reveal())
        self._algorithm = spec.algorithm
        self._headers = {"kid": spec.kid} if spec.kid else None
        self._claims = dict(spec.claims)
        self._ttl = spec.ttl
        # Re-mint with time to spare, so a token never expires on its way to the upstream.
        self._margin = min(0.2 * spec.ttl, 30.0)
        self._clock = clock
        self._value = ""
        self._renew_at = float("-inf")

    def _mint(self, now: float) -> None:
        iat = int(now)
        claims = dict(self._claims)
        claims["iat"] = iat
        claims["exp"] = iat + max(1, round(self._ttl))
        # A fresh id per minted token (not per call: the token is reused until renewed).
        claims["jti"] = uuid.uuid4().hex
        token = jwt.encode(claims, self._key, algorithm=self._algorithm, headers=self._headers)
        self._value = f"Bearer {token}"
        self._renew_at = iat + self._ttl - self._margin

    async def __call__(self, call: Call, next: Handler) -> Reply:
        now = self._clock()
        if now >= self._renew_at:
            self._mint(now)
        call.headers[self.name] = self._value
        return await next(call)


def build(spec: JwtAuth) -> MintJwt:
    return MintJwt(spec=spec)
