"""AWS Signature Version 4, the header form: canonical request, string to sign, signature.

Our own rather than botocore's: botocore signs an `AWSRequest` it builds
from a URL and a header dict, which costs more than the rest of a proxied
call; here a call costs one SHA-256 of the canonical request and one HMAC,
the day's signing key being derived once per day and credentials. It is
checked against AWS's published SigV4 test suite (tests/data/sigv4/) and,
in the integration tests, by botocore itself (moto, the fake Bedrock).

Two path forms, as AWS has them: S3 signs the path as sent, once encoded,
never normalized (a key may hold `//` or `..`); every other service signs the
normalized path encoded a second time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Characters never percent-encoded (RFC 3986 unreserved), per the SigV4 spec.
_UNRESERVED = "-_.~"
# A path of unreserved characters only, with no empty or dot segment: its own canonical
# form in both kinds (the common case, answered without re-encoding).
_PLAIN_PATH = re.compile(r"(?:/[A-Za-z0-9_~-][A-Za-z0-9._~-]*)*/?")


def canonical_path(path: str, *, s3: bool) -> str:
    """The canonical URI of a path as it is (or will be) sent."""
    if not path:
        return "/"
    if _PLAIN_PATH.fullmatch(path) is not None:
        return path
    if s3:
        # Each segment decoded and encoded again, so the canonical form does not
        # depend on how the agent's client chose to escape; the caller sends it.
        return "/".join(quote(unquote(segment), safe=_UNRESERVED) for segment in path.split("/"))
    return quote(_remove_dot_segments(path), safe="/~")


def _remove_dot_segments(path: str) -> str:
    # RFC 3986 5.2.4; AWS also drops empty segments (`//`).
    out: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if out:
                out.pop()
        elif segment and segment != ".":
            out.append(segment)
    first = "/" if path[0] == "/" else ""
    last = "/" if path[-1] == "/" and out else ""
    return first + "/".join(out) + last


def canonical_query(query: str) -> str:
    """Each name and value decoded then encoded the SigV4 way, sorted by name, then value."""
    if not query:
        return ""
    pairs = []
    for item in query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        pairs.append(
            (quote(unquote(name), safe=_UNRESERVED), quote(unquote(value), safe=_UNRESERVED))
        )
    pairs.sort()
    return "&".join(f"{name}={value}" for name, value in pairs)


def _trim(value: str) -> str:
    return " ".join(value.split())


def signing_key(secret: str, day: str, region: str, service: str) -> bytes:
    key = hmac.new(f"AWS4{secret}".encode(), day.encode(), hashlib.sha256).digest()
    key = hmac.new(key, region.encode(), hashlib.sha256).digest()
    key = hmac.new(key, service.encode(), hashlib.sha256).digest()
    return hmac.new(key, b"aws4_request", hashlib.sha256).digest()


def canonical_request(
    method: str,
    path: str,
    query: str,
    headers: Iterable[tuple[str, str]],
    payload_hash: str,
) -> tuple[str, str]:
    """The canonical request and its signed-headers list.

    `path` and `query` are canonical already (`canonical_path`, `canonical_query`);
    `headers` are the fields to sign, any case, repeated names allowed.
    """
    merged: dict[str, list[str]] = {}
    for name, value in headers:
        merged.setdefault(name.lower(), []).append(_trim(value))
    names = sorted(merged)
    signed = ";".join(names)
    lines = "".join(f"{name}:{','.join(merged[name])}\n" for name in names)
    return f"{method}\n{path}\n{query}\n{lines}\n{signed}\n{payload_hash}", signed


def signature(key: bytes, amz_date: str, scope: str, canonical: str) -> str:
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    to_sign = f"{ALGORITHM}\n{amz_date}\n{scope}\n{digest}"
    return hmac.digest(key, to_sign.encode(), "sha256").hex()


def authorization(access_key: str, scope: str, signed_headers: str, sig: str) -> str:
    return (
        f"{ALGORITHM} Credential={access_key}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={sig}"
    )
