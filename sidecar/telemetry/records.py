"""A span as the request path records it, and the OTLP protobuf bytes of a batch of them.

The request path (exchange.py) makes a `SpanRecord` per span; the exporter's thread
(spans.py) encodes batches of them with `Encoder`. Both name this module and it names
neither: the records and their encoding sit below the request path and the exporter.
Compiled (setup.py): a record is made per call, and the encoder runs once per span.
"""

from __future__ import annotations

import binascii
import os
import random
import struct
import time
from typing import TYPE_CHECKING, Any, Final

from ..core.call import Call

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

# A C static, not a lookup in the module's namespace on every call (mypyc).
time_ns: Final = time.time_ns
getrandbits: Final = random.getrandbits
_hexlify: Final = binascii.hexlify
_urandom: Final = os.urandom
_TRACEPARENT: Final = b"traceparent"
# The attributes of every dropped span: always empty.
_NONE: Final[dict[str, Any]] = {}
# opentelemetry.proto.trace.v1.Span.SpanKind
KIND_SERVER: Final = 2
KIND_CLIENT: Final = 3


class SpanRecord:
    """One span as the request path records it; spans.py encodes it for OTLP.

    A dropped (unsampled) span keeps its ids only: its trace goes on upstream.
    """

    __slots__ = (
        "attributes",
        "encoded",
        "end",
        "error",
        "kind",
        "name",
        "parent_id",
        "remote",
        "sampled",
        "span_hex",
        "span_id",
        "start",
        "trace_hex",
        "trace_id",
        "trace_state",
    )

    def __init__(
        self,
        name: str,
        kind: int,
        trace_id: int,
        parent_id: int,
        remote: bool,
        sampled: bool,
        trace_state: Any,
        span_id: int = 0,
        trace_hex: bytes = b"",
        span_hex: bytes = b"",
    ) -> None:
        self.name = name
        self.kind = kind
        self.trace_id = trace_id
        # 0 is the invalid id, as the SDK's RandomIdGenerator avoids. A dropped root span
        # comes with its ids in hex only (Ids): its ints are never read.
        while span_id == 0 and not span_hex:
            span_id = getrandbits(64)
        self.span_id = span_id
        # The ids' hex digits as the traceparent writes them; b"": made when needed.
        self.trace_hex = trace_hex
        self.span_hex = span_hex
        self.parent_id = parent_id  # 0: a root span
        self.remote = remote  # the parent came from the agent's traceparent
        self.sampled = sampled
        # The agent's tracestate (an SDK TraceState), passed on and exported; or None.
        self.trace_state = trace_state
        self.start = time_ns() if sampled else 0
        self.end = 0
        # A dropped span's stay empty and are never read: no dict of its own.
        self.attributes: dict[str, Any] = {} if sampled else _NONE
        # Attributes already in OTLP bytes, exported before `attributes`: an attempt's
        # fixed ones (service, upstream address), encoded once per policy load.
        self.encoded = b""
        self.error = False  # status ERROR, else UNSET

    def traceparent(self) -> bytes:
        """The W3C header an upstream gets to continue this span's trace, as the raw field's
        value: hex digits and dashes only."""
        # The ids' hex mostly comes from Ids (made 32 at a time), and bytes formatting:
        # one allocation and copies (mypyc), fewer instructions than a join (the buffer
        # protocol for each part), format specs, str concatenation or an encode.
        trace_hex = self.trace_hex
        if not trace_hex:
            trace_hex = self.trace_hex = _hexlify(self.trace_id.to_bytes(16, "big"))
        span_hex = self.span_hex
        if not span_hex:
            span_hex = self.span_hex = _hexlify(self.span_id.to_bytes(8, "big"))
        if self.sampled:
            return b"00-%s-%s-01" % (trace_hex, span_hex)
        return b"00-%s-%s-00" % (trace_hex, span_hex)

    def trace_text(self) -> str:
        """The trace id in hex, as the access log and the console show it."""
        if self.trace_hex:
            return self.trace_hex.decode()
        return self.trace_id.to_bytes(16, "big").hex()

    def inject(self, call: Call) -> None:
        """Replace the call's trace context (the agent's) by this span's."""
        # A raw field: the agent's other fields stay undecoded bytes, and this one needs
        # no check for CR, LF or NUL (hex digits and dashes).
        call.set_raw_field(_TRACEPARENT, (_TRACEPARENT, self.traceparent()))
        state = self.trace_state
        if state:
            call.set_header("tracestate", state.to_header())


# Ids drawn at once: 32 x 24 random bytes, 1.5 KiB, and their hex.
_POOL: Final = 32
# Eight zero bytes anywhere in a pool: it might hold an all-zero (invalid) id.
_ZERO8: Final = bytes(8)


class Ids:
    """Random ids for spans and traces, drawn 24 bytes (a trace id and a span id) at a
    time from a pool of 32 draws: one os.urandom and one hexlify per 32 calls. Per
    call, random.getrandbits (the SDK's RandomIdGenerator), its int and the int's hex
    cost more than the whole of a dropped span; and getrandbits of the whole pool
    would build, then take apart, a 6,144-bit int (W3C trace context asks for random
    ids; the kernel's are). Neither id of a draw is all zeros (invalid in W3C trace
    context): a pool that could hold one is drawn again, so no call checks."""

    __slots__ = ("at", "hex", "raw")

    def __init__(self) -> None:
        self.raw = b""
        self.hex = b""
        self.at = _POOL

    def draw(self) -> int:
        """The index `i` of a fresh draw: its 24 bytes at 24 * i in `raw` (the trace
        id's 16, then the span id's 8), their hex at 48 * i in `hex`."""
        at = self.at
        if at >= _POOL:
            raw = _urandom(_POOL * 24)
            while _ZERO8 in raw:  # about once in 2**54 pools
                raw = _urandom(_POOL * 24)
            self.raw = raw
            self.hex = _hexlify(raw)
            at = 0
        self.at = at + 1
        return at


# -- OTLP protobuf bytes of span records (the exporter's thread, spans.py) --------------

# The instrumentation scope of the agent requests' spans.
SCOPE: Final = "agent-sidecar"
# The Span's `flags` field (number 16, fixed32): SpanFlags HAS_IS_REMOTE, and IS_REMOTE
# for a parent that came from the agent.
_FLAGS_LOCAL: Final = b"\x85\x01" + (0x100).to_bytes(4, "little")
_FLAGS_REMOTE: Final = b"\x85\x01" + (0x300).to_bytes(4, "little")
# Status: ERROR (code 2) or UNSET, present in both cases as the SDK writes it.
_STATUS_ERROR: Final = b"\x7a\x02\x18\x02"
_STATUS_UNSET: Final = b"\x7a\x00"
# A span's last fields, status then flags, by (error, remote parent): one part, not two.
_TAILS: Final = [
    _STATUS_UNSET + _FLAGS_LOCAL,
    _STATUS_UNSET + _FLAGS_REMOTE,
    _STATUS_ERROR + _FLAGS_LOCAL,
    _STATUS_ERROR + _FLAGS_REMOTE,
]
_MASK64: Final = 0xFFFFFFFFFFFFFFFF
# Fixed-size fields packed in one call each: trace_id (1, 16 bytes) and span_id (2, 8
# bytes), big-endian as the ids' bytes go; parent_span_id (4); kind (6, varint below
# 128), start and end times (7, 8: fixed64, little-endian).
_pack_ids: Final = struct.Struct(">HQQHQ").pack
_pack_parent: Final = struct.Struct(">HQ").pack
_pack_times: Final = struct.Struct("<BBBQBQ").pack
# Attribute fields already encoded, by key and value: most of a span's attributes
# repeat call after call (service, route, method, status). Bounded: cleared when full.
_CACHE_MAX: Final = 4096
_BYTE: Final = [bytes((i,)) for i in range(256)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _BYTE[value]
    if 0 < value < 0x4000:  # a span's length, mostly
        return _BYTE[(value & 0x7F) | 0x80] + _BYTE[value >> 7]
    if value < 0:
        value += 1 << 64  # int64: two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field; `tag` is (number << 3) | 2, below 128."""
    size = len(payload)
    if size < 0x80:
        return _BYTE[tag] + _BYTE[size] + payload
    return _BYTE[tag] + _varint(size) + payload


def _any_value(value: Any) -> bytes:
    # As the SDK's _encode_value: bool before int (bool is an int).
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, int):
        return b"\x18" + _varint(value)
    if isinstance(value, float):
        return b"\x21" + struct.pack("<d", value)
    if isinstance(value, str):
        return _field(0x0A, value.encode())
    if isinstance(value, bytes):
        return _field(0x3A, value)
    if isinstance(value, (list, tuple)):
        return _field(0x2A, b"".join([_field(0x0A, _any_value(v)) for v in value]))
    raise TypeError(f"attribute value of type {type(value).__name__}")


def _attribute(key: str, value: Any) -> bytes:
    """One `attributes` field (a KeyValue) of a span."""
    return _field(0x4A, _field(0x0A, key.encode()) + _field(0x12, _any_value(value)))


class Encoder:
    """OTLP protobuf bytes of a batch of records, with the resource and scope given."""

    def __init__(self, resource: Resource) -> None:
        from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
        from opentelemetry.sdk.trace import ReadableSpan
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace import SpanContext

        # The envelope exactly as the SDK writes it, from one span it encodes, less the span.
        probe = ReadableSpan(
            name="probe",
            context=SpanContext(trace_id=1, span_id=1, is_remote=False),
            resource=resource,
            instrumentation_scope=InstrumentationScope(SCOPE),
        )
        request = encode_spans([probe])
        resource_spans = request.resource_spans[0]
        scope_spans = resource_spans.scope_spans[0]
        del scope_spans.spans[:]
        self._scope = scope_spans.SerializeToString()
        del resource_spans.scope_spans[:]
        self._resource = resource_spans.SerializeToString()
        # By type, then key, then value: True == 1, so one dict for both would mix them.
        self._strings: dict[str, dict[str, bytes]] = {}
        self._ints: dict[str, dict[int, bytes]] = {}
        self._bools: dict[str, dict[bool, bytes]] = {}
        self._cached = 0
        self._names: dict[str, bytes] = {}

    def attribute(self, key: str, value: Any) -> bytes:
        """One `attributes` field (a KeyValue) of a span."""
        kind = type(value)
        cache: dict[str, Any] | None = None
        if kind is str:
            cache = self._strings
        elif kind is int:
            cache = self._ints
        elif kind is bool:
            cache = self._bools
        if cache is not None:
            values: dict[Any, bytes] | None = cache.get(key)
            if values is not None:
                found = values.get(value)
                if found is not None:
                    return found
        encoded = _attribute(key, value)
        if cache is not None:
            if self._cached >= _CACHE_MAX:
                self._strings.clear()
                self._ints.clear()
                self._bools.clear()
                self._cached = 0
            values = cache.get(key)
            if values is None:
                values = {}
                cache[key] = values
            values[value] = encoded
            self._cached += 1
        return encoded

    def span(self, record: SpanRecord) -> bytes:
        """One Span message (its fields, without the enclosing tag)."""
        trace_id = record.trace_id
        parts = [_pack_ids(0x0A10, trace_id >> 64, trace_id & _MASK64, 0x1208, record.span_id)]
        state = record.trace_state
        if state:
            parts.append(_field(0x1A, ",".join([f"{k}={v}" for k, v in state.items()]).encode()))
        if record.parent_id:
            parts.append(_pack_parent(0x2208, record.parent_id))
        parts.append(self._name(record.name))
        parts.append(_pack_times(0x30, record.kind, 0x39, record.start, 0x41, record.end))
        if record.encoded:
            parts.append(record.encoded)
        for key, value in record.attributes.items():
            parts.append(self.attribute(key, value))
        parts.append(_TAILS[(2 if record.error else 0) + (1 if record.remote else 0)])
        return b"".join(parts)

    def _name(self, name: str) -> bytes:
        """The `name` field: a few names ("GET /api") make every span's."""
        found = self._names.get(name)
        if found is None:
            if len(self._names) >= _CACHE_MAX:
                self._names.clear()
            found = self._names[name] = _field(0x2A, name.encode())
        return found

    def request(self, records: list[SpanRecord]) -> bytes:
        """An ExportTraceServiceRequest holding `records`."""
        # Each span as a field of the ScopeSpans, then the envelope's tags and lengths
        # from the sizes: one join of the whole request, no copy of a batch per level.
        parts: list[bytes] = [b"", self._scope]
        scope_size = len(self._scope)
        for record in records:
            span = self.span(record)
            size = len(span)
            head = b"\x12" + _varint(size)
            parts.append(head)
            parts.append(span)
            scope_size += len(head) + size
        scope_head = b"\x12" + _varint(scope_size)
        resource_size = len(self._resource) + len(scope_head) + scope_size
        parts[0] = b"\x0a" + _varint(resource_size) + self._resource + scope_head
        return b"".join(parts)
