"""A notification's body in each receiver format.

- slack: an incoming webhook's `{"text": ...}` (mrkdwn);
- pagerduty: an Events API v2 trigger or resolve, deduplicated per alert;
- standard: a Standard Webhooks payload (`type`, `timestamp`, `data`), signed
  at delivery by the webhook worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from ..policy.alerts import Receiver


@dataclass(frozen=True, slots=True)
class Notification:
    alertname: str
    status: str  # firing | resolved
    severity: str
    subject: str  # what it is about: a service, WEBHOOK/ENDPOINT, a pool; "" the sidecar
    summary: str  # one sentence
    starts_at: float
    ends_at: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "alertname": self.alertname,
            "status": self.status,
            "severity": self.severity,
            "subject": self.subject,
            "summary": self.summary,
            "starts_at": _iso(self.starts_at),
            "ends_at": None if self.ends_at is None else _iso(self.ends_at),
        }


def _iso(at: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


_PD_SEVERITY = {"critical": "critical", "warning": "warning", "info": "info"}


def body(receiver: Receiver, note: Notification) -> bytes:
    if receiver.format == "slack":
        mark = ":red_circle: FIRING" if note.status == "firing" else ":large_green_circle: RESOLVED"
        about = f" ({note.subject})" if note.subject else ""
        return json.dumps(
            {"text": f"{mark} *{note.alertname}*{about} [{note.severity}]: {note.summary}"}
        ).encode()
    if receiver.format == "pagerduty":
        key = receiver.routing_key.reveal() if receiver.routing_key is not None else ""
        event: dict[str, Any] = {
            "routing_key": key,
            "event_action": "trigger" if note.status == "firing" else "resolve",
            "dedup_key": f"agent-sidecar/{note.alertname}/{note.subject}",
        }
        if note.status == "firing":
            event["payload"] = {
                "summary": f"{note.alertname}: {note.summary}"[:1024],
                "source": note.subject or "agent-sidecar",
                "severity": _PD_SEVERITY[note.severity],
                "component": note.subject or None,
                "group": "agent-sidecar",
                "custom_details": note.as_dict(),
            }
        return json.dumps(event).encode()
    return json.dumps(
        {"type": f"alert.{note.status}", "timestamp": _iso(time.time()), "data": note.as_dict()}
    ).encode()
