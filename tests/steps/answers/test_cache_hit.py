"""A cache hit answers what the miss answered: the same head, field by field and in
order, the same key (entries kept in Redis are found across versions), whichever
way the step reads the request and relays the stored answer."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict

from sidecar.core.call import Call, Reply, StaticReply
from sidecar.policy.cache import Cache
from sidecar.steps.answers.cache import CacheStep, CacheStore, Entry
from tests.steps.conftest import CacheSidecar, cache_step, get_through

SECRET = "sk-cache-hit-canary-77a0"
BODY = b'{"ok": true}'


def _answer(path: bytes, base: bytes) -> bytes:
    # A head as an upstream may send it: a repeated field, a field its Connection names
    # (never relayed), a latin-1 value, and on /moved a Location the egress rewrites.
    fields = [
        b"Content-Type: application/json",
        b"X-Multi: one",
        b"Connection: keep-alive, X-Hop",
        b"X-Hop: dropped",
        b"Keep-Alive: timeout=5",
        b"X-Latin: caf\xe9",
        b"X-Multi: two",
        b"Cache-Control: max-age=60",
        b'ETag: "v1"',
    ]
    if path.startswith(b"/moved"):
        fields.append(b"Location: " + base + b"/next?a=1")
    fields.append(b"Content-Length: %d" % len(BODY))
    return b"HTTP/1.1 200 OK\r\n" + b"\r\n".join(fields) + b"\r\n\r\n" + BODY


@asynccontextmanager
async def _upstream(
    answer: Callable[[bytes, int, bytes], bytes],
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream writing answer(head, calls so far, its base) byte for byte; the
    request lines it got."""
    seen: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                seen.append(head.split(b"\r\n", 1)[0])
                writer.write(answer(head, len(seen), base.encode()))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    yield base, seen
    server.close()
    await server.wait_closed()


@pytest.fixture
async def raw_upstream() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream writing its head byte for byte; the request lines it got."""
    async with _upstream(lambda head, _, base: _answer(head.split(b" ", 2)[1], base)) as up:
        yield up


def _fields(raw: Any) -> list[tuple[bytes, bytes]]:
    return [(bytes(n), bytes(v)) for n, v in raw]


@pytest.mark.parametrize("path", ["/plain", "/moved"])
async def test_a_hit_relays_the_head_the_miss_relayed_field_by_field(
    path: str,
    raw_upstream: tuple[str, list[bytes]],
    cache_sidecar: CacheSidecar,
    client: aiohttp.ClientSession,
) -> None:
    base, seen = raw_upstream
    sc = await cache_sidecar(base, "{}", SECRET)
    heads = []
    for _ in range(2):
        async with client.get(f"{sc.url}/api{path}", headers={"X-Agent-Id": "a1"}) as r:
            assert await r.read() == BODY
            heads.append(_fields(r.raw_headers))
    miss, hit = heads
    assert len(seen) == 1
    assert (b"X-Sidecar-Cache", b"miss") in miss and (b"X-Sidecar-Cache", b"hit") in hit
    # The hit adds Age right before X-Sidecar-Cache; everything else is the miss's own,
    # in its order: hop-by-hop and Connection-named fields out, Location rewritten.
    at = hit.index((b"X-Sidecar-Cache", b"hit"))
    assert hit[at - 1][0] == b"Age" and hit[at - 1][1].isdigit()
    del hit[at - 1]
    assert [f if f[0] != b"X-Sidecar-Cache" else (f[0], b"?") for f in hit] == [
        f if f[0] != b"X-Sidecar-Cache" else (f[0], b"?") for f in miss
    ]
    names = [n.lower() for n, _ in hit]
    assert b"x-hop" not in names and b"keep-alive" not in names
    assert [v for n, v in hit if n == b"X-Multi"] == [b"one", b"two"]
    assert (b"X-Latin", b"caf\xe9") in hit
    if path == "/moved":
        assert (b"Location", f"{sc.url}/api/next?a=1".encode()) in hit
    # A HEAD is keyed on its own; its hit tells the same length as its miss, with no body.
    lengths = []
    for _ in range(2):
        async with client.head(f"{sc.url}/api{path}", headers={"X-Agent-Id": "a1"}) as r:
            assert await r.read() == b""
            lengths.append((r.headers["X-Sidecar-Cache"], r.headers["Content-Length"]))
    assert lengths == [("miss", str(len(BODY))), ("hit", str(len(BODY)))]
    # The agent's own conditional request is answered 304 from the entry.
    async with client.get(
        f"{sc.url}/api{path}", headers={"X-Agent-Id": "a1", "If-None-Match": '"v1"'}
    ) as r:
        assert r.status == 304
        assert r.headers["X-Sidecar-Cache"] == "hit"
    assert len(seen) == 2


class _Keys:
    """A store that records the keys it is asked for and finds nothing."""

    def __init__(self) -> None:
        self.keys: list[bytes] = []

    async def lookup(self, key: bytes, request: Any, now: float) -> Entry | None:
        self.keys.append(key)
        return None

    def save(self, key: bytes, entry: Entry, now: float) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {}


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("raw", [False, True])
async def test_the_key_is_the_sha256_of_the_json_of_its_parts(shared: bool, raw: bool) -> None:
    """The key as it has always been made: a Redis store shared with sidecars of other
    versions finds the same entries. Read from raw fields or decoded ones alike."""
    store = _Keys()
    step = CacheStep(
        service="api",
        config=Cache.model_validate(
            {"key_headers": ["X-Tenant", "Accept-Language"], "shared": shared}
        ),
        store=store,
        report=[],
    )
    target = '/v1/caf\u00e9?q="x"&r=\u2603'
    agent = "agent-\u00e9\U0001f600"
    fields = [
        ("X-Tenant", "t1"),
        ("accept-encoding", "gzip"),
        ("X-Tenant", "t\xe92"),
        ("Accept-Language", "fr, en"),
    ]
    if raw:
        call = Call(
            service="api",
            method="GET",
            target=target,
            raw_headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in fields],
            body=None,
            agent=agent,
        )
        assert call.raw_headers is not None
    else:
        call = Call(
            service="api",
            method="GET",
            target=target,
            headers=CIMultiDict(fields),
            body=None,
            agent=agent,
        )

    async def upstream(call: Call) -> Reply:
        return StaticReply(500)

    await step(call, upstream)
    parts = [
        "GET",
        target,
        "" if shared else "agent:" + agent,
        "accept-encoding:gzip",
        "accept-language:fr, en",
        "x-tenant:t1,t\xe92",
    ]
    assert store.keys == [hashlib.sha256(json.dumps(parts).encode()).digest()]


async def test_a_stored_field_that_cannot_go_out_as_bytes_is_served_as_before() -> None:
    """A field a step inside the cache set to text that is not latin-1: the hit keeps
    the head the miss had (the listener judges it), it does not drop or mangle it."""
    store = CacheStore(max_entries=10, max_bytes=1 << 20)
    step = cache_step({}, store, lambda: 100.0)
    calls = 0

    async def upstream(call: Call) -> Reply:
        nonlocal calls
        calls += 1
        headers = CIMultiDict([("Cache-Control", "max-age=60"), ("X-Name", "\u0101")])
        return StaticReply(200, headers, b"body")

    miss = await get_through(step, upstream, "/x")
    hit = await get_through(step, upstream, "/x")
    assert calls == 1
    assert miss.headers["X-Sidecar-Cache"] == "miss"
    assert list(hit.headers.items()) == [
        ("Cache-Control", "max-age=60"),
        ("X-Name", "\u0101"),
        ("Age", "0"),
        ("X-Sidecar-Cache", "hit"),
    ]
    assert hit.content_length == 4


def _revalidated(head: bytes, not_modified: bytes, fresh: bytes) -> bytes:
    # The 200 must be revalidated before each use; a conditional call gets the 304.
    if b'if-none-match: "v1"' in head.lower():
        return (
            b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\nCache-Control: max-age=60\r\n'
            + not_modified
            + b"\r\n"
        )
    return (
        b'HTTP/1.1 200 OK\r\nETag: "v1"\r\nCache-Control: max-age=0\r\n%b'
        b"Content-Length: %d\r\n\r\n%b" % (fresh, len(BODY), BODY)
    )


@pytest.fixture
async def revalidating_upstream() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream whose answer must be revalidated before each use, and whose 304
    names a field of its own in its Connection (RFC 9110 7.6.1: not for the agent)."""
    not_modified = b"Connection: X-Hop304\r\nX-Hop304: internal-routing-token\r\nX-Version: 2\r\n"
    async with _upstream(
        lambda head, _, __: _revalidated(head, not_modified, b"X-Version: 1\r\n")
    ) as up:
        yield up


async def test_a_field_the_304s_connection_names_never_reaches_the_agent(
    revalidating_upstream: tuple[str, list[bytes]],
    cache_sidecar: CacheSidecar,
    client: aiohttp.ClientSession,
) -> None:
    """A 304 updates the stored head with its fields, but not with the ones its own
    Connection names: those were for the sidecar's connection to the upstream, and
    stored, every later hit would hand them to the agents."""
    base, seen = revalidating_upstream
    sc = await cache_sidecar(base, "{}", SECRET)
    results = []
    for _ in range(3):
        async with client.get(f"{sc.url}/api/r", headers={"X-Agent-Id": "a1"}) as r:
            assert await r.read() == BODY
            results.append(r.headers["X-Sidecar-Cache"])
            assert "X-Hop304" not in r.headers, results[-1]
            # The 304's end-to-end fields still update the entry.
            assert r.headers["X-Version"] == ("1" if results[-1] == "miss" else "2")
    assert results == ["miss", "revalidated", "hit"]
    assert len(seen) == 2


async def test_a_304s_fields_keep_the_case_the_upstream_wrote(
    revalidating_upstream: tuple[str, list[bytes]],
    cache_sidecar: CacheSidecar,
    client: aiohttp.ClientSession,
) -> None:
    """The fields a 304 updates reach the agents as the upstream spelled them, on the
    revalidated answer and on every later hit, as the miss's did."""
    base, _ = revalidating_upstream
    sc = await cache_sidecar(base, "{}", SECRET)
    names = []
    for _ in range(3):
        async with client.get(f"{sc.url}/api/r", headers={"X-Agent-Id": "a1"}) as r:
            assert await r.read() == BODY
            names.append([n for n, _ in _fields(r.raw_headers) if n.lower() == b"x-version"])
    assert names == [[b"X-Version"]] * 3


@pytest.fixture
async def cookie_304_upstream() -> AsyncIterator[tuple[str, list[bytes]]]:
    """An upstream whose answer must be revalidated before each use, and whose 304 sets
    a cookie of its own for whoever revalidated it (session=N-..., N the call's number)."""
    cookie = b"Set-Cookie: session=%d-%b\r\n"
    secret = SECRET.encode()
    async with _upstream(lambda head, n, _: _revalidated(head, cookie % (n, secret), b"")) as up:
        yield up


async def test_a_cookie_a_304_sets_is_never_stored_for_the_next_agent(
    cookie_304_upstream: tuple[str, list[bytes]],
    cache_sidecar: CacheSidecar,
    client: aiohttp.ClientSession,
) -> None:
    """An answer with Set-Cookie is not stored, and a 304 that sets one does not put it
    in the entry either: the agent that revalidated gets its cookie, the next agent
    (the entry is shared) never does."""
    base, _ = cookie_304_upstream
    sc = await cache_sidecar(base, "{scope: service}", SECRET)
    got = []
    for agent in ("a1", "a1", "a2", "a3"):
        async with client.get(f"{sc.url}/api/c", headers={"X-Agent-Id": agent}) as r:
            assert await r.read() == BODY
            got.append((agent, r.headers["X-Sidecar-Cache"], r.headers.get("Set-Cookie")))
    assert got[0] == ("a1", "miss", None)
    assert got[1] == ("a1", "revalidated", f"session=2-{SECRET}")
    # Whatever the others get (a revalidation and a cookie of their own, or a hit),
    # a1's cookie is not in it.
    assert all(cookie != f"session=2-{SECRET}" for _, _, cookie in got[2:]), got
