"""What the webhook entry points answer: a status, headers and a body, for any listener.

The sidecar's own refusals are problem+json with X-Sidecar-Error, as on egress.
"""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field

from ..core.problems import PROBLEM_TYPE


class Reason(enum.Enum):
    """A refusal: (status, title); the value's name is the X-Sidecar-Error reason."""

    no_route = (404, "No such webhook")
    unauthenticated = (401, "Webhook signature refused")
    request_too_large = (413, "Webhook body too large")
    bad_request = (400, "Bad webhook event")
    store_unavailable = (503, "Webhook store unavailable")

    @property
    def status(self) -> int:
        return self.value[0]


@dataclass(frozen=True, slots=True)
class Result:
    status: int
    headers: dict[str, str]
    body: bytes
    message_id: str | None = None
    duplicate: bool = False
    reason: Reason | None = field(default=None)  # set on the sidecar's own refusals
    # For metrics and spans: accepted, duplicate, unrouted, challenge, or why it was refused.
    outcome: str = ""


def accepted(status: int, message_id: str, duplicate: bool, outcome: str = "accepted") -> Result:
    body = json.dumps({"id": message_id, "duplicate": duplicate}).encode()
    if duplicate:
        outcome = "duplicate"
    return Result(
        status, {"Content-Type": "application/json"}, body, message_id, duplicate, None, outcome
    )


def refused(reason: Reason, detail: str, webhook: str | None, outcome: str | None = None) -> Result:
    status, title = reason.value
    body = {
        "type": PROBLEM_TYPE + reason.name.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": detail,
        "service": webhook,
        "reason": reason.name,
        "message": detail,
    }
    headers = {"Content-Type": "application/problem+json", "X-Sidecar-Error": reason.name}
    return Result(
        status, headers, json.dumps(body).encode(), reason=reason, outcome=outcome or reason.name
    )
