"""The JSON access log: one line per agent request on the logger "sidecar.access".

Off by default (`--access-log` / SIDECAR_ACCESS_LOG=1). A line never holds a
header or a query string: those are where credentials and signed URLs live.

`configure` (what `sidecar run` does) starts a `Writer`: the request path then
queues the line's fields, a tuple, and the writer's thread formats the JSON and
writes what has queued up with one write and one flush. Without it (tests with
caplog, an embedding program) the line goes through the logger, built only when
INFO is enabled for it.
"""

from __future__ import annotations

import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Final

LOGGER: Final = "sidecar.access"
log = logging.getLogger(LOGGER)
# The writer `configure` started, while it runs: the request path queues to it directly.
writer: Writer | None = None
# Lines written at once, at most: a burst is written in a few large writes.
BATCH: Final = 1024
# Seconds the writer waits after a write: what a line may lag behind its call.
PAUSE: Final = 0.02

# at, agent, method, service, path, status, duration, bytes_sent, attempts, reason, trace_id
Fields = tuple[
    float, str | None, str, str | None, str, int, float, int, int, str | None, str | None
]
# json's own C string encoder (what json.dumps uses with ensure_ascii).
_quote: Final[Callable[[str], str]] = json.encoder.encode_basestring_ascii


class _Clock:
    """The ISO time of a line, its seconds formatted once per second."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -1
        self.prefix = ""

    def format(self, at: float) -> str:
        second = int(at)
        if second != self.second:
            self.second = second
            self.prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return self.prefix + f".{int(at % 1 * 1000):03d}Z"


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
    return format_line(
        (at, agent, method, service, path, status, duration, bytes_sent, attempts, reason, trace_id)
    )


def format_line(fields: Fields, clock: _Clock | None = None) -> str:
    """The JSON line of (at, agent, method, service, path, status, duration, bytes_sent,
    attempts, reason, trace_id)."""
    at, agent, method, service, path, status, duration, sent, attempts, reason, trace_id = fields
    # What json.dumps(..., separators=(",", ":")) writes for these fields, without the
    # encoder json.dumps builds on every call (most of a line's cost).
    return (
        '{"time":"'
        + (clock or _Clock()).format(at)
        + '","agent":'
        + _string(agent)
        + ',"method":'
        + _quote(method)
        + ',"service":'
        + _string(service)
        + ',"path":'
        + _quote(path)
        + ',"status":'
        + str(status)
        + ',"duration_ms":'
        + repr(round(duration * 1000, 3))
        + ',"bytes_sent":'
        + str(sent)
        + ',"upstream_attempts":'
        + str(attempts)
        + ',"reason":'
        + _string(reason)
        + ',"trace_id":'
        + _string(trace_id)
        + "}"
    )


def _string(value: str | None) -> str:
    return "null" if value is None else _quote(value)


class Writer:
    """Writes the access lines from its own thread; `stop` writes what is left."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        # A tuple of fields from the request path, a formatted line from the logger, or
        # None: stop. SimpleQueue.put never blocks and takes no Python-level lock.
        self.queue: queue.SimpleQueue[Fields | str | None] = queue.SimpleQueue()
        self._clock = _Clock()
        # Not `_thread`: mypyc would name the C field `__thread`, a C keyword.
        self._worker = threading.Thread(target=self._run, name="sidecar-access", daemon=True)
        self._worker.start()

    def put(self, fields: Fields) -> None:
        self.queue.put(fields)

    def _run(self) -> None:
        get = self.queue.get
        clock = self._clock
        while True:
            items = [get()]
            try:
                while len(items) < BATCH:
                    items.append(get(block=False))
            except queue.Empty:
                pass
            lines = []
            stopping = False
            for item in items:
                if item is None:
                    stopping = True
                elif isinstance(item, str):
                    lines.append(item + "\n")
                else:
                    lines.append(format_line(item, clock) + "\n")
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # stdout closed (a pipe gone): nothing to tell, nowhere to tell it
            if stopping:
                return
            # Let lines gather: a busy sidecar's are then written hundreds at a time, not
            # one write, one flush and one thread switch each.
            time.sleep(PAUSE)

    def stop(self) -> None:
        global writer
        if writer is self:
            writer = None
        self.queue.put(None)
        self._worker.join()


def configure(stream: IO[str] | None = None) -> Writer:
    """Send the access lines, bare, to stdout (or `stream`) from a writer thread.

    The caller stops the returned writer at shutdown, which writes what is queued.
    """
    # Interpreted (this module is compiled): logging keeps a weak reference to every
    # handler, which a compiled class's instances do not clear when they are freed, and
    # logging.shutdown() then follows it at exit (a segfault).
    from .access_handler import ToWriter

    global writer
    started = Writer(stream or sys.stdout)
    log.handlers[:] = [ToWriter(started.queue)]
    log.setLevel(logging.INFO)  # independent of --log-level: asking for the log means INFO
    log.propagate = False  # the lines are data for stdout, not diagnostics for stderr
    writer = started
    return started
