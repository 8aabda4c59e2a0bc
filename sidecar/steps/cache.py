"""`cache:`: a service's answers kept in memory and served again.

The key is the method, the target, Accept-Encoding and the policy's
`key_headers`, the agent unless `shared: true`, and for POST a digest of the
body (its canonical JSON when it parses as JSON, so key order and spacing do
not matter). It never holds the injected credential: the step runs before
`auth`, and the route has already dropped the agent's copy of that header.
A call carrying the agent's own Authorization or Cookie (a service without
`auth` passes them on) is not cached, unless `key_headers` names the header.

A hit is answered here, before the limiters, retry and auth: it spends no
token and never reaches the upstream. A miss goes on; its answer is relayed
as it streams, each chunk kept on the way (up to `max_body`), and stored only
once the body ended whole. What is not stored: a non-2xx answer (206 too),
one that sets a cookie, `Cache-Control: no-store`, `no-cache` (served again
only after revalidation, which this cache does not do), `private` when
shared, `max-age=0`, `Vary: *` or a Vary naming a header outside the key.

The entries are state (state.py): a reload that keeps the service's upstream
and `cache:` block keeps them; one that changes either starts empty.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from ..call import Call, Handler, Reply, ReplyView, StaticReply, make_replayable
from ..policy.cache import Cache
from ..policy.loader import ServicePolicy
from ..state import StateBuild
from .operation import annotate

CACHE_HEADER = "X-Sidecar-Cache"

Clock = Callable[[], float]
# (service, result: hit | miss | bypass), one per call of a cached method.
Report = Callable[[str, str], None]

# Accept-Encoding is always part of the key: a gzip answer must not reach an agent
# that did not ask for one.
_ALWAYS_KEYED = ("accept-encoding",)


# Request headers whose answer belongs to whoever sent them (RFC 9111 3.5).
_PERSONAL = ("authorization", "proxy-authorization", "cookie")


class Entry:
    __slots__ = ("content_length", "data", "expires", "headers", "reason", "status", "stored")

    def __init__(
        self,
        *,
        status: int,
        reason: str | None,
        headers: CIMultiDict[str],
        data: bytes,
        content_length: int | None,
        stored: float,
        expires: float,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.data = data
        self.content_length = content_length
        self.stored = stored
        self.expires = expires

    def reply(self, now: float, head: bool) -> StaticReply:
        headers = CIMultiDict(self.headers)
        age = int(now - self.stored)
        # An upstream's own Age (it came through another cache) adds to ours.
        upstream = headers.get("Age", "")
        if upstream.isdigit():
            age += int(upstream)
        headers["Age"] = str(age)
        headers[CACHE_HEADER] = "hit"
        reply = StaticReply(self.status, headers, self.data, reason=self.reason)
        if head:
            # A HEAD answer tells the length of the GET's body, which it does not carry.
            reply.content_length = self.content_length
        return reply


class CacheStore:
    """The entries of one service, least recently used first, within both bounds."""

    def __init__(self, *, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[bytes, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: bytes, now: float) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires <= now:
            del self._entries[key]
            self.bytes -= len(entry.data)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, key: bytes, entry: Entry) -> None:
        size = len(entry.data)
        if size > self.max_bytes:
            return
        entries = self._entries
        old = entries.pop(key, None)
        if old is not None:
            self.bytes -= len(old.data)
        entries[key] = entry
        self.bytes += size
        while len(entries) > self.max_entries or self.bytes > self.max_bytes:
            _, dropped = entries.popitem(last=False)
            self.bytes -= len(dropped.data)


class CacheStep:
    def __init__(
        self,
        *,
        service: str,
        config: Cache,
        store: CacheStore,
        report: list[Report],
        clock: Clock = time.monotonic,
    ) -> None:
        self.service = service
        self.ttl = config.ttl
        self.max_body = config.max_body
        self.methods = frozenset(config.methods)
        self.shared = config.shared
        keyed = {h.lower() for h in config.key_headers}
        keyed.update(_ALWAYS_KEYED)
        self.key_headers = tuple(sorted(keyed))
        self.store = store
        self._report = report
        self._clock = clock

    def _count(self, call: Call, result: str) -> None:
        annotate(call, {"sidecar.cache": result})
        for hook in self._report:
            hook(self.service, result)

    async def __call__(self, call: Call, next: Handler) -> Reply:
        method = call.method
        if method not in self.methods or call.upgrade:
            return await next(call)
        key = await self._key(call)
        if key is None:
            self._count(call, "bypass")
            return await next(call)
        now = self._clock()
        entry = self.store.get(key, now)
        if entry is not None:
            self._count(call, "hit")
            return entry.reply(now, method == "HEAD")
        self._count(call, "miss")
        reply = await next(call)
        ttl = self._storable(reply)
        return _Missed(reply, self if ttl else None, key, ttl, method == "HEAD")

    async def _key(self, call: Call) -> bytes | None:
        """The call's key, or None when it must not be looked up (nor stored)."""
        directives = _directives(call.headers.getall("Cache-Control", ()))
        # The agent asked for a fresh answer: it goes upstream and is not stored.
        if "no-store" in directives or "no-cache" in directives:
            return None
        # The agent's own credential (a service without `auth` passes it on) makes the
        # answer that credential's: not kept, unless the policy keys on that header.
        for name in _PERSONAL:
            if name in call.headers and name not in self.key_headers:
                return None
        digest = hashlib.sha256()
        parts: list[str] = [call.method, call.target]
        parts.append("" if self.shared else "agent:" + (call.agent or ""))
        for name in self.key_headers:
            parts.append(name + ":" + ",".join(call.headers.getall(name, ())))
        digest.update(json.dumps(parts).encode())
        if call.method == "POST":
            # A body too large to hold (or of unknown length) cannot be keyed.
            if not await make_replayable(call, self.max_body):
                return None
            body = call.body if isinstance(call.body, bytes) else b""
            digest.update(b"\0" + _canonical(body))
        return digest.digest()

    def _storable(self, reply: Reply) -> float:
        """How long the answer may be kept; 0: not at all."""
        status = reply.status
        if not 200 <= status < 300 or status == 206:
            return 0.0
        headers = reply.headers
        if "Set-Cookie" in headers:
            return 0.0
        length = reply.content_length
        if length is not None and length > self.max_body:
            return 0.0
        directives = _directives(headers.getall("Cache-Control", ()))
        if "no-store" in directives or "no-cache" in directives:
            return 0.0
        if self.shared and "private" in directives:
            return 0.0
        vary = {v.strip().lower() for v in ",".join(headers.getall("Vary", ())).split(",")}
        vary.discard("")
        if vary - set(self.key_headers):
            return 0.0
        ttl = self.ttl
        for name in ("s-maxage", "max-age") if self.shared else ("max-age",):
            value = directives.get(name)
            if value is not None:
                seconds = float(value) if value.isdigit() else 0.0
                ttl = min(ttl, seconds)
                break
        return ttl

    def _store(self, key: bytes, reply: Reply, data: bytes, ttl: float) -> None:
        now = self._clock()
        headers = CIMultiDict(reply.headers)
        headers.popall(CACHE_HEADER, None)
        self.store.put(
            key,
            Entry(
                status=reply.status,
                reason=reply.reason,
                headers=headers,
                data=data,
                content_length=reply.content_length,
                stored=now,
                expires=now + ttl,
            ),
        )


def _directives(values: Any) -> dict[str, str]:
    """Cache-Control directives, lower-cased, with their values ('' for none)."""
    out: dict[str, str] = {}
    for value in values:
        for part in value.split(","):
            name, _, arg = part.strip().partition("=")
            if name:
                out[name.strip().lower()] = arg.strip().strip('"')
    return out


def _canonical(body: bytes) -> bytes:
    """JSON re-serialised with sorted keys and no spaces; any other body as it is."""
    if body[:1] not in (b"{", b"[", b" ", b"\n", b"\r", b"\t"):
        return body
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return body
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


class _Missed(ReplyView):
    """The upstream's answer marked as a miss; its body kept on the way when storable."""

    __slots__ = ()

    def __init__(
        self, reply: Reply, step: CacheStep | None, key: bytes, ttl: float, head: bool
    ) -> None:
        headers = CIMultiDict(reply.headers)
        headers[CACHE_HEADER] = "miss"
        super().__init__(reply, headers=CIMultiDictProxy(headers))
        inner = reply.body
        if step is None:
            self.body = inner
        elif inner is None or head:
            # Nothing to stream (a HEAD's body is never relayed, a 204 has none): stored at once.
            step._store(key, reply, b"", ttl)
            self.body = None
        else:
            self.body = _kept(inner, step, key, reply, ttl)


async def _kept(
    body: AsyncIterable[bytes], step: CacheStep, key: bytes, reply: Reply, ttl: float
) -> AsyncIterator[bytes]:
    # Each chunk goes to the agent as it came; the copy is dropped once too large.
    # Only a body that ended on its own is stored: one cut short (the upstream
    # failed, the agent left) leaves the generator by an exception.
    chunks: list[bytes] | None = []
    size = 0
    limit = step.max_body
    async for data in body:
        if chunks is not None:
            size += len(data)
            if size > limit:
                chunks = None
            else:
                chunks.append(data)
        yield data
    # A body shorter than its Content-Length was cut, even if the stream ended quietly.
    length = reply.content_length
    if chunks is not None and (length is None or length == size):
        step._store(key, reply, b"".join(chunks), ttl)


def build(
    service: ServicePolicy, *, state: StateBuild, clock: Clock = time.monotonic
) -> CacheStep | None:
    config = service.spec.cache
    if config is None or service.spec.mode == "mock":
        return None
    # Keyed by the upstream too: entries of another upstream are not its answers.
    store = state.get(
        service.name,
        "cache",
        (service.spec.upstream, config),
        lambda: CacheStore(max_entries=config.max_entries, max_bytes=config.max_bytes),
    )
    return CacheStep(
        service=service.name,
        config=config,
        store=store,
        report=state.hooks.cache_lookup,
        clock=clock,
    )
