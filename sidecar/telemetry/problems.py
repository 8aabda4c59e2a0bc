"""The last problems the sidecar saw: its own refusals and the upstreams' failures.

A bounded ring the console and its JSON API read (`GET /api/console`). It is
fed from the one place each agent request is recorded (exchange.py), and only
for calls that went wrong: a successful call costs one comparison. A row
holds what an operator needs to find the call again (time, service, agent,
reason, status, trace id) and never a body, a header value or a query, which
can carry credentials.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any, Final

# The console shows the last this many.
KEEP: Final = 200


class RecentProblems:
    __slots__ = ("_rows", "total")

    def __init__(self, keep: int = KEEP) -> None:
        self._rows: deque[tuple[float, str, str, str, int, str, str]] = deque(maxlen=keep)
        self.total = 0  # every problem since start, also those the ring forgot

    def record(
        self,
        service: str,
        agent: str,
        method: str,
        status: int,
        reason: str,
        trace_id: str | None,
    ) -> None:
        self.total += 1
        self._rows.append((time.time(), service, agent, method, status, reason, trace_id or ""))

    def rows(self) -> list[dict[str, Any]]:
        """Newest first."""
        return [
            {
                "at": at,
                "service": service,
                "agent": agent,
                "method": method,
                "status": status,
                # An upstream's own failure has no sidecar reason: say whose it is.
                "reason": reason or "upstream",
                "trace_id": trace_id or None,
            }
            for at, service, agent, method, status, reason, trace_id in reversed(self._rows)
        ]
