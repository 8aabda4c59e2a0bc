"""JWT verification against an issuer's JWK Set, for the identity engine (identity.py).

Key sets are fetched with aiohttp on the event loop, never with a blocking
client: when the set is older than `cache` (in the background: calls go on with
the keys they have) or when a token names a kid the set lacks (at most once per
`min_refresh`, so made-up kids cannot turn the sidecar into a load generator
against the issuer). Only public-key algorithms verify; `oct` keys in a set,
HS* tokens and `alg: none` never do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import jwt

from ..policy.access import JwtVerify, jwks_document
from ..policy.secrets import Secret
from .refused import KeysUnavailable, Refused
from .verdicts import Verdicts

log = logging.getLogger("sidecar.identity")

Clock = Callable[[], float]

# A key set document larger than this is refused (a JWKS is a few kilobytes).
MAX_JWKS = 1 << 20
FETCH_TIMEOUT = aiohttp.ClientTimeout(total=10)

# Key type (and curve) -> the algorithms such a key can verify, when its JWK names none.
_FAMILY = {
    "RSA": ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"),
    "EC:P-256": ("ES256",),
    "EC:P-384": ("ES384",),
    "EC:P-521": ("ES512",),
    "OKP:Ed25519": ("EdDSA",),
}


@dataclass(frozen=True, slots=True)
class VerifyKey:
    kid: str | None
    algorithms: frozenset[str]
    key: Any  # a cryptography public key


def parse_keys(keys: list[dict[str, Any]], accepted: frozenset[str]) -> list[VerifyKey]:
    """The usable signing keys of a JWK Set. Symmetric (`oct`) keys, encryption keys and
    keys for algorithms not accepted are skipped: a public document cannot hold a secret."""
    out = []
    for jwk in keys:
        if jwk.get("use", "sig") != "sig":
            continue
        kty = jwk.get("kty")
        family = _FAMILY.get(f"{kty}:{jwk.get('crv')}" if kty in ("EC", "OKP") else str(kty))
        if family is None:
            continue
        alg = jwk.get("alg")
        algorithms = frozenset(family if alg is None else (alg,) if alg in family else ())
        algorithms &= accepted
        if not algorithms:
            continue
        kid = jwk.get("kid")
        try:
            key = jwt.get_algorithm_by_name(next(iter(algorithms))).from_jwk(jwk)
        except (jwt.exceptions.PyJWTError, ValueError, TypeError, KeyError):
            log.warning("JWKS: key %r is malformed, skipped", kid)
            continue
        if hasattr(key, "private_bytes"):
            # A private key published by mistake still verifies; use its public half only.
            key = key.public_key()
        out.append(
            VerifyKey(kid=kid if isinstance(kid, str) else None, algorithms=algorithms, key=key)
        )
    return out


class JwtVerifier:
    def __init__(
        self, spec: JwtVerify, *, clock: Clock = time.monotonic, verdicts: Verdicts | None = None
    ) -> None:
        self.spec = spec
        self._accepted = frozenset(spec.algorithms)
        self._audience = list(spec.audience)
        self._clock = clock
        self._keys: list[VerifyKey] = []
        self._fetched_at = float("-inf")  # last successful fetch
        self._tried_at = float("-inf")  # last attempt, successful or not
        self._loaded = False
        self._fetch: asyncio.Task[None] | None = None
        # Verified tokens remembered (bounded, each until its `exp`): an agent reusing
        # its token costs a dict lookup, not a signature check. Shared with the
        # Credentials this verifier serves, which remember what they were presented.
        self._verified = Verdicts() if verdicts is None else verdicts
        self._url: str | None = None
        self._document: list[dict[str, Any]] | None = None
        if isinstance(spec.jwks, Secret):
            # A ${file:} key set: read at load (the loader checked it), re-read on rotation
            # because the file is watched and a change reloads the policy.
            self._set_keys(jwks_document(spec.jwks.reveal()))
        else:
            self._url = spec.jwks

    def _set_keys(self, document: list[dict[str, Any]]) -> None:
        self._loaded = True
        if document == self._document:
            return  # a refresh that found the same keys proves what it proved
        self._document = document
        self._keys = parse_keys(document, self._accepted)
        # A key that left the set must stop proving anything at once (the agent keys'
        # verdicts, which share the cache, are proven again from their hashes).
        self._verified.clear()

    # -- fetching -------------------------------------------------------------------

    async def _get(self, url: str) -> None:
        self._tried_at = self._clock()
        try:
            async with (
                aiohttp.ClientSession(timeout=FETCH_TIMEOUT) as session,
                session.get(url, headers={"Accept": "application/json"}) as resp,
            ):
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = bytearray()
                async for chunk in resp.content.iter_chunked(1 << 16):
                    body += chunk
                    if len(body) > MAX_JWKS:
                        raise ValueError("larger than 1 MiB")
            document = jwks_document(body.decode("utf-8", "replace"))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("JWKS %s could not be fetched: %s", url, exc or type(exc).__name__)
            return
        self._set_keys(document)
        self._fetched_at = self._clock()

    def _refresh(self) -> asyncio.Future[None]:
        """The one fetch in flight, started if none is (calls share it)."""
        if self._url is None:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            done.set_result(None)
            return done
        if self._fetch is None or self._fetch.done():
            self._fetch = asyncio.get_running_loop().create_task(self._get(self._url))
        return self._fetch

    def _may_fetch(self) -> bool:
        """A fetch is in flight (join it), or the last attempt is min_refresh old."""
        if self._fetch is not None and not self._fetch.done():
            return True
        return self._clock() - self._tried_at >= self.spec.min_refresh

    async def _candidates(self, kid: str | None, alg: str) -> list[VerifyKey]:
        if self._url is not None:
            if not self._loaded:
                # Shielded: a call that gives up does not cancel the fetch others wait on.
                if self._may_fetch():
                    await asyncio.shield(self._refresh())
                if not self._loaded:
                    raise KeysUnavailable
            elif self._clock() - self._fetched_at >= self.spec.cache and self._may_fetch():
                self._refresh()  # in the background: the current keys serve meanwhile
        found = self._match(kid, alg)
        if not found and self._url is not None and self._may_fetch():
            # A kid we do not know may be a key the issuer has just rotated in.
            await asyncio.shield(self._refresh())
            found = self._match(kid, alg)
        return found

    def _match(self, kid: str | None, alg: str) -> list[VerifyKey]:
        return [k for k in self._keys if alg in k.algorithms and (kid is None or k.kid == kid)]

    # -- verifying ------------------------------------------------------------------

    async def verify(self, token: str) -> str:
        """The agent `token` names, remembered until its `exp`; Refused if it proves none."""
        agent = self._verified.get(token)
        if agent is None:
            agent, expires = await self.verified(token)
            self._verified.put(token, agent, expires)
        return agent

    async def verified(self, token: str) -> tuple[str, float]:
        """The agent `token` names and when the token expires (wall-clock seconds),
        checked now (nothing remembered); Refused if it proves none."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.exceptions.DecodeError:
            raise Refused("the credential is neither a known agent key nor a JWT") from None
        except jwt.exceptions.PyJWTError:
            raise Refused("the token's header is malformed") from None
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._accepted:
            raise Refused(
                "the token's algorithm is not accepted; sign with one of "
                + ", ".join(self.spec.algorithms)
            )
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise Refused("the token's kid is not a string")
        candidates = await self._candidates(kid, alg)
        if not candidates:
            raise Refused(
                "no key of the issuer's key set matches the token's kid"
                if kid is not None
                else "the token names no kid and no key of the issuer's key set fits it"
            )
        claims: dict[str, Any] | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key.key,
                    algorithms=[alg],
                    audience=self._audience,
                    issuer=self.spec.issuer,
                    leeway=self.spec.leeway,
                    options={"require": ["exp", "iss", "aud"]},
                )
                break
            except jwt.exceptions.InvalidSignatureError:
                continue
            except jwt.exceptions.ExpiredSignatureError:
                raise Refused("the token has expired") from None
            except jwt.exceptions.InvalidAudienceError:
                raise Refused("the token is not meant for this sidecar (aud)") from None
            except jwt.exceptions.InvalidIssuerError:
                raise Refused("the token comes from another issuer (iss)") from None
            except jwt.exceptions.MissingRequiredClaimError as exc:
                raise Refused(f"the token has no '{exc.claim}' claim") from None
            except jwt.exceptions.ImmatureSignatureError:
                raise Refused("the token is not valid yet (nbf/iat)") from None
            except jwt.exceptions.PyJWTError:
                raise Refused("the token is malformed") from None
        if claims is None:
            raise Refused("the token's signature does not verify")
        agent = claims.get(self.spec.claim)
        if not isinstance(agent, str) or not agent:
            raise Refused(f"the token's '{self.spec.claim}' claim does not name an agent")
        # `exp` is required and checked above; a remembered token expires with it.
        return agent, float(claims["exp"])

    def prefetch(self) -> None:
        if self._url is not None and not self._loaded:
            with contextlib.suppress(RuntimeError):  # no running loop: fetched on first use
                self._refresh()

    def retire(self) -> None:
        if self._fetch is not None:
            self._fetch.cancel()
