"""Where a delivery may connect, judged on the address it really connects to.

The policy's check (policy/addresses.py) sees the URL; this one sees what the
name resolves to when the delivery connects, so a name that passed at load and
resolves to 127.0.0.1 or 169.254.169.254 later (DNS rebinding) is refused then.
Every address the name resolves to must pass, so no fallback between addresses
can reach a refused one. `check_literal` judges an IP literal before the request
(an address in an unusual form, which a resolver might still take, included).
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable
from urllib.parse import urlsplit

from ..http.pool import Resolver
from ..policy.addresses import Listener, is_own_listener, literal, refusal

Listeners = Callable[[], tuple[Listener, ...]]


class AddressRefused(OSError):
    """The delivery's address is not one it may reach; the text says why."""


def why_refused(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
    port: int,
    *,
    public_only: bool,
    listeners: tuple[Listener, ...],
) -> str | None:
    if is_own_listener(ip, port, listeners):
        return f"{ip}:{port} is the sidecar's own listener"
    if public_only:
        why = refusal(ip)
        if why is not None:
            return f"{why}, and the endpoint does not set allow_private"
    return None


def check_literal(url: str, *, public_only: bool, listeners: tuple[Listener, ...]) -> None:
    """AddressRefused when the URL's host is an IP address that may not be reached."""
    why = _literal_refusal(url, public_only, listeners)
    if why is not None:
        raise AddressRefused(why)


@functools.lru_cache(maxsize=4096)
def _literal_refusal(url: str, public_only: bool, listeners: tuple[Listener, ...]) -> str | None:
    # A pure function of its arguments (an IP literal resolves to itself), asked once
    # per attempt: a URL parse and an address parse each time cost more than the rest
    # of the check. Names are judged by the resolver at each connect, never cached here.
    parts = urlsplit(url)
    ip, odd = literal(parts.hostname or "")
    if odd:
        return f"{parts.hostname} is an address in an unusual form"
    if ip is None:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None  # no URL a delivery can be made to: the delivery says so
    return why_refused(ip, port, public_only=public_only, listeners=listeners)


class GuardedResolver:
    """Resolves as the pool would (answers cached a few seconds), then refuses the name
    if any address may not be reached: what a delivery's pool connects through.

    Judged at every connect, cached answer or not: the listeners can change on a
    reload. The refusal is an OSError, which the pool reports as a ConnectError
    caused by it (delivery.py tells it apart by that cause).
    """

    def __init__(self, *, public_only: bool, listeners: Listeners, ttl: float = 10.0) -> None:
        self._inner = Resolver(ttl=ttl)
        self._public_only = public_only
        self._listeners = listeners

    async def resolve(self, host: str, port: int) -> list[tuple[str, int]]:
        found = await self._inner.resolve(host, port)
        listeners = self._listeners()
        for address, at in found:
            try:
                ip = ipaddress.ip_address(address.partition("%")[0])
            except ValueError:
                raise AddressRefused(f"{host} resolved to something that is no address") from None
            why = why_refused(ip, at, public_only=self._public_only, listeners=listeners)
            if why is not None:
                raise AddressRefused(f"{host} resolves to {why}")
        return found
