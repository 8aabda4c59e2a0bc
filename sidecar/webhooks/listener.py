"""The ingress listener's app: only the declared inbound webhook paths, nothing proxied.

Also the egress side's `/_webhooks/<name>` and `/_events/<name>` answers
(`egress_app`, which the runtime hands to the egress app: http/ knows no
webhook). A body is read up to one byte past the webhook's limit, so an
oversized one is refused (413) without being held whole. Both run on the HTTP
connector's listener (http/listener.py): this package builds on it, never the
other way round.
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import TYPE_CHECKING

from ..core.headers import SERVER
from ..core.problems import ProblemError, problem_parts
from ..core.reasons import Reason
from ..http.listener import App, Request, Response
from .answers import Result, refused
from .gate import EVENTS, OUTBOUND
from .subscriptions import EVENTS_PREFIX

if TYPE_CHECKING:
    from .hub import WebhookHub

# Agents' outbound events: the group's own max_body is checked by the Outbox.
OUTBOUND_READ_LIMIT = 16 << 20
OUTBOUND_PREFIX = "/_webhooks/"
# The sidecar's own paths on egress that this package answers.
OWN_PREFIXES = (OUTBOUND_PREFIX, EVENTS_PREFIX)
_SSE_HEADERS = [
    ("Content-Type", "text/event-stream"),
    ("Cache-Control", "no-cache"),
    ("X-Accel-Buffering", "no"),
    ("Server", SERVER),
]


async def read_limited(body: AsyncIterable[bytes] | None, limit: int) -> bytes:
    """The body, or its first limit+1 bytes: enough for the receiver to say 413."""
    if body is None:
        return b""
    chunks: list[bytes] = []
    seen = 0
    async for data in body:
        chunks.append(data)
        seen += len(data)
        if seen > limit:
            break
    return b"".join(chunks)


def answer(result: Result) -> Response:
    headers = [(k, v) for k, v in result.headers.items() if k.lower() != "server"]
    headers.append(("Server", SERVER))
    return Response(status=result.status, headers=headers, body=result.body)


def ingress_app(hub: WebhookHub) -> App:
    async def handle(request: Request) -> Response:
        path = request.target.partition("?")[0]
        hook = hub.hook_for(path) if request.method == "POST" else None
        # Straight from the parser's bytes: a CIMultiDict first would be a second copy.
        headers = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in request.raw_headers]
        receipt = hub.receipt("inbound", hook.name if hook else "", headers)
        if hook is None:
            result = refused(Reason.no_route, "no inbound webhook is declared at this path", None)
        elif request.content_length is not None and request.content_length > hook.max_body:
            result = too_large(hook.max_body)
        else:
            body = await read_limited(request.body, hook.max_body)
            result = await hook.receive(receipt.headers, body)
        receipt.done(result)
        return answer(result)

    return handle


def too_large(limit: int) -> Result:
    return refused(
        Reason.request_too_large, f"the body is over this webhook's limit of {limit} bytes", None
    )


def egress_app(hub: WebhookHub) -> App:
    """What egress answers at OWN_PREFIXES (runtime.py hands it to the egress app)."""

    async def handle(request: Request) -> Response:
        return await own_answer(hub, request)

    return handle


async def own_answer(hub: WebhookHub, request: Request) -> Response:
    """`/_webhooks/<name>` or `/_events/<name>...` on egress."""
    if request.target.startswith(EVENTS_PREFIX):
        return await events_answer(hub, request)
    return await outbound_answer(hub, request)


async def _admit(hub: WebhookHub, kind: str, name: str, request: Request) -> Response | None:
    """None when identity and allow rules let the call through; else the refusal."""
    gate = hub.gate
    if gate is None:
        return None
    try:
        await gate.admit(kind, name, request)
    except ProblemError as err:
        status, headers, body = problem_parts(err, err.service)
        return Response(status=status, headers=headers, body=body)
    return None


async def events_answer(hub: WebhookHub, request: Request) -> Response:
    # Imported on first use: only a sidecar with subscriptions needs it.
    from . import events

    headers = {k.lower(): v for k, v in request.headers.items()}
    asked = events.Request(request.method, request.target, headers)
    name = asked.name
    refusal = await _admit(hub, EVENTS, name, request)
    if refusal is not None:
        return refusal
    store = hub.store
    if store is None or not hub.subscribable(name):
        return answer(
            refused(
                Reason.no_route,
                f"no inbound webhook named '{name[:128]}' has subscribe: true",
                None,
            )
        )
    subs = hub.subscriptions
    if asked.action == "ack" and request.method == "POST":
        body = await read_limited(request.body, events.ACK_BODY_LIMIT)
        return answer(await events.acknowledge(store, subs, name, body))
    if asked.action or request.method != "GET":
        return answer(
            refused(
                Reason.no_route,
                "GET /_events/<name> to subscribe, POST /_events/<name>/ack to acknowledge",
                name,
            )
        )
    if asked.poll:
        return answer(await events.long_poll(store, subs, name, asked))
    return Response(
        status=200,
        headers=list(_SSE_HEADERS),
        body=events.stream(store, subs, name, asked.last_id),
    )


async def outbound_answer(hub: WebhookHub, request: Request) -> Response:
    name = request.target.partition("?")[0][len(OUTBOUND_PREFIX) :]
    refusal = await _admit(hub, OUTBOUND, name, request)
    if refusal is not None:
        return refusal
    if request.method != "POST":
        return answer(refused(Reason.no_route, "post an event to /_webhooks/<name>", name))
    body = await read_limited(request.body, OUTBOUND_READ_LIMIT)
    return answer(await hub.outbound(name, list(request.headers.items()), body))
