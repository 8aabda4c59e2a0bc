"""The ingress listener's app: only the declared inbound webhook paths, nothing proxied.

Also the egress side's `/_webhooks/<name>` answer. A body is read up to one
byte past the webhook's limit, so an oversized one is refused (413) without
being held whole. Both run on the proxy's listener (proxy/listener.py).
"""

from __future__ import annotations

from collections.abc import AsyncIterable
from typing import TYPE_CHECKING

from ..headers import SERVER
from .answers import Reason, Result, refused

if TYPE_CHECKING:
    from ..proxy.listener import App, Request, Response
    from .hub import WebhookHub

# Agents' outbound events: the group's own max_body is checked by the Outbox.
OUTBOUND_READ_LIMIT = 16 << 20
OUTBOUND_PREFIX = "/_webhooks/"


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
    from ..proxy.listener import Response

    headers = [(k, v) for k, v in result.headers.items() if k.lower() != "server"]
    headers.append(("Server", SERVER))
    return Response(status=result.status, headers=headers, body=result.body)


def ingress_app(hub: WebhookHub) -> App:
    async def handle(request: Request) -> Response:
        path = request.target.partition("?")[0]
        hook = hub.hook_for(path) if request.method == "POST" else None
        headers = list(request.headers.items())
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


async def outbound_answer(hub: WebhookHub, request: Request) -> Response:
    name = request.target.partition("?")[0][len(OUTBOUND_PREFIX) :]
    if request.method != "POST":
        return answer(refused(Reason.no_route, "post an event to /_webhooks/<name>", name))
    body = await read_limited(request.body, OUTBOUND_READ_LIMIT)
    return answer(await hub.outbound(name, list(request.headers.items()), body))
