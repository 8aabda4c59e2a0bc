"""Redirects that point into a service's upstream, pointed back at the sidecar.

An upstream's `Location` (or `Content-Location`) names the upstream's own
URLs: followed as is, a relative one lands on the sidecar's root (no route)
and an absolute one takes the agent's client straight to the upstream,
without the credential or the limits. `RedirectRewriter` maps every such URL
under the upstream's base path onto the service's prefix on the sidecar, as
nginx's `proxy_redirect default` does. URLs of other hosts, other schemes, or
outside the base path are left as they are.

Built once per route at compile time; `rewrite` parses only the header value.
Knows nothing of aiohttp, so any data plane can call it.
"""

from __future__ import annotations

import re
from collections.abc import MutableMapping
from typing import Final
from urllib.parse import SplitResult, urlsplit

# http/pool.py notes when an answer has one of these (UpstreamReply.refers).
REWRITTEN_HEADERS: Final = ("Location", "Content-Location")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443}
# A Host header that can stand as a URL's authority (host, [v6], :port); anything else
# would make the rewritten URL point somewhere the agent did not ask for.
_AUTHORITY: Final = re.compile(r"^[A-Za-z0-9._~\-]+(:[0-9]*)?$|^\[[0-9A-Fa-f:.]+\](:[0-9]*)?$")


class RedirectRewriter:
    __slots__ = ("_base", "_host", "_port", "_prefix", "_scheme", "_strip")

    def __init__(self, *, upstream: str, prefix: str) -> None:
        parts = urlsplit(upstream)
        self._scheme = parts.scheme.lower()
        self._host = (parts.hostname or "").lower()
        self._port = parts.port or _DEFAULT_PORTS[self._scheme]
        self._base = parts.path.rstrip("/")  # "" or "/api/v1"
        self._prefix = "" if prefix == "/" else prefix  # what replaces the base path
        self._strip = len(self._prefix)  # the agent's path minus this is the call's target

    def rewrite_headers(
        self, headers: MutableMapping[str, str], *, host: str | None, path: str
    ) -> None:
        """Rewrite each header of REWRITTEN_HEADERS present in `headers`, in place."""
        for name in REWRITTEN_HEADERS:
            value = headers.get(name)
            if value is not None:
                headers[name] = self.rewrite(value, host=host, path=path)

    def rewrite(self, value: str, *, host: str | None, path: str) -> str:
        """`value` as the agent must see it; unchanged when it points outside the upstream.

        `host` is the Host the agent sent (None when it sent none: the answer is then
        a path-absolute reference, which the agent's client resolves against the
        sidecar); `path` is the agent's request path (prefix included), against which
        a relative reference is resolved as the upstream meant it.
        """
        try:
            ref = urlsplit(value)
        except ValueError:
            return value
        absolute = bool(ref.scheme or ref.netloc)
        if absolute:
            if not self._same_origin(ref):
                return value
            ref_path = ref.path or "/"
        elif ref.path.startswith("/"):
            ref_path = ref.path
        elif ref.path:
            ref_path = self._upstream_directory(path) + ref.path
        else:
            return value  # only a query or fragment: the agent's client resolves it right
        ref_path = _remove_dot_segments(ref_path)
        base = self._base
        if base and ref_path != base and not ref_path.startswith(base + "/"):
            return value
        mapped = (self._prefix + ref_path[len(base) :]) or "/"
        if ref.query:
            mapped += "?" + ref.query
        if ref.fragment:
            mapped += "#" + ref.fragment
        if absolute and host is not None and _AUTHORITY.match(host):
            return f"http://{host}{mapped}"
        return mapped

    def _same_origin(self, ref: SplitResult) -> bool:
        scheme = (ref.scheme or self._scheme).lower()
        if scheme != self._scheme or ref.username is not None or ref.password is not None:
            return False
        try:
            port = ref.port or _DEFAULT_PORTS.get(scheme)
        except ValueError:
            return False
        return port == self._port and (ref.hostname or "") == self._host

    def _upstream_directory(self, path: str) -> str:
        """The upstream URL's path the call went to, up to its last '/'."""
        target = path.partition("?")[0][self._strip :]
        if not target.startswith("/"):
            target = "/" + target
        full = self._base + target
        return full[: full.rfind("/") + 1]


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 5.2.4 for a path starting with '/': what '..' makes of it."""
    if "." not in path:
        return path
    segments = path.split("/")
    out: list[str] = []
    for segment in segments:
        if segment == "..":
            if len(out) > 1:
                out.pop()
        elif segment != ".":
            out.append(segment)
    if segments[-1] in (".", ".."):
        out.append("")  # "/a/b/.." is the directory "/a/"
    return "/".join(out) or "/"
