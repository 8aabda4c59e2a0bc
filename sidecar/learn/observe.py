"""`mode: observe`: a live service whose calls are also written down as shapes, for
`sidecar learn --observed DATA_DIR`.

A line of `<data-dir>/observe/<service>.jsonl` holds the agent, method, path, the
names of the query parameters, the media types, the status, and the JSON bodies
reduced to their skeleton: every string replaced by a stand-in of its format,
every number by 0, so no value the agent or the upstream sent is ever written.
Lines go to a writer thread through a bounded queue; when it is full, a line is
dropped (and counted) rather than the call waiting.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl

from ..core.call import Call, Handler, Reply, ReplyView, make_replayable
from .samples import credential_like
from .shapes import data_key, string_format

if TYPE_CHECKING:
    from ..core.state import StateBuild
    from ..policy.loaded import ServicePolicy

log = logging.getLogger("sidecar.observe")

JSON_LIMIT = 1024 * 1024  # bodies over this are observed without their shape
_QUEUE = 10_000
_STAND_INS = {
    "uuid": "00000000-0000-0000-0000-000000000000",
    "date-time": "1970-01-01T00:00:00Z",
    "date": "1970-01-01",
    "email": "user@example.invalid",
    "uri": "https://example.invalid/",
}
_MAX_ITEMS = 3  # of an array, enough to merge its items' shapes


def skeleton(value: Any, depth: int = 0) -> Any:
    """The value's shape: its structure and key names, no value of it."""
    if depth > 16:
        return None
    if isinstance(value, dict):
        # A key that is data (an id, an e-mail address, an API key) is a value too: "0".
        return {
            "0" if data_key(str(k)) else str(k): skeleton(v, depth + 1)
            for k, v in list(value.items())[:200]
        }
    if isinstance(value, list):
        return [skeleton(v, depth + 1) for v in value[:_MAX_ITEMS]]
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0
    if isinstance(value, float):
        return 0.5
    if isinstance(value, str):
        found = string_format(value)
        return _STAND_INS.get(found, "") if found is not None else ""
    return None


def _json_media(value: str | None) -> bool:
    media = (value or "").partition(";")[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def _media(value: str | None) -> str | None:
    return (value or "").partition(";")[0].strip().lower() or None


class Writer:
    """Appends lines to one file per service, from a thread of its own."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, str] | None] = queue.Queue(_QUEUE)
        self._thread = threading.Thread(target=self._run, name="sidecar-observe", daemon=True)
        self._thread.start()

    def put(self, service: str, record: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait((service, json.dumps(record, separators=(",", ":"))))
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        files: dict[str, Any] = {}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            while (item := self._queue.get()) is not None:
                service, line = item
                out = files.get(service)
                if out is None:
                    out = files[service] = open(  # noqa: SIM115 - held open for the run
                        self.directory / f"{service}.jsonl", "a", encoding="utf-8"
                    )
                out.write(line + "\n")
                if self._queue.empty():
                    for f in files.values():
                        f.flush()
        except OSError as e:
            log.warning("mode: observe stops writing to %s: %s", self.directory, e)
        finally:
            for f in files.values():
                f.close()

    def retire(self) -> None:
        """Called when a reload drops the last service that used this writer."""
        self._queue.put(None)


class Observe:
    def __init__(self, *, service: str, writer: Writer) -> None:
        self.service = service
        self.writer = writer

    async def __call__(self, call: Call, next: Handler) -> Reply:
        path, _, raw_query = call.target.partition("?")
        names: list[str] = []
        for name, _ in parse_qsl(raw_query, keep_blank_values=True):
            if name and not credential_like(name) and name not in names:
                names.append(name)
        record: dict[str, Any] = {
            "service": self.service,
            "agent": call.agent,
            "method": call.method.upper(),
            "path": path,
            "query": names,
            "at": round(time.time(), 3),
        }
        request_type = call.headers.get("Content-Type")
        if request_type:
            record["request_type"] = _media(request_type)
        if _json_media(request_type) and await make_replayable(call, JSON_LIMIT):
            body = call.body
            if isinstance(body, bytes) and body:
                with contextlib.suppress(ValueError):
                    record["request_json"] = skeleton(json.loads(body))
        reply = await next(call)
        record["status"] = reply.status
        answer_type = reply.headers.get("Content-Type")
        if answer_type:
            record["response_type"] = _media(answer_type)
        length = reply.content_length
        if (
            reply.body is None
            or not _json_media(answer_type)
            or (length is not None and length > JSON_LIMIT)
        ):
            self.writer.put(self.service, record)
            return reply
        return ReplyView(reply, body=self._tee(reply.body, record))

    async def _tee(
        self, body: AsyncIterable[bytes], record: dict[str, Any]
    ) -> AsyncIterator[bytes]:
        kept: list[bytes] | None = []
        size = 0
        try:
            async for chunk in body:
                if kept is not None:
                    size += len(chunk)
                    if size > JSON_LIMIT:
                        kept = None
                    else:
                        kept.append(chunk)
                yield chunk
            if kept:
                with contextlib.suppress(ValueError):
                    record["response_json"] = skeleton(json.loads(b"".join(kept)))
        finally:
            self.writer.put(self.service, record)


def build(service: ServicePolicy, *, state: StateBuild) -> Observe | None:
    if service.spec.mode != "observe":
        return None
    directory = Path(state.data_dir or os.getcwd()) / "observe"
    writer = state.get("", "observe-writer", str(directory), lambda: Writer(directory))
    return Observe(service=service.name, writer=writer)
