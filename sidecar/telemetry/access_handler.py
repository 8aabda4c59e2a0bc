"""The logging handler that sends what other code logs on "sidecar.access" to the access
log's writer thread, bare.

Its own module, left interpreted: access.py is compiled by mypyc, and logging keeps a
weak reference to every handler that a compiled class's instance does not clear when
it is freed, so logging.shutdown() would follow a dangling reference at exit.
"""

from __future__ import annotations

import logging
import queue
from typing import Any


class ToWriter(logging.Handler):
    def __init__(self, lines: queue.SimpleQueue[Any]) -> None:
        super().__init__()
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.put(record.getMessage())
