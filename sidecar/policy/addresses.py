"""Which addresses a webhook delivery may reach: public ones, and never the sidecar itself.

Outbound endpoints are the agent's way out to the world, so by default they
may not point into the pod, the node or the cluster: loopback, link-local
(the cloud metadata service at 169.254.169.254), private and shared ranges,
and every other non-global address. An IPv6 address that carries an IPv4 one
(IPv4-mapped, NAT64 64:ff9b::/96 and 64:ff9b:1::/48, 6to4, Teredo, IPv4-
compatible) is judged by both, as Smokescreen (stripe/smokescreen) unwraps
them. The same test runs twice: on the URL when the policy loads, and on each
address the name resolves to when the delivery connects (webhooks/guard.py),
so a name that resolves to a private address later (DNS rebinding) is refused.

Inbound `deliver_to` targets are local by design; they, and outbound endpoints
with `allow_private: true`, may still never be one of the sidecar's own
listeners: a delivery to the admin port's /reload is not an event.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Listener = tuple[str, int]

# Names that mean this host or the cloud's metadata service, whatever DNS says.
_LOCAL_NAMES = frozenset({"localhost", "metadata", "metadata.google.internal", "metadata.goog"})
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))
_COMPAT = ipaddress.ip_network("::/96")
# What inet_aton would read as an IPv4 address: 2130706433, 0x7f.1, 0177.0.0.1, 127.1.
_NUMERIC = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}\.?$", re.I)


def embedded(ip: IP) -> list[IP]:
    """The address and every IPv4 address it carries."""
    found: list[IP] = [ip]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            found.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            found.append(ip.sixtofour)
        if ip.teredo is not None:
            found.extend(ip.teredo)  # (server, client)
        low = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if any(ip in net for net in _NAT64) or (ip in _COMPAT and int(ip) > 1):
            found.append(low)
    return found


def refusal(ip: IP) -> str | None:
    """Why a delivery may not reach this address by default; None: it is public."""
    for one in embedded(ip):
        if one.is_loopback:
            return f"{ip} is a loopback address"
        if one.is_link_local:
            return f"{ip} is link-local (cloud metadata lives there)"
        if one.is_unspecified:
            return f"{ip} is the unspecified address"
        if one.is_multicast:
            return f"{ip} is a multicast address"
        if one.is_private:
            return f"{ip} is in a private range"
        if not one.is_global:
            return f"{ip} is not a public address"
    return None


def literal(host: str) -> tuple[IP | None, bool]:
    """The host as an IP address (None: a name), and whether it is written oddly
    (a form only inet_aton reads: decimal, hex, octal, fewer than four parts)."""
    host = host.strip("[]")
    try:
        return ipaddress.ip_address(host), False
    except ValueError:
        pass
    if _NUMERIC.match(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip("."))), True
        except OSError:
            return None, True
    return None, False


def _local_name(host: str) -> bool:
    host = host.rstrip(".").lower()
    return host in _LOCAL_NAMES or host.endswith(".localhost")


def check_endpoint_url(url: str, *, allow_private: bool, context: Any) -> None:
    """ValueError when an outbound endpoint's URL may not be used (policy load)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    ip, odd = literal(host)
    if odd:
        raise ValueError(
            f"host {host!r} is an address in an unusual form; write an IPv4 address as "
            "a.b.c.d (or use a name)"
        )
    if not allow_private:
        why = refusal(ip) if ip is not None else None
        if why is None and _local_name(host):
            why = f"{host} names this host or the cloud metadata service"
        if why is not None:
            raise ValueError(
                f"{why}: outbound endpoints reach public addresses only; set "
                "allow_private: true on the endpoint for an in-cluster receiver"
            )
    check_not_own_listener(url, context)


def listeners_from(context: Any) -> tuple[Listener, ...]:
    if isinstance(context, dict):
        found = context.get("listeners")
        if found:
            return tuple(found)
    return ()


def _loopback_host(host: str) -> bool:
    ip, _ = literal(host)
    if ip is not None:
        return any(one.is_loopback or one.is_unspecified for one in embedded(ip))
    return _local_name(host)


def check_not_own_listener(url: str, context: Any) -> None:
    """ValueError when the URL is one of the sidecar's own listeners (known at load)."""
    listeners = listeners_from(context)
    if not listeners:
        return
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return  # reported by the URL's own check
    for bound_host, bound_port in listeners:
        if port == bound_port and (_loopback_host(host) or host == bound_host.lower()):
            raise ValueError(
                f"{parts.hostname}:{port} is the sidecar's own listener; a webhook may not "
                "be delivered to the sidecar itself"
            )


def is_own_listener(ip: IP, port: int, listeners: Iterable[Listener]) -> bool:
    """Connect time: does this resolved address and port reach one of our listeners?"""
    for bound_host, bound_port in listeners:
        if port != bound_port:
            continue
        if any(one.is_loopback or one.is_unspecified for one in embedded(ip)):
            return True
        bound, _ = literal(bound_host)
        if bound is not None and (bound == ip or (bound.is_unspecified and _assigned_here(ip))):
            return True
    return False


def _assigned_here(ip: IP) -> bool:
    """Is the address one of this host's own (what a wildcard-bound listener answers on)?
    Only an address assigned here can be bound: one syscall, no traffic."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True
