"""The policy's building blocks: the base model and the value types every part
of the format uses (durations, rates, sizes, secrets, header names).

models.py (the services) and each feature's module (access, webhooks,
openapi, ...) build on these, so none of them imports another to get them.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
)

from .secrets import Secret, resolver_from_context
from .units import (
    DURATION_PATTERN,
    RATE_PATTERN,
    SIZE_PATTERN,
    Rate,
    format_duration,
    parse_duration,
    parse_rate,
    parse_size,
)

# The header most auth kinds write their credential in (`credential_header` of each kind).
AUTHORIZATION = "Authorization"


Duration = Annotated[
    float,
    BeforeValidator(parse_duration),
    PlainSerializer(format_duration, return_type=str),
    WithJsonSchema({"type": "string", "pattern": DURATION_PATTERN, "examples": ["250ms", "5s"]}),
]
RateValue = Annotated[
    Rate,
    BeforeValidator(parse_rate),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "pattern": RATE_PATTERN, "examples": ["10/s", "600/min"]}),
]
Size = Annotated[
    int,
    BeforeValidator(parse_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 0},
                {"type": "string", "pattern": SIZE_PATTERN},
            ],
            "examples": ["10MiB"],
        }
    ),
]


def _resolve_secret(value: Any, info: ValidationInfo) -> Secret:
    if isinstance(value, Secret):
        return value
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expected a string or a ${env:NAME} / ${file:/path} reference")
    return resolver_from_context(info.context).resolve(str(value))


SecretStr = Annotated[
    Secret,
    BeforeValidator(_resolve_secret),
    PlainSerializer(str, return_type=str),
    WithJsonSchema(
        {
            "type": "string",
            "description": "A secret: ${env:NAME}, ${file:/path} or (for tests only) a literal",
        }
    ),
]

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_SERVICE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def closest(key: str, options: list[str]) -> str | None:
    # Only a policy with an error gets here: a valid one loads without difflib.
    import difflib

    close = difflib.get_close_matches(key, options, n=1, cutoff=0.6)
    return close[0] if close else None


def _did_you_mean(key: str, options: list[str]) -> str:
    close = closest(key, options)
    if close is not None:
        return f" (did you mean '{close}'?)"
    return f"; expected one of: {', '.join(sorted(options))}"


class Model(BaseModel):
    """Base: frozen, unknown keys refused.

    extra="forbid" reports each unknown key next to the other fields' errors, so
    one run shows every problem of a file (a check that raised before field
    validation would hide them); the loader adds the did-you-mean.
    """

    # defer_build: a model's validator is built when it first validates, which only the
    # process loading a policy does (`sidecar run` loads in a child: policy/child.py).
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, defer_build=True)


def _header_name(value: str) -> str:
    if not _HEADER_NAME.match(value):
        raise ValueError(f"{value!r} is not a valid HTTP header name")
    return value


HeaderName = Annotated[
    str,
    AfterValidator(_header_name),
    WithJsonSchema({"type": "string", "pattern": _HEADER_NAME.pattern}),
]


def _service_name(value: str) -> str:
    if not _SERVICE_NAME.match(value):
        raise ValueError(f"service name {value!r} may hold only letters, digits, _ . -")
    return value


ServiceName = Annotated[
    str,
    AfterValidator(_service_name),
    WithJsonSchema({"type": "string", "pattern": _SERVICE_NAME.pattern}),
]


def _header_value(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("a header value must not hold a line break")
    return value


HeaderValue = Annotated[str, AfterValidator(_header_value)]


def _redis_url(value: str) -> str:
    if urlsplit(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("backend must be a redis://, rediss:// or unix:// URL")
    return value


def _masked(value: str) -> str:
    # A redis URL may carry a password: /config and /services show it masked.
    parts = urlsplit(value)
    if parts.password is None:
        return value
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{parts.username or ''}:***@{host}").geturl()


RedisUrl = Annotated[
    str,
    AfterValidator(_redis_url),
    PlainSerializer(_masked, return_type=str),
    WithJsonSchema({"type": "string", "examples": ["redis://127.0.0.1:6379/0"]}),
]
