"""Agents subscribe to an inbound webhook's events: `/_events/<name>` on egress.

For agents that are clients only, with no server for `deliver_to` (what the
Hookdeck CLI and smee.io do through a public relay, with none here): an inbound
webhook with `subscribe: true` keeps each accepted event in the durable queue
as one more delivery, which no worker sends; the subscriber reads it.

- `GET /_events/<name>` is an SSE stream: each event's `id:` is its message id,
  its `data:` one line of JSON, `{"id", "type", "headers", "body"}` (the body
  parsed as JSON, or as text when it is not JSON).
- `GET /_events/<name>?wait=30s` (or with `Accept: application/json`) is the
  long-poll form: a JSON list of the same objects, answered as soon as there
  is at least one event, or empty after `wait`.
- At least once: an event stays pending until acknowledged, by
  `POST /_events/<name>/ack` with `{"id": "<message id>"}`, or by the next
  request carrying `Last-Event-ID: <message id>` (or `?last_event_id=`).
  Either acknowledges that event and every earlier one. A subscriber that
  comes back, after its crash or the sidecar's, gets every pending event again.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ..core.reasons import Reason
from ..policy.units import parse_duration
from .answers import Result, refused
from .queue import Pending, StoreUnavailable
from .subscriptions import EVENTS_PREFIX, POLL, Subscriptions

if TYPE_CHECKING:
    from .queue import Queue

log = logging.getLogger("sidecar.webhooks")

# Read at most this many events per look at the store.
BATCH = 100
MAX_LIMIT = 1000
MAX_WAIT = 300.0
# An SSE comment this often keeps proxies and clients from closing an idle stream.
KEEPALIVE = 15.0
ACK_BODY_LIMIT = 4096


def event_json(event: Pending) -> dict[str, Any]:
    try:
        body: Any = json.loads(event.body)
    except (ValueError, UnicodeDecodeError):
        body = event.body.decode("utf-8", "replace")
    return {
        "id": event.message_id,
        "type": event.event_type,
        "headers": dict(event.headers),
        "body": body,
    }


def sse_frame(event: Pending) -> bytes:
    data = json.dumps(event_json(event), separators=(",", ":"))
    return f"id: {event.message_id}\ndata: {data}\n\n".encode()


class Request:
    """What one `/_events/<name>` request asks for, from its method, query and headers."""

    def __init__(self, method: str, target: str, headers: dict[str, str]) -> None:
        path, _, query = target.partition("?")
        rest = path[len(EVENTS_PREFIX) :]
        self.name, _, self.action = rest.partition("/")
        self.method = method
        params = dict(parse_qsl(query, keep_blank_values=True))
        self.params = params
        self.last_id = headers.get("last-event-id") or params.get("last_event_id") or None
        accept = headers.get("accept", "")
        self.poll = "wait" in params or (
            "application/json" in accept and "text/event-stream" not in accept
        )


def _bad(detail: str, name: str) -> Result:
    return refused(Reason.bad_request, detail, name)


def _store_down(name: str, exc: Exception) -> Result:
    log.error("webhook subscription %s: the store failed: %s", name, type(exc).__name__)
    return refused(Reason.store_unavailable, "the event queue could not be read; try again", name)


def wait_seconds(text: str | None) -> float:
    """`wait` as seconds: a duration (30s, 500ms) or a plain number of seconds."""
    if not text:
        return 0.0
    seconds = float(text) if text.replace(".", "", 1).isdigit() else parse_duration(text)
    return min(max(seconds, 0.0), MAX_WAIT)


async def ack(store: Queue, subs: Subscriptions, name: str, message_id: str) -> int | None:
    acked = await store.ack(name, message_id)
    if acked:
        subs.acked(name, acked)
    return acked


async def acknowledge(store: Queue, subs: Subscriptions, name: str, body: bytes) -> Result:
    """`POST /_events/<name>/ack` with `{"id": "msg_..."}`."""
    try:
        message_id = json.loads(body).get("id")
    except (ValueError, UnicodeDecodeError, AttributeError):
        message_id = None
    if not isinstance(message_id, str) or not message_id:
        return _bad('send {"id": "<message id>"}, the last event you handled', name)
    try:
        acked = await ack(store, subs, name, message_id)
    except StoreUnavailable as exc:
        return _store_down(name, exc)
    if acked is None:
        return _bad(f"webhook '{name}' has no subscribed event with this id", name)
    answer = json.dumps({"acknowledged": acked}).encode()
    return Result(200, {"Content-Type": "application/json"}, answer, outcome="acknowledged")


async def long_poll(store: Queue, subs: Subscriptions, name: str, request: Request) -> Result:
    try:
        wait = wait_seconds(request.params.get("wait"))
        limit = int(request.params.get("limit", BATCH))
    except ValueError:
        return _bad("wait is a duration (30s) and limit a number", name)
    limit = min(max(limit, 1), MAX_LIMIT)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    try:
        if request.last_id is not None:
            await ack(store, subs, name, request.last_id)
        while True:
            found = await store.pending(name, None, limit)
            left = deadline - loop.time()
            if found or left <= 0 or subs.closing:
                break
            await subs.wait(min(left, POLL))
    except StoreUnavailable as exc:
        return _store_down(name, exc)
    subs.sent(name, "poll", len(found))
    answer = json.dumps([event_json(e) for e in found]).encode()
    return Result(200, {"Content-Type": "application/json"}, answer, outcome="polled")


async def stream(
    store: Queue, subs: Subscriptions, name: str, last_id: str | None
) -> AsyncIterator[bytes]:
    """The SSE body: every pending event once, then each new one as it arrives."""
    subs.opened(name, 1)
    try:
        if last_id is not None:
            await ack(store, subs, name, last_id)
        # A comment first, so the client sees the stream open before any event.
        yield b": subscribed\n\n"
        cursor: int | None = None
        quiet = 0.0
        while not subs.closing:
            found = await store.pending(name, cursor, BATCH)
            if found:
                cursor = found[-1].delivery_id
                subs.sent(name, "sse", len(found))
                yield b"".join(sse_frame(e) for e in found)
                quiet = 0.0
                continue
            await subs.wait(POLL)
            quiet += POLL
            if quiet >= KEEPALIVE:
                quiet = 0.0
                yield b": keepalive\n\n"
    finally:
        subs.opened(name, -1)
