"""What flows through a service's chain of steps.

A `Call` is the agent's request as it will be sent upstream (method, target,
headers, body); a step may change it, answer for itself by raising
`ProblemError`, or pass it on. A `Reply` is an answer with its body still to
stream: the upstream's (http/pool.py), or one a step made itself (a mock, a
replayed recording: `StaticReply`; a cache hit: `StoredReply`). Any step can look at its status
and headers, and release it to try again; the egress relays any Reply.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterable, Awaitable, Callable
from typing import Any, Final, Protocol

from multidict import CIMultiDict, CIMultiDictProxy
from mypy_extensions import mypyc_attr

from .headers import check_field, decode_fields, unsafe_field
from .streams import once


class Reply(Protocol):
    """An answer as the steps see it; `body` is iterated once, then `release()`."""

    @property
    def status(self) -> int: ...

    @property
    def reason(self) -> str | None: ...

    @property
    def headers(self) -> CIMultiDictProxy[str]: ...

    @property
    def content_length(self) -> int | None: ...

    @property
    def body(self) -> AsyncIterable[bytes] | None: ...

    def release(self) -> Any: ...


class StaticReply:
    """An answer held in memory (a step's own: cache hit, mock, recording)."""

    __slots__ = ("_data", "content_length", "headers", "reason", "status")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | CIMultiDictProxy[str] | None = None,
        data: bytes = b"",
        *,
        reason: str | None = None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(CIMultiDict(headers or ()))
        self._data = data
        self.content_length: int | None = len(data)

    @property
    def body(self) -> AsyncIterable[bytes] | None:
        return once(self._data) if self._data else None

    def release(self) -> None:
        return None


class StoredReply:
    """A whole answer a step keeps with its fields as bytes (a cache hit): the egress
    relays its head as it relays the upstream's own (`raw_headers`, `connection`,
    `refers`, `data`, as http/pool.py's UpstreamReply), decoding no field; a step
    that asks for `headers` decodes them then, once."""

    __slots__ = (
        "_headers",
        "connection",
        "content_length",
        "data",
        "raw_headers",
        "reason",
        "refers",
        "status",
    )

    def __init__(
        self,
        status: int,
        raw_headers: list[tuple[bytes, bytes]],
        data: bytes,
        *,
        reason: str | None,
        content_length: int | None,
        connection: bytes | None,
        refers: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        # Checked for CR, LF and NUL by whoever made them: relayed as they are.
        self.raw_headers = raw_headers
        self.data = data
        self.content_length = content_length
        # The Connection field's value (the fields it names are not relayed), and
        # whether a Location or Content-Location is among the fields.
        self.connection = connection
        self.refers = refers
        self._headers: CIMultiDictProxy[str] | None = None

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = CIMultiDictProxy(decode_fields(self.raw_headers))
        return headers

    @property
    def body(self) -> AsyncIterable[bytes] | None:
        return once(self.data) if self.data else None

    def release(self) -> None:
        return None


# Steps outside the compiled modules (setup.py) subclass it.
@mypyc_attr(allow_interpreted_subclasses=True)
class ReplyView:
    """Another reply with its body, headers or length replaced by a step (a metered,
    recorded, faulted or filtered answer); status, reason and release stay its own.
    Subclasses that must do more when the answer ends override `release`."""

    __slots__ = ("_reply", "body", "content_length", "headers")

    def __init__(
        self,
        reply: Reply,
        *,
        body: AsyncIterable[bytes] | Any | None = ...,
        headers: CIMultiDictProxy[str] | None = None,
        content_length: int | Any | None = ...,
    ) -> None:
        self._reply = reply
        self.body: AsyncIterable[bytes] | None = reply.body if body is ... else body
        self.headers: CIMultiDictProxy[str] = reply.headers if headers is None else headers
        self.content_length: int | None = (
            reply.content_length if content_length is ... else content_length
        )

    @property
    def status(self) -> int:
        return self._reply.status

    @property
    def reason(self) -> str | None:
        return self._reply.reason

    def release(self) -> Any:
        return self._reply.release()


Body = bytes | AsyncIterable[bytes] | None
Handler = Callable[["Call"], Awaitable[Reply]]


class Call:
    __slots__ = (
        "_headers",
        "_raw",
        "agent",
        "attempt",
        "body",
        "content_length",
        "exchange",
        "method",
        "service",
        "target",
        "tunnel_filter",
        "upgrade",
    )

    def __init__(
        self,
        *,
        service: str,
        method: str,
        target: str,
        headers: CIMultiDict[str] | None = None,
        body: Body,
        agent: str | None,
        content_length: int | None = None,
        raw_headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.service = service
        self.method = method
        self.target = target  # path and query, already encoded, upstream base path excluded
        # The fields to send: `raw_headers` (as the agent sent them, bytes) until a step
        # asks for `headers`, which decodes them once; from then on `headers` is all.
        if headers is None and raw_headers is None:
            headers = CIMultiDict()
        self._headers = headers
        self._raw = raw_headers if headers is None else None
        self.body = body
        # The agent's declared body length; None: chunked (or no body).
        self.content_length = len(body) if isinstance(body, bytes) else content_length
        self.agent = agent
        self.attempt = 1
        # A WebSocket handshake: the upstream's 101 turns the connection into a tunnel.
        self.upgrade = False
        # Set by a step that must read the tunnel (GraphQL, MCP over WebSocket): the egress
        # relays through what it makes of the upstream's tunnel.
        self.tunnel_filter: Callable[[Any], Any] | None = None
        # Telemetry's record of this agent request (telemetry.Exchange), when observed.
        self.exchange: Any = None

    @property
    def headers(self) -> CIMultiDict[str]:
        headers = self._headers
        if headers is None:
            headers = self._headers = decode_fields(self._raw or ())
            self._raw = None
        return headers

    @headers.setter
    def headers(self, headers: CIMultiDict[str]) -> None:
        self._headers = headers
        self._raw = None

    @property
    def raw_headers(self) -> list[tuple[bytes, bytes]] | None:
        """The fields as bytes while no step has asked for `headers`, else None."""
        return self._raw

    def header(self, name: str) -> str | None:
        """The first field called `name` (any case), decoding no other."""
        raw = self._raw
        if raw is None:
            return self.headers.get(name)
        wanted = name.lower().encode("latin-1")
        size = len(wanted)
        # By length first: most fields differ in it, and need no lowercase copy.
        for field, value in raw:
            if len(field) == size and field.lower() == wanted:
                return value.decode("latin-1")
        return None

    def pop_all(self, name: str) -> list[str]:
        """Every value of the field `name` (any case), in order, and the field removed;
        the other fields stay undecoded."""
        raw = self._raw
        if raw is None:
            return self.headers.popall(name, [])
        spelled = name.encode("latin-1")
        size = len(spelled)
        key: bytes | None = None
        found: list[str] = []
        # One pass (the identity step pops its credential on every call): a name spelled
        # as asked matches as is, another of the same length is lowercased once; the
        # fields before the first found are copied only once one is found.
        kept: list[tuple[bytes, bytes]] | None = None
        for i in range(len(raw)):
            field = raw[i]
            got = field[0]
            if len(got) != size:
                matches = False
            elif got == spelled:
                matches = True
            else:
                if key is None:
                    key = name.lower().encode("latin-1")
                matches = got.lower() == key
            if matches:
                if kept is None:
                    kept = raw[:i]
                found.append(field[1].decode("latin-1"))
            elif kept is not None:
                kept.append(field)
        if kept is not None:
            self._raw = kept
        return found

    def set_header(self, name: str, value: str) -> None:
        """`headers[name] = value`, without decoding the other fields.

        ValueError for a CR, LF or NUL in either: the raw fields are written as they
        are (`proxy.http1.raw_header_lines`), so none may enter unchecked.
        """
        raw = self._raw
        if raw is None:
            self.headers[name] = value
            return
        check_field(name, value)
        self._replace_raw(
            name.lower().encode("latin-1"), (name.encode("latin-1"), value.encode("latin-1"))
        )

    def set_headers(self, fields: list[tuple[str, str]]) -> None:
        """`set_header` of each (name, value), in one pass over the raw fields (a
        signature's several fields, steps/credentials/aws.py)."""
        raw = self._raw
        if raw is None:
            headers = self.headers
            for name, value in fields:
                headers[name] = value
            return
        keys: set[bytes] = set()
        added: list[tuple[bytes, bytes]] = []
        for name, value in fields:
            check_field(name, value)
            encoded = name.encode("latin-1")
            keys.add(encoded.lower())
            added.append((encoded, value.encode("latin-1")))
        kept = [f for f in raw if f[0].lower() not in keys]
        kept.extend(added)
        self._raw = kept

    def set_field(self, field: Field) -> None:
        """`set_header(field.name, field.value)` with the work done at load."""
        prepared = field.raw
        if self._raw is None or prepared is None:
            self.set_header(field.name, field.value)
            return
        self._replace_raw(field.key, prepared)

    def set_raw_field(self, key: bytes, field: tuple[bytes, bytes]) -> None:
        """`set_field` of a field made per call from text that cannot hold a CR, LF or
        NUL (telemetry's traceparent: hex ids and dashes), as bytes already; `key` is
        its name lowercased. No check and no encoding: it runs on every traced call."""
        if self._raw is None:
            self.headers[field[0].decode("latin-1")] = field[1].decode("latin-1")
            return
        self._replace_raw(key, field)

    def _replace_raw(self, key: bytes, field: tuple[bytes, bytes]) -> None:
        """Every raw field called `key` (lowercase) out, `field` in, at the end."""
        raw = self._raw
        assert raw is not None
        size = len(key)
        # By length first: most names differ in it, and need no lowercase copy.
        kept = [f for f in raw if len(f[0]) != size or f[0].lower() != key]
        kept.append(field)
        self._raw = kept


class Field:
    """A header field set on every call of a service (a fixed credential, a policy's
    `headers.set`): encoded, lowercased and checked once, at load."""

    __slots__ = ("key", "name", "raw", "value")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value
        self.key = name.lower().encode("latin-1", "replace")
        self.raw: tuple[bytes, bytes] | None = None
        if not (unsafe_field(name) or unsafe_field(value)):
            # Else set_header refuses it on each call, where it always has.
            with contextlib.suppress(UnicodeEncodeError):
                self.raw = (name.encode("latin-1"), value.encode("latin-1"))


class Step(Protocol):
    """One policy step: `async (call, next) -> reply`, built once per (re)load.

    Most are coroutine functions. A step may instead return the next step's own
    awaitable when it has nothing to do after it (steps/resilience/ratelimit.py): whoever
    calls a step awaits what it returns at once, so an exception it raises before
    returning lands where one from inside the coroutine would.
    """

    def __call__(self, call: Call, next: Handler) -> Awaitable[Reply]: ...


class Before(Protocol):
    """A step whose whole work is a synchronous change to the call before the next
    step (a fixed credential): the compiler links `before` and the next step
    directly, so the chain has no coroutine for it. `__call__` still works alone."""

    def before(self, call: Call) -> None: ...

    async def __call__(self, call: Call, next: Handler) -> Reply: ...


# Largest request body held in memory so a call can be sent again (a retry, a
# refreshed credential); a larger one is tried once.
REPLAY_LIMIT: Final = 1 << 20


def take_whole(call: Call, limit: int = REPLAY_LIMIT) -> bool:
    """make_replayable without waiting: True when the body is bytes (or none), taken at
    once when all of it (at most `limit` bytes) arrived with the head, as most do. A
    body still arriving, too large or without Content-Length is left as it is (False).

    The listener's stream can hand what it buffered over whole (`complete`,
    `take_all`): the read loop of make_replayable, an await per chunk, cost a small
    POST a quarter of its validation."""
    body = call.body
    if body is None or isinstance(body, bytes):
        return True
    length = call.content_length
    if length is None or length > limit or not getattr(body, "complete", False):
        return False
    take_all = getattr(body, "take_all", None)
    if take_all is None:
        return False
    call.body = take_all()
    return True


async def make_replayable(call: Call, limit: int = REPLAY_LIMIT) -> bool:
    """Read the body into memory (if at most `limit` bytes) so the call can be sent again.

    Retries and credential refreshes re-send a call; a streamed body can be
    read only once. Bodies of unknown length, or larger than `limit`, stay
    streamed, and the call is then tried once only.
    """
    if take_whole(call, limit):
        return True
    body = call.body
    assert body is not None and not isinstance(body, bytes)
    length = call.content_length
    if length is None or length > limit:
        return False
    chunks = [chunk async for chunk in body]
    call.body = b"".join(chunks)
    return True
