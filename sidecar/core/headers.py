"""HTTP header facts shared by the proxy and the steps."""

from __future__ import annotations

import datetime
import email.utils
import re
from collections.abc import Iterable
from typing import Final

from multidict import CIMultiDict

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded.
HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


# The idempotent methods (RFC 9110 9.2.2): a call that may be sent again (a retry, a
# replay on a fresh connection), and whose empty body goes without Content-Length: 0.
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


# The Server header of the sidecar's own answers: no runtime or library version
# for a probe to match against known flaws. Relayed answers keep the upstream's.
SERVER: Final = "agent-sidecar"


# Connection values that name no other header: nothing more to drop.
_PLAIN_CONNECTION: Final = frozenset({"keep-alive", "close"})
_PLAIN_CONNECTION_RAW: Final = frozenset({b"keep-alive", b"close"})


def drop_with_connection(drop: frozenset[str], connection: str | None) -> frozenset[str]:
    """`drop` plus the headers a Connection header names (hop-by-hop for this message).

    The plain `keep-alive`/`close` that almost every message carries builds nothing.
    """
    if not connection or connection.lower() in _PLAIN_CONNECTION:
        return drop
    return drop | {t.strip().lower() for t in connection.split(",")}


class FieldNames:
    """Lowercase field names as bytes, for heads relayed as they came.

    `has` tells most fields apart by the length of their name alone, from a table:
    no lowercase copy, no hash of it. A name of a length in the set is looked up as
    sent, and lowercased only when spelled some other way.
    """

    __slots__ = ("_sizes", "_spelled", "names")

    def __init__(self, names: Iterable[bytes]) -> None:
        self.names = frozenset(names)
        sizes = bytearray(256)  # a name of 255 bytes or more counts as 255
        for name in self.names:
            sizes[min(len(name), 255)] = 1
        self._sizes = bytes(sizes)
        # The names as nearly every client and server writes them (Host, Keep-Alive,
        # X-Agent-Id) or all lowercase: found as sent, with no lowercase copy.
        self._spelled = self.names | {
            b"-".join(part.capitalize() for part in name.split(b"-")) for name in self.names
        }

    def has(self, name: bytes) -> bool:
        if self._sizes[min(len(name), 255)] != 1:
            return False
        return name in self._spelled or name.lower() in self.names

    def __or__(self, more: Iterable[bytes]) -> FieldNames:
        return FieldNames(self.names | frozenset(more))


def drop_with_connection_raw(drop: FieldNames, connection: bytes | None) -> FieldNames:
    """`drop_with_connection` for a head kept as bytes."""
    # Compared as sent first: no lowercase copy for the spellings nearly all send.
    if not connection or connection == b"keep-alive" or connection == b"close":
        return drop
    if connection.lower() in _PLAIN_CONNECTION_RAW:
        return drop
    return drop | {t.strip().lower() for t in connection.split(b",")}


def check_field(name: str, value: str) -> None:
    """ValueError for a CR, LF or NUL in a field about to be written as is: it would
    let the field split the message (request or response splitting)."""
    if unsafe_field(name) or unsafe_field(value):
        # The field's name only: its value may be a credential.
        raise ValueError(f"CR, LF or NUL in the header field {name[:64]!r}")


def unsafe_field(text: str) -> bool:
    """A CR, LF or NUL in a field's name, value or line: it would split the message."""
    return "\r" in text or "\n" in text or "\0" in text


def retry_after_seconds(value: str, wall_now: float) -> float | None:
    """Retry-After as delta-seconds or an HTTP date (RFC 9110 10.2.3), never negative;
    None when unreadable."""
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - wall_now)


# A Go-style duration, as OpenAI's x-ratelimit-reset-* headers send it: 6m0s, 1.5s, 20ms.
_DURATION_PART: Final = re.compile(r"(\d+(?:\.\d+)?)(h|ms|m|s)")
_DURATION_UNIT: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
# Anything larger is a Unix time (GitHub, GitLab), not a number of seconds to wait.
_EPOCH_FROM: Final = 1e9


def reset_seconds(value: str, wall_now: float) -> float | None:
    """Seconds until a limit resets, from whichever way the provider writes it:
    delta seconds, a duration (`6m0s`), Unix seconds, ISO 8601 or an HTTP date.
    None when unreadable; never negative."""
    value = value.strip()
    try:
        number = float(value)
    except ValueError:
        pass
    else:
        if number != number or number in (float("inf"), float("-inf")):
            return None
        return max(0.0, number - wall_now if number >= _EPOCH_FROM else number)
    parts = _DURATION_PART.findall(value)
    if parts and "".join(n + u for n, u in parts) == value:
        return sum(float(n) * _DURATION_UNIT[u] for n, u in parts)
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        return retry_after_seconds(value, wall_now)
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - wall_now)


def decode_fields(raw: Iterable[tuple[bytes, bytes]]) -> CIMultiDict[str]:
    """Header fields as a parser read them (bytes), as the dict steps work with."""
    return CIMultiDict([(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw])
