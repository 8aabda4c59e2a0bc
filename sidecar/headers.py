"""HTTP header facts shared by the proxy and the steps."""

from __future__ import annotations

import email.utils

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded.
HOP_BY_HOP = frozenset(
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


# The Server header of the sidecar's own answers: no runtime or library version
# for a probe to match against known flaws. Relayed answers keep the upstream's.
SERVER = "agent-sidecar"

# Connection values that name no other header: nothing more to drop.
_PLAIN_CONNECTION = frozenset({"keep-alive", "close"})


def drop_with_connection(drop: frozenset[str], connection: str | None) -> frozenset[str]:
    """`drop` plus the headers a Connection header names (hop-by-hop for this message).

    The plain `keep-alive`/`close` that almost every message carries builds nothing.
    """
    if not connection or connection.lower() in _PLAIN_CONNECTION:
        return drop
    return drop | {t.strip().lower() for t in connection.split(",")}


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
