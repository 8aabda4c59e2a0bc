"""What `sidecar learn` learns from: one `Sample` per observed call, read from
cassettes (`mode: record`), the JSON access log, or `mode: observe` files.

A sample holds the call's shape only: method, path, the names of its query
parameters (never their values), the JSON of its bodies where the source kept
them, and the answer's status. Query parameters named like credentials are
dropped as they are read, so nothing downstream can write them out.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final
from urllib.parse import parse_qsl

# No body, or a body that was not JSON: distinct from a JSON `null`.
NO_JSON: Final = object()

_CREDENTIAL_NAME = re.compile(
    r"(^|[_-])(api[_-]?key|key|token|access[_-]?token|secret|password|passwd|sig|signature|"
    r"auth|authorization|session|code|client[_-]?secret)($|[_-])|^x-amz-|^x-goog-",
    re.I,
)


def credential_like(name: str) -> bool:
    """A query parameter (or header) name that may carry a credential: its name is kept
    out of learned documents, and its value is never read."""
    return _CREDENTIAL_NAME.search(name) is not None


@dataclass(frozen=True, slots=True)
class Sample:
    service: str
    agent: str | None
    method: str
    path: str  # after the service's prefix, no query
    query: tuple[str, ...] = ()  # parameter names, credential-like ones left out
    request_type: str | None = None
    request_json: Any = NO_JSON
    status: int | None = None
    response_type: str | None = None
    response_json: Any = NO_JSON
    at: float | None = None  # seconds since the epoch, when the source says


def _media(value: str | None) -> str | None:
    if not value:
        return None
    return value.partition(";")[0].strip().lower() or None


def _query_names(query: str) -> tuple[str, ...]:
    names: list[str] = []
    for name, _ in parse_qsl(query, keep_blank_values=True):
        if name and not credential_like(name) and name not in names:
            names.append(name)
    return tuple(names)


def _header(headers: Any, name: str) -> str | None:
    for pair in headers or ():
        if isinstance(pair, list) and len(pair) == 2 and str(pair[0]).lower() == name:
            return str(pair[1])
    return None


def _body_json(stored: dict[str, Any]) -> Any:
    if "body_json" in stored:
        return stored["body_json"]
    if "body" in stored and isinstance(stored["body"], str):
        try:
            return json.loads(stored["body"])
        except ValueError:
            return NO_JSON
    return NO_JSON


def _sse_json(events: Any) -> Any:
    """The JSON of an SSE answer's events (an array of them), for its schema."""
    values: list[Any] = []
    for event in events or ():
        for line in str(event.get("data", "")).splitlines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if data and data != "[DONE]":
                    with contextlib.suppress(ValueError):
                        values.append(json.loads(data))
    return values if values else NO_JSON


def read_cassettes(root: Path, service: str | None = None) -> Iterator[Sample]:
    """Cassettes of one service (a directory of exchange files, named by `service` or
    by the directory) or of many (a directory of such directories, `cassettes/`)."""
    files = sorted(root.glob("*.json"))
    if files:
        yield from _cassette_files(files, service or root.name)
        return
    for directory in sorted(p for p in root.iterdir() if p.is_dir()):
        if service is None or directory.name == service:
            yield from _cassette_files(sorted(directory.glob("*.json")), directory.name)


def _cassette_files(files: list[Path], service: str) -> Iterator[Sample]:
    for file in files:
        try:
            record = json.loads(file.read_text(encoding="utf-8"))
            request, response = record["request"], record["response"]
            method, path = str(request["method"]).upper(), str(request["path"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        response_type = _media(_header(response.get("headers"), "content-type"))
        answer = _sse_json(response["events"]) if "events" in response else _body_json(response)
        yield Sample(
            service=service,
            agent=request.get("agent"),
            method=method,
            path=path,
            query=_query_names(str(request.get("query") or "")),
            request_type=_media(request.get("content_type")),
            request_json=_body_json(request),
            status=response.get("status"),
            response_type=response_type,
            response_json=answer,
            at=file.stat().st_mtime,
        )


def _iso(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        return time.mktime(time.strptime(value[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    except ValueError:
        return None


def read_access_log(log: Path, prefixes: dict[str, str] | None = None) -> Iterator[Sample]:
    """The sidecar's JSON access log (`--access-log`): no bodies or query, but the agent.
    Its paths hold the service's prefix (`/<service>` unless `prefixes` says otherwise),
    which is taken off."""
    with log.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue
            service, method = record.get("service"), record.get("method")
            # A call the sidecar refused before any service matched is no API's call.
            if not service or not method or record.get("reason") == "no_route":
                continue
            path = str(record.get("path") or "/").split("?", 1)[0]
            prefix = (prefixes or {}).get(str(service), f"/{service}").rstrip("/")
            if prefix and (path == prefix or path.startswith(prefix + "/")):
                path = path[len(prefix) :] or "/"
            yield Sample(
                service=str(service),
                agent=record.get("agent"),
                method=str(method).upper(),
                path=path,
                status=record.get("status"),
                at=_iso(record.get("time")),
            )


def read_observed(directory: Path) -> Iterator[Sample]:
    """`mode: observe` files (<data-dir>/observe/<service>.jsonl): shapes only."""
    root = directory / "observe" if (directory / "observe").is_dir() else directory
    for file in sorted(root.glob("*.jsonl")):
        with file.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                try:
                    r = json.loads(line)
                    yield Sample(
                        service=str(r["service"]),
                        agent=r.get("agent"),
                        method=str(r["method"]).upper(),
                        path=str(r["path"]),
                        query=tuple(n for n in r.get("query", ()) if not credential_like(n)),
                        request_type=r.get("request_type"),
                        request_json=r.get("request_json", NO_JSON),
                        status=r.get("status"),
                        response_type=r.get("response_type"),
                        response_json=r.get("response_json", NO_JSON),
                        at=r.get("at"),
                    )
                except (ValueError, KeyError, TypeError):
                    continue
