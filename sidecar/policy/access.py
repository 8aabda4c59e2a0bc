"""Who may call what: verified agent identity (`agents.verify`, `agents.keys`) and allow rules.

The models check every glob, name and hash here, so `sidecar validate` reports
a bad one at its FILE:LINE:COL; the steps (steps/access/identity.py, steps/access/allow.py)
compile the same globs with the functions below, once per load.
"""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Annotated, Any, Literal, get_args
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer, ValidationInfo
from pydantic import WithJsonSchema as Schema

from .base import Duration, HeaderName, Model, closest
from .secrets import Secret, resolver_from_context

# Only public-key algorithms: a JWKS is public, so an HMAC "key" from it would let
# anyone who can read it sign tokens (the HS/RS confusion); `none` is never accepted.
JwtAlgorithm = Literal[
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"
]
JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = get_args(JwtAlgorithm)

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

# Headers that make many frameworks (Rails, Laravel, Express's method-override, Google
# APIs) run another method than the request line's: dropped unless `method_override`.
METHOD_OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")

_AGENT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@:-]*$")
_AGENT_GLOB = re.compile(r"^[A-Za-z0-9_.@:*-]+$")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")

# Headers that belong to the connection, or that the sidecar itself rewrites: an
# agent credential there would be dropped before the identity step could read it.
_NOT_A_CREDENTIAL_HEADER = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "expect",
        "content-length",
        "content-type",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "via",
        "forwarded",
    }
)


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


# -- globs ------------------------------------------------------------------------------


def match_form(path: str) -> str:
    """A path as rules compare it: percent-decoded once, except an encoded '/' (%2F),
    which stays inside its segment, so `*` cannot be walked across it."""
    if "%" not in path:
        return path
    return unquote(path.replace("%2F", "%252F").replace("%2f", "%252F"))


def path_regex(pattern: str) -> str:
    """A path glob as a regex: `*` is any text inside one segment (a segment that is
    just `*` is not empty), `**` any number of whole segments; nothing else is special.
    ValueError, saying what is wrong, for a glob that cannot be meant."""
    if not pattern.startswith("/"):
        raise ValueError(f"path glob {pattern!r} must start with '/' (the path after the prefix)")
    if any(c in pattern for c in "?#"):
        raise ValueError(f"path glob {pattern!r} must not hold '?' or '#' (use `query:`)")
    if any(c.isspace() for c in pattern):
        raise ValueError(f"path glob {pattern!r} must not hold spaces (write %20)")
    segments = pattern[1:].split("/")
    out = []
    for i, segment in enumerate(segments):
        if segment == "**":
            # At the end: the rest, at any depth, nothing included (`/a/**` matches `/a`).
            out.append("(?:/.*)?" if i == len(segments) - 1 else "(?:/[^/]*)*")
            continue
        if "**" in segment:
            raise ValueError(f"path glob {pattern!r}: '**' must be a whole segment, like /a/**/b")
        literal = match_form(segment)
        if literal in (".", ".."):
            raise ValueError(f"path glob {pattern!r} must not hold '.' or '..' segments")
        if segment == "*":
            out.append("/[^/]+")
            continue
        out.append("/" + "[^/]*".join(re.escape(part) for part in literal.split("*")))
    return "".join(out)


def value_regex(pattern: str) -> str:
    """A glob on a name, a query value or a header value: `*` is any text."""
    return ".*".join(re.escape(part) for part in pattern.split("*"))


def _path_glob(value: str) -> str:
    path_regex(value)
    return value


def _agent_glob(value: str) -> str:
    if not _AGENT_GLOB.match(value):
        raise ValueError(
            f"agent {value!r}: names hold letters, digits, _ . @ : - (and * as a wildcard)"
        )
    return value


def _method(value: str) -> str:
    upper = value.upper()
    if upper not in METHODS:
        close = closest(upper, list(METHODS))
        hint = f" (did you mean '{close}'?)" if close else f"; one of: {', '.join(METHODS)}"
        raise ValueError(f"unknown method {value!r}{hint}")
    return upper


def _value_glob(value: Any) -> Any:
    # YAML reads `page: 1` as a number; a query or header value is text.
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a string glob")
    return str(value)


PathGlob = Annotated[str, AfterValidator(_path_glob)]
AgentGlob = Annotated[str, AfterValidator(_agent_glob)]
Method = Annotated[str, AfterValidator(_method), Schema({"enum": list(METHODS)})]
ValueGlob = Annotated[str, BeforeValidator(_value_glob), Schema({"type": "string"})]


class AllowRule(Model):
    """One rule: a call is allowed when every condition given holds (an absent one holds
    always); the call needs one rule of the set that allows it."""

    agents: Annotated[list[AgentGlob], BeforeValidator(_one_or_many)] | None = Field(
        default=None, min_length=1, description="Agent names or globs (research-*); any if absent"
    )
    methods: Annotated[list[Method], BeforeValidator(_one_or_many)] | None = Field(
        default=None, min_length=1, description="HTTP methods; any if absent"
    )
    paths: Annotated[list[PathGlob], BeforeValidator(_one_or_many)] | None = Field(
        default=None,
        min_length=1,
        description="Globs on the path after the prefix: * in a segment, ** any depth",
    )
    query: dict[str, ValueGlob] = Field(
        default_factory=dict, description="Query parameter -> glob every value must match"
    )
    headers: dict[HeaderName, ValueGlob] = Field(
        default_factory=dict, description="Request header -> glob every value must match"
    )
    operations: Annotated[list[ValueGlob], BeforeValidator(_one_or_many)] | None = Field(
        default=None,
        min_length=1,
        description="operationIds (or globs) of the service's OpenAPI document; any if absent",
    )


# -- identity -------------------------------------------------------------------------


def _agent_name(value: str) -> str:
    if not _AGENT_NAME.match(value):
        raise ValueError(f"agent name {value!r} may hold only letters, digits, _ . @ : -")
    return value


def _key_hash(value: str) -> str:
    if not _KEY_HASH.match(value):
        raise ValueError(
            "an agent key is stored as sha256:<64 lowercase hex digits> "
            '(printf %s "$KEY" | sha256sum), never as the key itself'
        )
    return value


def _distinct_keys(keys: dict[str, str]) -> dict[str, str]:
    seen: dict[str, str] = {}
    for name, digest in keys.items():
        if digest in seen:
            raise ValueError(f"agents '{seen[digest]}' and '{name}' have the same key")
        seen[digest] = name
    return keys


def _shown_hash(digest: str) -> str:
    # The hash of a weak key could be brute-forced offline: /config shows enough to
    # tell keys apart, not enough to test guesses against.
    return digest[:19] + "..."


AgentName = Annotated[str, AfterValidator(_agent_name)]
KeyHash = Annotated[str, AfterValidator(_key_hash), PlainSerializer(_shown_hash, return_type=str)]
AgentKeys = Annotated[dict[AgentName, KeyHash], AfterValidator(_distinct_keys)]


def _credential_header(value: str) -> str:
    if value.lower() in _NOT_A_CREDENTIAL_HEADER:
        raise ValueError(f"{value} cannot carry an agent's credential; use e.g. X-Agent-Token")
    return value


CredentialHeader = Annotated[HeaderName, AfterValidator(_credential_header)]


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def jwks_document(text: str) -> list[dict[str, Any]]:
    """The keys of a JWK Set document; ValueError naming what is wrong."""
    try:
        data = json.loads(text)
    except ValueError:
        raise ValueError("the JWKS is not JSON") from None
    keys = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, dict) for k in keys):
        raise ValueError('a JWKS is a JSON object {"keys": [...]}')
    return keys


def _usable(keys: list[dict[str, Any]]) -> None:
    # An issuer's set fetched later may be empty for a moment; a file named in the
    # policy that holds no public key is a mistake worth reporting now.
    if not any(k.get("kty") in ("RSA", "EC", "OKP") for k in keys):
        raise ValueError("the JWKS holds no public signing key (kty RSA, EC or OKP)")


def _jwks_source(value: Any, info: ValidationInfo) -> str | Secret:
    if isinstance(value, Secret):
        return value
    if not isinstance(value, str):
        raise ValueError("jwks is an https:// URL or a ${file:/path} holding a JWK Set")
    if value.startswith(("http://", "https://")):
        parts = urlsplit(value)
        if not parts.hostname:
            raise ValueError("jwks URL has no host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("jwks URL must not hold user:password")
        # Whoever can change the key set in transit can sign tokens for any agent.
        if parts.scheme == "http" and not _loopback(parts.hostname):
            raise ValueError("jwks must be fetched over https:// (http:// only on loopback)")
        return value
    if "${" not in value:
        raise ValueError("jwks is an https:// URL or a ${file:/path} holding a JWK Set")
    resolver = resolver_from_context(info.context)
    secret = resolver.resolve(value)
    if not resolver.check_only:
        _usable(jwks_document(secret.reveal()))
    return secret


JwksSource = Annotated[
    str | Secret,
    BeforeValidator(_jwks_source),
    PlainSerializer(str, return_type=str),
    Schema(
        {
            "type": "string",
            "description": "https:// URL of a JWK Set, or ${file:/path} holding one",
        }
    ),
]


class JwtVerify(Model):
    type: Literal["jwt"]
    jwks: JwksSource = Field(description="https:// URL of the JWK Set, or ${file:/path}")
    issuer: str = Field(min_length=1, description="The `iss` every token must carry")
    audience: Annotated[list[str], BeforeValidator(_one_or_many)] = Field(
        min_length=1, description="`aud` values accepted (a token needs one of them)"
    )
    claim: str = Field(default="sub", min_length=1, description="Claim naming the agent")
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=lambda: list[JwtAlgorithm](JWT_ALGORITHMS),
        min_length=1,
        description="Signature algorithms accepted (public-key ones only)",
    )
    leeway: Duration = Field(default=30.0, ge=0, le=300, description="Clock skew tolerated")
    cache: Duration = Field(
        default=600.0, gt=0, description="A fetched key set is fetched again after this long"
    )
    min_refresh: Duration = Field(
        default=5.0,
        ge=0,
        description="Shortest time between two fetches (a token with an unknown kid fetches)",
    )
