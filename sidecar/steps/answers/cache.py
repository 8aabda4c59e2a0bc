"""`cache:`: a service's answers kept (in memory, or in Redis) and served again.

The key is the method, the target, Accept-Encoding and the policy's
`key_headers`, the agent unless the scope is `service`, and for POST a digest
of the body (its canonical JSON when it parses as JSON, so key order and
spacing do not matter). Under one key live the answer's variants (RFC 9111
4.1): each is matched by the request headers its own Vary names (`Vary: *` is
never stored). The key never holds the injected credential: the step runs
before `auth` (and its request snapshot is taken before the call goes on),
and the route has already dropped the agent's copy of that header. A call
carrying the agent's own Authorization or Cookie (a service without `auth`
passes them on) is not cached, unless `key_headers` names the header.

A fresh hit is answered here, before the limiters, retry and auth: it spends
no token and never reaches the upstream. A stale entry with an ETag or
Last-Modified is revalidated (If-None-Match / If-Modified-Since): the
upstream's 304 refreshes it (RFC 9111 4.3.4) and the agent gets the stored
answer marked `revalidated`. When the upstream fails (5xx, unreachable,
timeout, breaker open or paused), a stale entry is served, marked `stale`,
while the answer's stale-if-error (RFC 5861) or the policy's
`stale_if_error` allows. An agent's own If-None-Match / If-Modified-Since is
answered 304 from an entry whose validator matches.

A miss goes on; its answer is relayed as it streams, each chunk kept on the
way (up to `max_body`), and stored only once the body ended whole. Not
stored: a non-2xx answer (206 too), one that sets a cookie, `no-store`,
`private` when shared, `Vary: *`, and one that is never fresh and has neither
a validator nor a stale-if-error window.

The entries are state (core/state.py): a reload that keeps the service's upstream
and `cache:` block keeps them; one that changes either starts empty.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any, Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from ...core.call import Call, Handler, Reply, ReplyView, StaticReply, make_replayable
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild, fingerprint
from ...policy.cache import Cache
from ...policy.loaded import ServicePolicy
from ..operation import annotate
from .cache_entry import (
    CACHE_HEADER,
    NOT_STORED_HEADER,
    Entry,
    Request,
    RequestFields,
    directives,
    freshness,
    initial_age,
    vary_digest,
    vary_names,
)
from .cache_stream import kept

__all__ = ["CACHE_HEADER", "CacheStep", "CacheStore", "Entry", "build"]

Clock = Callable[[], float]
# (service, result: hit | miss | revalidated | stale | bypass), one per call of a cached method.
Report = Callable[[str, str], None]

# Accept-Encoding is always part of the key: a gzip answer must not reach an agent
# that did not ask for one.
_ALWAYS_KEYED = ("accept-encoding",)

# Request headers whose answer belongs to whoever sent them (RFC 9111 3.5).
_PERSONAL = ("authorization", "proxy-authorization", "cookie")

# What counts as the upstream failing, for stale-if-error (RFC 5861 4: what would
# be a 500, 502, 503 or 504): its own answers, and the sidecar's problems about it.
_ERROR_STATUSES = frozenset({500, 502, 503, 504})
_UPSTREAM_FAILURES = frozenset(
    {
        Reason.upstream_unreachable,
        Reason.upstream_timeout,
        Reason.circuit_open,
        Reason.upstream_paused,
    }
)


class Store(Protocol):
    async def lookup(self, key: bytes, request: Request, now: float) -> Entry | None: ...

    def save(self, key: bytes, entry: Entry, now: float) -> None: ...

    def snapshot(self) -> dict[str, Any]: ...


class CacheStore:
    """The entries of one service in memory, least recently used first, within both bounds.

    Each key holds its variants (one per Vary outcome), most recent last; the
    bounds count variants and their bodies, and the least recently used key
    gives up its oldest variant first.
    """

    def __init__(
        self, *, max_entries: int, max_bytes: int, evicted: Callable[[int], None] | None = None
    ) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.bytes = 0
        self.count = 0
        self._entries: OrderedDict[bytes, list[Entry]] = OrderedDict()
        self._evicted = evicted

    def __len__(self) -> int:
        return self.count

    def get(self, key: bytes, request: Request, now: float) -> Entry | None:
        variants = self._entries.get(key)
        if variants is None:
            return None
        found = None
        for entry in reversed(variants):
            if entry.keep_until <= now:
                self._drop(key, variants, entry)
            elif found is None and entry.matches(request):
                found = entry
        if found is not None:
            self._entries.move_to_end(key)
        return found

    async def lookup(self, key: bytes, request: Request, now: float) -> Entry | None:
        return self.get(key, request, now)

    def put(self, key: bytes, entry: Entry) -> None:
        size = entry.size
        if size > self.max_bytes:
            return
        entries = self._entries
        variants = entries.pop(key, None)
        if variants is None:
            variants = []
        else:
            for old in variants:
                if old.vary == entry.vary and old.vary_key == entry.vary_key:
                    variants.remove(old)
                    self.count -= 1
                    self.bytes -= old.size
                    break
        variants.append(entry)
        entries[key] = variants
        self.count += 1
        self.bytes += size
        evicted = 0
        while self.count > self.max_entries or self.bytes > self.max_bytes:
            oldest_key, oldest = next(iter(entries.items()))
            self._drop(oldest_key, oldest, oldest[0])
            evicted += 1
        if evicted and self._evicted is not None:
            self._evicted(evicted)

    def save(self, key: bytes, entry: Entry, now: float) -> None:
        self.put(key, entry)

    def _drop(self, key: bytes, variants: list[Entry], entry: Entry) -> None:
        variants.remove(entry)
        self.count -= 1
        self.bytes -= entry.size
        if not variants:
            del self._entries[key]

    def snapshot(self) -> dict[str, Any]:
        return {
            "backend": "memory",
            "entries": self.count,
            "bytes": self.bytes,
            "max_entries": self.max_entries,
            "max_bytes": self.max_bytes,
        }


class CacheStep:
    def __init__(
        self,
        *,
        service: str,
        config: Cache,
        store: Store,
        report: list[Report],
        clock: Clock = time.time,
    ) -> None:
        self.service = service
        self.ttl = config.ttl
        self.max_body = config.max_body
        self.methods = frozenset(config.methods)
        self.overriding = frozenset(config.ignore_upstream_cache_control)
        self.shared = config.per_service
        self.stale_if_error = config.stale_if_error
        keyed = {h.lower() for h in config.key_headers}
        keyed.update(_ALWAYS_KEYED)
        self.key_headers = tuple(sorted(keyed))
        # Each keyed field's part of the key, before its values: "name:".
        self._key_prefixes = tuple((name, name + ":") for name in self.key_headers)
        # The agent's own credentials that keep a call out (unless the policy keys on them).
        self._personal = tuple(name for name in _PERSONAL if name not in keyed)
        self.store = store
        # The memory store answers at once: looked up without a coroutine of its own.
        self._memory = store if isinstance(store, CacheStore) else None
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
        # Read from the fields as the agent sent them while no step has decoded them:
        # a hit decodes none but the few it reads.
        raw = call.raw_headers
        fields = RequestFields(raw, None) if raw is not None else RequestFields(None, call.headers)
        digest = self._digest(call, fields)
        if digest is not None and method == "POST":
            # A body too large to hold (or of unknown length) cannot be keyed.
            if await make_replayable(call, self.max_body):
                body = call.body if isinstance(call.body, bytes) else b""
                digest.update(b"\0" + _canonical(body))
            else:
                digest = None
        if digest is None:
            self._count(call, "bypass")
            return await next(call)
        key: bytes = digest.digest()
        now = self._clock()
        memory = self._memory
        if memory is not None:
            entry = memory.get(key, fields, now)
        else:
            entry = await self.store.lookup(key, fields, now)
        if entry is not None and entry.fresh(now):
            self._count(call, "hit")
            return self._answer(entry, fields, method, now, "hit")
        # The agent's request as it came: the steps below add to call.headers (the
        # credential, the validators), and neither may reach a key or an entry.
        request = CIMultiDict(call.headers)
        if entry is None:
            self._count(call, "miss")
            sent = self._clock()
            return self._relay(await next(call), key, request, sent, method, "miss")
        return await self._refresh(call, next, key, request, entry)

    async def _refresh(
        self, call: Call, next: Handler, key: bytes, request: CIMultiDict[str], entry: Entry
    ) -> Reply:
        """A stale entry: revalidated when it has a validator, served if the upstream fails."""
        etag, modified = entry.etag, entry.last_modified
        conditional = etag is not None or modified is not None
        if conditional:
            # Ours replace the agent's own; the agent's are answered from the entry after.
            headers = call.headers
            headers.popall("If-None-Match", None)
            headers.popall("If-Modified-Since", None)
            if etag is not None:
                headers["If-None-Match"] = etag
            if modified is not None:
                headers["If-Modified-Since"] = modified
        sent = self._clock()
        try:
            reply = await next(call)
        except ProblemError as exc:
            if exc.reason in _UPSTREAM_FAILURES and entry.may_serve_stale(self._clock()):
                return self._stale(call, request, entry)
            self._count(call, "miss")
            raise
        if reply.status == 304 and conditional:
            await _discard(reply)
            received = self._clock()
            answer = reply.headers
            refreshed = self._revalidated(entry, answer, sent, received)
            # A 304 that sets a cookie is answered, as a miss with one is, but not stored:
            # its cookie would go to every agent the entry then answers.
            if refreshed.keep_until > received and "Set-Cookie" not in answer:
                self.store.save(key, refreshed, received)
            self._count(call, "revalidated")
            return self._answer(refreshed, request, call.method, received, "revalidated")
        if reply.status in _ERROR_STATUSES and entry.may_serve_stale(self._clock()):
            await _discard(reply)
            return self._stale(call, request, entry)
        self._count(call, "miss")
        return self._relay(reply, key, request, sent, call.method, "miss")

    def _stale(self, call: Call, request: CIMultiDict[str], entry: Entry) -> Reply:
        self._count(call, "stale")
        return self._answer(entry, request, call.method, self._clock(), "stale")

    def _answer(
        self, entry: Entry, request: Request, method: str, now: float, result: str
    ) -> Reply:
        if entry.not_modified(request, method):
            return StaticReply(304, entry.not_modified_headers(now, result), reason=None)
        stored = entry.stored_reply(now, result.encode(), method == "HEAD")
        if stored is not None:
            return stored
        reply = StaticReply(
            entry.status, entry.reply_headers(now, result), entry.data, reason=entry.reason
        )
        if method == "HEAD":
            # A HEAD answer tells the length of the GET's body, which it does not carry.
            reply.content_length = entry.content_length
        return reply

    def _digest(self, call: Call, fields: RequestFields) -> Any:
        """The call's key so far (a sha256 a POST's body goes into next), or None when
        it must not be looked up (nor stored)."""
        cc = directives(fields.getall("Cache-Control", ()))
        # The agent asked for a fresh answer: it goes upstream and is not stored.
        if "no-store" in cc or "no-cache" in cc:
            return None
        # The agent's own credential (a service without `auth` passes it on) makes the
        # answer that credential's: not kept, unless the policy keys on that header.
        for name in self._personal:
            if name in fields:
                return None
        # json.dumps of the parts, as the keys have always been made (an entry kept in
        # Redis is found by sidecars of other versions), one C call per part.
        parts = [
            encode_basestring_ascii(call.method),
            encode_basestring_ascii(call.target),
            '""' if self.shared else encode_basestring_ascii("agent:" + (call.agent or "")),
        ]
        for name, prefix in self._key_prefixes:
            parts.append(encode_basestring_ascii(prefix + ",".join(fields.getall(name, ()))))
        return hashlib.sha256(("[" + ", ".join(parts) + "]").encode())

    def _relay(
        self,
        reply: Reply,
        key: bytes,
        request: CIMultiDict[str],
        sent: float,
        method: str,
        result: str,
    ) -> Reply:
        entry = self._storable(reply, request, sent, self._clock(), method)
        if isinstance(entry, str):
            return _Missed(reply, None, key, None, method == "HEAD", result, entry)
        return _Missed(reply, self, key, entry, method == "HEAD", result)

    def _storable(
        self,
        reply: Reply,
        request: CIMultiDict[str],
        sent: float,
        received: float,
        method: str,
    ) -> Entry | str:
        """The entry the answer becomes once its body is whole, or why it is not kept
        (the words of X-Sidecar-Cache-Not-Stored)."""
        status = reply.status
        if not 200 <= status < 300 or status == 206:
            return "status"
        headers = reply.headers
        if "Set-Cookie" in headers:
            return "set-cookie"
        length = reply.content_length
        if length is not None and length > self.max_body:
            return "too-large"
        names = vary_names(headers)
        if names is None:
            return "vary"
        judged: Any = headers
        if method in self.overriding:
            # The policy's explicit opt-in: the upstream's directives do not decide.
            judged = CIMultiDict(headers)
            judged.popall("Cache-Control", None)
            judged.popall("Expires", None)
        fresh = freshness(
            judged,
            ttl=self.ttl,
            shared=self.shared,
            stale_if_error=self.stale_if_error,
            response_time=received,
        )
        if fresh is None:
            cc = directives(headers.getall("Cache-Control", ()))
            if "no-store" in cc:
                return "no-store"
            if self.shared and "private" in cc:
                return "private"
            return "no-cache" if "no-cache" in cc else "expired"
        stored = CIMultiDict(headers)
        stored.popall(CACHE_HEADER, None)
        # Age is worked out anew for each answer given from the entry.
        stored.popall("Age", None)
        return Entry(
            status=status,
            reason=reply.reason,
            headers=stored,
            data=b"",
            content_length=length,
            response_time=received,
            initial_age=initial_age(headers, sent, received),
            lifetime=fresh.lifetime,
            stale_if_error=fresh.stale_if_error,
            grace=fresh.grace,
            vary=names,
            vary_key=vary_digest(names, request),
        )

    def _revalidated(
        self, entry: Entry, answer: CIMultiDictProxy[str], sent: float, received: float
    ) -> Entry:
        """The entry after a 304: its headers updated, its clock restarted."""
        headers = entry.updated(answer)
        headers.popall("Age", None)
        fresh = freshness(
            headers,
            ttl=self.ttl,
            shared=self.shared,
            stale_if_error=self.stale_if_error,
            response_time=received,
        )
        return Entry(
            status=entry.status,
            reason=entry.reason,
            headers=headers,
            data=entry.data,
            content_length=entry.content_length,
            response_time=received,
            initial_age=initial_age(answer, sent, received),
            # A 304 that now says no-store: this answer is still good, but not kept.
            lifetime=fresh.lifetime if fresh else 0.0,
            stale_if_error=fresh.stale_if_error if fresh else 0.0,
            grace=fresh.grace if fresh else 0.0,
            vary=entry.vary,
            vary_key=entry.vary_key,
        )

    def _save(self, key: bytes, entry: Entry) -> None:
        self.store.save(key, entry, self._clock())


async def _discard(reply: Reply) -> None:
    # A 304 has no body, a 5xx's is not wanted: either way the connection goes back.
    result = reply.release()
    if asyncio.iscoroutine(result):
        await result


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
        self,
        reply: Reply,
        step: CacheStep | None,
        key: bytes,
        entry: Entry | None,
        head: bool,
        result: str,
        not_stored: str | None = None,
    ) -> None:
        headers = CIMultiDict(reply.headers)
        headers[CACHE_HEADER] = result
        if not_stored is not None:
            headers[NOT_STORED_HEADER] = not_stored
        super().__init__(reply, headers=CIMultiDictProxy(headers))
        inner = reply.body
        if step is None or entry is None:
            self.body = inner
        elif inner is None or head:
            # Nothing to stream (a HEAD's body is never relayed, a 204 has none): stored at once.
            step._save(key, entry)
            self.body = None
        else:
            self.body = kept(inner, step.max_body, entry.content_length, _Keep(step, key, entry))


class _Keep:
    """Stores a missed answer once its body came whole."""

    __slots__ = ("entry", "key", "step")

    def __init__(self, step: CacheStep, key: bytes, entry: Entry) -> None:
        self.step = step
        self.key = key
        self.entry = entry

    def __call__(self, data: bytes) -> None:
        self.entry.data = data
        self.step._save(self.key, self.entry)


def build(
    service: ServicePolicy, *, state: StateBuild, clock: Clock = time.time
) -> CacheStep | None:
    config = service.spec.cache
    if config is None or service.spec.mode == "mock":
        return None
    name = service.name
    hooks = state.hooks
    store: Store
    if config.backend is not None:
        from .cache_redis import RedisCacheStore

        # Sidecars with the same service, upstream and cache rules share the entries;
        # the URL (and its password) stays out of the keys.
        shape = fingerprint(
            (
                service.spec.upstream,
                config.model_dump(exclude={"backend", "max_entries", "max_bytes"}),
            )
        )
        url = config.backend

        def failed() -> None:
            for hook in hooks.cache_backend_error:
                hook(name)

        store = state.get(
            name,
            "cache",
            (service.spec.upstream, config),
            lambda: RedisCacheStore(
                url=url, prefix=f"sidecar:cache:{name}:{shape}:", failed=failed
            ),
        )
    else:

        def evicted(count: int) -> None:
            for hook in hooks.cache_evicted:
                hook(name, count)

        # Keyed by the upstream too: entries of another upstream are not its answers.
        store = state.get(
            name,
            "cache",
            (service.spec.upstream, config),
            lambda: CacheStore(
                max_entries=config.max_entries, max_bytes=config.max_bytes, evicted=evicted
            ),
        )
    return CacheStep(
        service=name,
        config=config,
        store=store,
        report=hooks.cache_lookup,
        clock=clock,
    )
