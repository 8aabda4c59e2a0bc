"""The ingress listener: only the declared inbound webhook paths, nothing proxied.

Also the egress side's `/_webhooks/<name>` answer. A body is read up to one
byte past the webhook's limit, so an oversized one is refused (413) without
being held whole.
"""

from __future__ import annotations

from aiohttp import web

from .answers import Reason, Result, refused
from .hub import WebhookHub

# Agents' outbound events: the group's own max_body is checked by the Outbox.
OUTBOUND_READ_LIMIT = 16 << 20
OUTBOUND_PREFIX = "/_webhooks/"


async def read_limited(request: web.BaseRequest, limit: int) -> bytes:
    """The body, or its first limit+1 bytes: enough for the receiver to say 413."""
    chunks: list[bytes] = []
    seen = 0
    while seen <= limit:
        chunk = await request.content.readany()
        if not chunk:
            break
        chunks.append(chunk)
        seen += len(chunk)
    return b"".join(chunks)


def answer(result: Result) -> web.Response:
    headers = dict(result.headers)
    headers["Server"] = "agent-sidecar"
    return web.Response(status=result.status, body=result.body, headers=headers)


def ingress_server(hub: WebhookHub) -> web.Server:
    async def handle(request: web.BaseRequest) -> web.StreamResponse:
        hook = hub.hook_for(request.path) if request.method == "POST" else None
        receipt = hub.receipt("inbound", hook.name if hook else "", list(request.headers.items()))
        if hook is None:
            result = refused(Reason.no_route, "no inbound webhook is declared at this path", None)
        elif request.content_length is not None and request.content_length > hook.max_body:
            result = too_large(hook.max_body)
        else:
            body = await read_limited(request, hook.max_body)
            result = await hook.receive(receipt.headers, body)
        receipt.done(result)
        return answer(result)

    return web.Server(handle, access_log=None)


def too_large(limit: int) -> Result:
    return refused(
        Reason.request_too_large, f"the body is over this webhook's limit of {limit} bytes", None
    )


async def outbound_answer(hub: WebhookHub, request: web.BaseRequest) -> web.Response:
    name = request.path[len(OUTBOUND_PREFIX) :]
    if request.method != "POST":
        return answer(refused(Reason.no_route, "post an event to /_webhooks/<name>", name))
    body = await read_limited(request, OUTBOUND_READ_LIMIT)
    return answer(await hub.outbound(name, list(request.headers.items()), body))
