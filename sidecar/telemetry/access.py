"""The JSON access log: one line per agent request on the logger "sidecar.access".

Off by default (`--access-log` / SIDECAR_ACCESS_LOG=1). A line never holds a
header or a query string: those are where credentials and signed URLs live.
The line is built only when the log is on and INFO is enabled for the logger,
and written by a background thread, so the request path never waits on stdout.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import time
from typing import IO, TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import logging.handlers

LOGGER: Final = "sidecar.access"
log = logging.getLogger(LOGGER)


def line(
    *,
    at: float,
    agent: str | None,
    method: str,
    service: str | None,
    path: str,
    status: int,
    duration: float,
    bytes_sent: int,
    attempts: int,
    reason: str | None,
    trace_id: str | None,
) -> str:
    record: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(at)) + f".{int(at % 1 * 1000):03d}Z",
        "agent": agent,
        "method": method,
        "service": service,
        "path": path,
        "status": status,
        "duration_ms": round(duration * 1000, 3),
        "bytes_sent": bytes_sent,
        "upstream_attempts": attempts,
        "reason": reason,
        "trace_id": trace_id,
    }
    return json.dumps(record, separators=(",", ":"))


def configure(stream: IO[str] | None = None) -> logging.handlers.QueueListener:
    """Send "sidecar.access" lines, bare, to stdout through a queue; start the writer.

    The caller stops the returned listener at shutdown, which flushes what is queued.
    """
    # Here, not at the top: logging.handlers (with pickle and socket handlers) costs
    # half a megabyte in every sidecar whose access log is off.
    import logging.handlers

    q: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    out = logging.StreamHandler(stream or sys.stdout)
    out.setFormatter(logging.Formatter("%(message)s"))
    listener = logging.handlers.QueueListener(q, out)
    log.handlers[:] = [logging.handlers.QueueHandler(q)]
    log.setLevel(logging.INFO)  # independent of --log-level: asking for the log means INFO
    log.propagate = False  # the lines are data for stdout, not diagnostics for stderr
    listener.start()
    return listener
