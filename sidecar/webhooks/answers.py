"""What the webhook entry points answer: a status, headers and a body, for any listener.

The sidecar's own refusals are problem+json with X-Sidecar-Error, as on egress.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..core.problems import PROBLEM_TYPE
from ..core.reasons import Reason

# The reasons a webhook entry point refuses with (core/reasons.py), with
# the status and title of a webhook's refusal.
TITLES: dict[str, tuple[int, str]] = {
    Reason.no_route: (404, "No such webhook"),
    Reason.unauthenticated: (401, "Webhook signature refused"),
    Reason.request_too_large: (413, "Webhook body too large"),
    Reason.bad_request: (400, "Bad webhook event"),
    Reason.store_unavailable: (503, "Webhook store unavailable"),
}


@dataclass(frozen=True, slots=True)
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    message_id: str | None = None
    duplicate: bool = False
    reason: str | None = field(default=None)  # set on the sidecar's own refusals
    # For metrics and spans: accepted, duplicate, unrouted, challenge, or why it was refused.
    outcome: str = ""


def accepted(status: int, message_id: str, duplicate: bool, outcome: str = "accepted") -> Result:
    # json.dumps' own bytes, written directly (once per event): an id is msg_ and hex.
    body = b'{"id": "%s", "duplicate": %s}' % (
        message_id.encode(),
        b"true" if duplicate else b"false",
    )
    if duplicate:
        outcome = "duplicate"
    return Result(
        status, {"Content-Type": "application/json"}, body, message_id, duplicate, None, outcome
    )


def refused(reason: str, detail: str, webhook: str | None, outcome: str | None = None) -> Result:
    status, title = TITLES[reason]
    body = {
        "type": PROBLEM_TYPE + reason.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "service": webhook,
        "reason": reason,
        "message": detail,
    }
    headers = {"Content-Type": "application/problem+json", "X-Sidecar-Error": reason}
    return Result(
        status, headers, json.dumps(body).encode(), reason=reason, outcome=outcome or reason
    )
