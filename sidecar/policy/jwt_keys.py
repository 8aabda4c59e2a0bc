"""JWT signing keys and claims as the policy checks them (`auth: {type: jwt}`).

Kept with the policy, not the step: the loader refuses an unusable key at load
(a bad key is a policy error), and the step signs with what this returns.
Imported only when a policy mints JWTs: pyjwt and cryptography cost megabytes.
"""

from __future__ import annotations

from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.exceptions import InvalidKeyError

# The sidecar owns the time claims and the token id; static claims may not set them.
RESERVED_CLAIMS = frozenset({"iat", "exp", "nbf", "jti"})

_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1"}


def signing_key(algorithm: str, key: str) -> Any:
    """The key as pyjwt signs with it; ValueError (never quoting the key) if unusable."""
    algo = jwt.get_algorithm_by_name(algorithm)
    family = algorithm[:2]
    wanted = {"RS": "an RSA private key in PEM", "ES": "an EC private key in PEM"}.get(
        family, "a shared secret"
    )
    try:
        prepared = algo.prepare_key(key)
    except InvalidKeyError as exc:
        if "curve" in str(exc):  # pyjwt names the curves, never the key
            raise ValueError(f"{algorithm}: {exc}") from None
        raise ValueError(f"key is not {wanted}, as {algorithm} needs") from None
    except (ValueError, TypeError):
        raise ValueError(f"key is not {wanted}, as {algorithm} needs") from None
    if family == "RS" and not isinstance(prepared, rsa.RSAPrivateKey):
        raise ValueError(f"key is not {wanted}, as {algorithm} needs (a public key cannot sign)")
    if family == "ES":
        if not isinstance(prepared, ec.EllipticCurvePrivateKey):
            raise ValueError(
                f"key is not {wanted}, as {algorithm} needs (a public key cannot sign)"
            )
        if prepared.curve.name != _CURVES[algorithm]:
            raise ValueError(
                f"{algorithm} needs a key on curve {_CURVES[algorithm]}, not {prepared.curve.name}"
            )
    # RFC 7518 3.2: an HMAC key MUST be at least as long as the hash; weak RSA keys too.
    weak = algo.check_key_length(prepared)
    if weak:
        raise ValueError(weak.split(" See ")[0])
    return prepared
