"""Outbound webhooks: an agent's event, stored, then signed and sent to each endpoint.

`Outbox` is compiled from the policy at load; the egress listener hands
`/_webhooks/<name>` requests to `Outbox.handle`, which answers 202 with the
message id once the event is durably stored. The event type comes from the
`X-Event-Type` header or else the body's top-level "type" (the Standard
Webhooks payload shape); `Idempotency-Key` makes a repeated publish a no-op
within the group's idempotency window.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence

from ..core.reasons import Reason
from ..policy.webhooks import OutboundWebhook, Webhooks
from .answers import Result, accepted, refused
from .queue import Accepted, Direction, Queue, StoreUnavailable, Target
from .signatures import lower_headers

log = logging.getLogger("sidecar.webhooks")

EVENT_TYPE_HEADER = "x-event-type"
IDEMPOTENCY_HEADER = "idempotency-key"
# Kept with the event, so its deliveries continue the publishing agent's trace.
TRACE_HEADERS = ("traceparent", "tracestate")


class PublishError(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class OutboundGroup:
    """One `webhooks.outbound.<name>`: its endpoints and limits."""

    def __init__(self, name: str, spec: OutboundWebhook, *, store: Queue) -> None:
        self.name = name
        self.max_body = spec.max_body
        self._endpoints = spec.endpoints
        self._window = spec.idempotency_window
        self._first_in = spec.retry.schedule[0]
        self._store = store

    def targets(self, event_type: str | None) -> list[Target]:
        return [Target(e.name, e.url) for e in self._endpoints if e.wants(event_type)]

    async def publish(
        self,
        body: bytes,
        event_type: str | None = None,
        idempotency_key: str | None = None,
        trace: Sequence[tuple[str, str]] = (),
    ) -> Accepted:
        """Store the event for every endpoint that wants its type; returns once committed.

        Raises PublishError: the body is too large or not JSON, or the store failed.
        """
        if len(body) > self.max_body:
            raise PublishError(
                Reason.request_too_large, f"the event is over the limit of {self.max_body} bytes"
            )
        try:
            event = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            raise PublishError(Reason.bad_request, "the event body must be JSON") from None
        if event_type is None and isinstance(event, dict) and isinstance(event.get("type"), str):
            event_type = event["type"]
        try:
            return await self._store.accept(
                direction=Direction.outbound,
                source=self.name,
                event_type=event_type,
                headers=list(trace),
                body=body,
                targets=self.targets(event_type),
                dedup_id=idempotency_key,
                dedup_window=self._window,
                first_attempt_in=self._first_in,
            )
        except StoreUnavailable as exc:
            log.error("outbound webhook %s: cannot store the event: %s", self.name, exc)
            raise PublishError(
                Reason.store_unavailable, "the event could not be stored; send it again"
            ) from None


async def publish(
    group: OutboundGroup,
    body: bytes,
    event_type: str | None = None,
    idempotency_key: str | None = None,
) -> str:
    """The message id of the stored event (202 semantics)."""
    return (await group.publish(body, event_type, idempotency_key)).message_id


class Outbox:
    """Every outbound webhook group by name; what `/_webhooks/<name>` on egress serves."""

    def __init__(self, webhooks: Webhooks | None, *, store: Queue) -> None:
        outbound = webhooks.outbound if webhooks is not None else {}
        self.groups = {
            name: OutboundGroup(name, spec, store=store) for name, spec in outbound.items()
        }

    async def handle(
        self, name: str, headers: Mapping[str, str] | list[tuple[str, str]], body: bytes
    ) -> Result:
        group = self.groups.get(name)
        if group is None:
            return refused(Reason.no_route, "no outbound webhook has this name", None)
        lowered = lower_headers(headers)
        trace = [(h, lowered[h]) for h in TRACE_HEADERS if h in lowered]
        event_type = lowered.get(EVENT_TYPE_HEADER)
        try:
            result = await group.publish(body, event_type, lowered.get(IDEMPOTENCY_HEADER), trace)
        except PublishError as exc:
            return refused(exc.reason, exc.detail, name)
        outcome = "accepted" if result.routed else "unrouted"
        return accepted(202, result.message_id, result.duplicate, outcome)
