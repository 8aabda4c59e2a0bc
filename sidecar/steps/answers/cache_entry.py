"""One stored answer and the RFC 9111 arithmetic around it: freshness, age,
variants (Vary), validators, and the header update a 304 brings.

Times are wall-clock seconds (time.time()), not monotonic: an entry kept in
Redis is read by other sidecars, and the Date header it is compared with is
wall-clock too.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from email.utils import parsedate_to_datetime
from typing import Any

from multidict import CIMultiDict

from ...core.call import StoredReply
from ...core.headers import drop_with_connection, unsafe_field

CACHE_HEADER = "X-Sidecar-Cache"
_CACHE_HEADER_RAW = CACHE_HEADER.encode()
# On a miss that will not be stored: why (the docs list the words).
NOT_STORED_HEADER = "X-Sidecar-Cache-Not-Stored"

# Request headers an answer's Vary may name: hashed, never kept as they are.
Headers = Mapping[str, str]

# Never taken from a 304 into the stored answer (RFC 9111 3.2): the stored body
# depends on them (a server may label a bodiless 304 with any Content-Type), or
# they belong to one connection.
_NOT_UPDATED = frozenset(
    {
        "content-length",
        "content-encoding",
        "content-type",
        "content-range",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "proxy-connection",
        "te",
        "trailer",
        "upgrade",
        CACHE_HEADER.lower(),
    }
)

# What a 304 made from a stored answer carries (RFC 9110 15.4.5).
_NOT_MODIFIED_HEADERS = (
    "Cache-Control",
    "Content-Location",
    "Date",
    "ETag",
    "Expires",
    "Last-Modified",
    "Vary",
)


# A stored answer's fields a hit relays as bytes: the ones each answer sets are added
# after them, so none may be among them already.
_SET_PER_ANSWER = frozenset({"age", CACHE_HEADER.lower()})
# The fields whose URL the egress may rewrite (http/redirects.py's REWRITTEN_HEADERS).
_REFERRING = frozenset({"location", "content-location"})


_MISSING: Any = object()


class RequestFields:
    """A request's fields read as a CIMultiDict is (`getall`, `get`, `in`), from the
    fields as the agent sent them (bytes) while no step has decoded them: a cache hit
    decodes only the few fields it reads, not every one the agent sent."""

    __slots__ = ("_headers", "_raw")

    def __init__(
        self, raw: list[tuple[bytes, bytes]] | None, headers: CIMultiDict[str] | None
    ) -> None:
        self._raw = raw
        self._headers = headers

    def getall(self, name: str, default: Any = _MISSING) -> Any:
        found = self._find(name)
        if found:
            return found
        if default is _MISSING:
            raise KeyError(name)
        return default

    def get(self, name: str, default: str | None = None) -> str | None:
        found = self._find(name)
        return found[0] if found else default

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self._find(name))

    def _find(self, name: str) -> list[str]:
        raw = self._raw
        if raw is None:
            assert self._headers is not None
            values: list[str] = self._headers.getall(name, [])
            return values
        key = _raw_name(name)
        size = len(key)
        # By length first: most names differ in it, and need no lowercase copy.
        return [v.decode("latin-1") for f, v in raw if len(f) == size and f.lower() == key]


# The request's fields as the cache reads them (CIMultiDict's getall, get and `in`).
Request = CIMultiDict[str] | RequestFields

# Lowercase names as bytes, made once each: the cache reads the same few on every call.
_RAW_NAMES: dict[str, bytes] = {}


def _raw_name(name: str) -> bytes:
    key = _RAW_NAMES.get(name)
    if key is None:
        try:
            key = name.lower().encode("latin-1")
        except UnicodeEncodeError:
            return b""  # no field the agent sent (latin-1, as it was decoded) has it
        if len(_RAW_NAMES) < 1024:
            _RAW_NAMES[name] = key
    return key


def directives(values: Iterable[str]) -> dict[str, str]:
    """Cache-Control directives, lower-cased, with their values ('' for none)."""
    out: dict[str, str] = {}
    for value in values:
        for part in value.split(","):
            name, _, arg = part.strip().partition("=")
            if name:
                out[name.strip().lower()] = arg.strip().strip('"')
    return out


def _seconds(value: str | None) -> float | None:
    if value is None:
        return None
    return float(value) if value.isdigit() else 0.0


def http_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def vary_names(headers: CIMultiDict[str] | Any) -> tuple[str, ...] | None:
    """The request headers an answer varies on, sorted; None for `Vary: *`."""
    names = {v.strip().lower() for v in ",".join(headers.getall("Vary", ())).split(",")}
    names.discard("")
    if "*" in names:
        return None
    return tuple(sorted(names))


def vary_digest(names: tuple[str, ...], request: CIMultiDict[str] | Any) -> str:
    """The secondary key (RFC 9111 4.1): a digest of the named request headers' values.

    Values are joined and stripped of spaces around commas, so `a,b` and `a, b`
    match. A digest, not the values: a Vary on Cookie must not put a cookie in
    the store.
    """
    if not names:
        return ""
    parts = [
        [name, ",".join(p.strip() for p in ",".join(request.getall(name, ())).split(","))]
        for name in names
    ]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:32]


class Freshness:
    """What an answer's headers and the policy say about keeping it."""

    __slots__ = ("grace", "lifetime", "stale_if_error")

    def __init__(self, lifetime: float, stale_if_error: float, grace: float) -> None:
        self.lifetime = lifetime
        self.stale_if_error = stale_if_error
        self.grace = grace


def freshness(
    headers: CIMultiDict[str] | Any,
    *,
    ttl: float,
    shared: bool,
    stale_if_error: float | None,
    response_time: float,
) -> Freshness | None:
    """How long the answer stays fresh and how long past that it is kept; None: not kept."""
    cc = directives(headers.getall("Cache-Control", ()))
    if "no-store" in cc or (shared and "private" in cc):
        return None
    validator = "ETag" in headers or "Last-Modified" in headers
    lifetime: float | None = None
    if shared:
        lifetime = _seconds(cc.get("s-maxage"))
    if lifetime is None:
        lifetime = _seconds(cc.get("max-age"))
    if lifetime is None and "Expires" in headers:
        # An Expires that does not parse means already expired (RFC 9111 5.3).
        expires = http_date(headers.get("Expires"))
        date = http_date(headers.get("Date"))
        lifetime = 0.0 if expires is None else max(0.0, expires - (date or response_time))
    lifetime = ttl if lifetime is None else min(ttl, lifetime)
    if "no-cache" in cc:
        # Kept only to be revalidated before each use.
        lifetime = 0.0
    # The answer's own stale-if-error always counts (RFC 5861); the policy's does not
    # override an answer that insists on revalidation.
    window = _seconds(cc.get("stale-if-error")) or 0.0
    insists = "must-revalidate" in cc or "no-cache" in cc or (shared and "proxy-revalidate" in cc)
    if stale_if_error and not insists:
        window = max(window, stale_if_error)
    # A stale answer with a validator is kept one more `ttl` for a cheap 304.
    grace = max(ttl if validator else 0.0, window)
    if lifetime <= 0 and grace <= 0:
        return None
    return Freshness(lifetime, window, grace)


class Entry:
    """A stored answer: status, headers, whole body, and its RFC 9111 clock."""

    __slots__ = (
        "_connection",
        "_fields",
        "_fields_made",
        "_refers",
        "content_length",
        "data",
        "grace",
        "headers",
        "initial_age",
        "lifetime",
        "reason",
        "response_time",
        "stale_if_error",
        "status",
        "vary",
        "vary_key",
    )

    def __init__(
        self,
        *,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        data: bytes,
        content_length: int | None,
        response_time: float,
        initial_age: float,
        lifetime: float,
        stale_if_error: float = 0.0,
        grace: float = 0.0,
        vary: tuple[str, ...] = (),
        vary_key: str = "",
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.data = data
        self.content_length = content_length
        self.response_time = response_time
        # corrected_initial_age of RFC 9111 4.2.3: how old it already was when it came.
        self.initial_age = initial_age
        self.lifetime = lifetime
        self.stale_if_error = stale_if_error
        self.grace = grace
        self.vary = vary
        self.vary_key = vary_key
        # The headers as bytes for StoredReply, made at the first hit (`_encode`).
        self._fields: list[tuple[bytes, bytes]] | None = None
        self._fields_made = False
        self._connection: bytes | None = None
        self._refers = False

    @property
    def size(self) -> int:
        return len(self.data)

    def age(self, now: float) -> float:
        """current_age (RFC 9111 4.2.3)."""
        return self.initial_age + max(0.0, now - self.response_time)

    def fresh(self, now: float) -> bool:
        return self.lifetime > self.age(now)

    @property
    def stale_at(self) -> float:
        return self.response_time + self.lifetime - self.initial_age

    @property
    def keep_until(self) -> float:
        """When the entry is of no more use, even to revalidate or to serve on error."""
        return self.stale_at + self.grace

    def may_serve_stale(self, now: float) -> bool:
        return now < self.stale_at + self.stale_if_error

    @property
    def etag(self) -> str | None:
        return self.headers.get("ETag")

    @property
    def last_modified(self) -> str | None:
        return self.headers.get("Last-Modified")

    def matches(self, request: CIMultiDict[str] | Any) -> bool:
        return vary_digest(self.vary, request) == self.vary_key

    def reply_headers(self, now: float, result: str) -> CIMultiDict[str]:
        headers = CIMultiDict(self.headers)
        headers["Age"] = str(int(self.age(now)))
        headers[CACHE_HEADER] = result
        return headers

    def stored_reply(self, now: float, result: bytes, head: bool) -> StoredReply | None:
        """The answer with Age and X-Sidecar-Cache added, its head as bytes (what
        `reply_headers` holds, in the same order); None when a field cannot be relayed
        as bytes as it is (then `reply_headers` serves, and the listener judges it)."""
        if not self._fields_made:
            self._encode()
        fields = self._fields
        if fields is None:
            return None
        data = self.data
        return StoredReply(
            self.status,
            [*fields, (b"Age", b"%d" % int(self.age(now))), (_CACHE_HEADER_RAW, result)],
            data,
            reason=self.reason,
            # A HEAD answer tells the length of the GET's body, which it does not carry.
            content_length=self.content_length if head else len(data),
            connection=self._connection,
            refers=self._refers,
        )

    def _encode(self) -> None:
        # The headers never change once stored (a 304 makes a new Entry): encoded once.
        self._fields_made = True
        fields: list[tuple[bytes, bytes]] = []
        connection: list[str] = []
        for name, value in self.headers.items():
            lower = name.lower()
            if lower in _SET_PER_ANSWER or unsafe_field(name) or unsafe_field(value):
                return
            if lower == "connection":
                connection.append(value)
            elif lower in _REFERRING:
                self._refers = True
            try:
                fields.append((name.encode("latin-1"), value.encode("latin-1")))
            except UnicodeEncodeError:
                return
        if connection:
            self._connection = ", ".join(connection).encode("latin-1")
        self._fields = fields

    def not_modified(self, request: CIMultiDict[str] | Any, method: str) -> bool:
        """The agent's own conditional request is satisfied (RFC 9110 13.1.2, 13.1.3)."""
        if self.status != 200 or method not in ("GET", "HEAD"):
            return False
        inm = request.getall("If-None-Match", ())
        if inm:
            etag = self.etag
            if etag is None:
                return False
            tags = {t.strip().removeprefix("W/") for t in ",".join(inm).split(",")}
            return "*" in tags or etag.removeprefix("W/") in tags
        since = http_date(request.get("If-Modified-Since"))
        if since is None:
            return False
        modified = http_date(self.last_modified) or http_date(self.headers.get("Date"))
        return modified is not None and modified <= since

    def not_modified_headers(self, now: float, result: str) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        for name in _NOT_MODIFIED_HEADERS:
            for value in self.headers.getall(name, ()):
                headers.add(name, value)
        headers["Age"] = str(int(self.age(now)))
        headers[CACHE_HEADER] = result
        return headers

    def updated(self, fresh: CIMultiDict[str] | Any) -> CIMultiDict[str]:
        """The stored headers with a 304's replacing theirs (RFC 9111 3.2, 4.3.4)."""
        headers = CIMultiDict(self.headers)
        # The fields the 304's own Connection names were for the sidecar's connection
        # only (RFC 9110 7.6.1): stored, every later hit would hand them to the agents.
        kept_out = drop_with_connection(_NOT_UPDATED, ", ".join(fresh.getall("Connection", ())))
        # Each name as the upstream first wrote it: agents see what the miss showed them.
        names: dict[str, str] = {}
        for name in fresh:
            names.setdefault(name.lower(), name)
        for lower, name in names.items():
            if lower in kept_out:
                continue
            headers.popall(name, None)
            for value in fresh.getall(name):
                headers.add(name, value)
        return headers

    # -- kept in Redis: one JSON line of metadata, then the body as it is.

    def dump(self) -> bytes:
        meta = {
            "status": self.status,
            "reason": self.reason,
            "headers": list(self.headers.items()),
            "length": self.content_length,
            "response_time": self.response_time,
            "initial_age": self.initial_age,
            "lifetime": self.lifetime,
            "stale_if_error": self.stale_if_error,
            "grace": self.grace,
            "vary": list(self.vary),
            "vary_key": self.vary_key,
        }
        return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + self.data

    @classmethod
    def load(cls, blob: bytes) -> Entry:
        head, _, data = blob.partition(b"\n")
        meta = json.loads(head)
        return cls(
            status=int(meta["status"]),
            reason=meta["reason"],
            headers=CIMultiDict((str(k), str(v)) for k, v in meta["headers"]),
            data=data,
            content_length=meta["length"],
            response_time=float(meta["response_time"]),
            initial_age=float(meta["initial_age"]),
            lifetime=float(meta["lifetime"]),
            stale_if_error=float(meta["stale_if_error"]),
            grace=float(meta["grace"]),
            vary=tuple(meta["vary"]),
            vary_key=str(meta["vary_key"]),
        )


def initial_age(
    headers: CIMultiDict[str] | Any, request_time: float, response_time: float
) -> float:
    """corrected_initial_age (RFC 9111 4.2.3): the upstream's Age, the trip, its Date."""
    age_value = _seconds(headers.get("Age")) or 0.0
    date = http_date(headers.get("Date"))
    apparent_age = 0.0 if date is None else max(0.0, response_time - date)
    corrected_age_value = age_value + max(0.0, response_time - request_time)
    return max(apparent_age, corrected_age_value)
