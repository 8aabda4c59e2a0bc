"""`mode: record` and `mode: replay`: exchanges with the upstream saved as files, replayed.

Record: the call goes to the upstream as in `live`; the answer streams to the
agent unchanged while a copy (up to `max_body`) is kept, and once the
upstream's answer is whole, the exchange is written as one pretty JSON file
with sorted keys, so cassettes diff cleanly in git. An agent may hang up as
soon as it has what it waited for (an MCP client after its SSE event): the
answer is saved all the same when the upstream had sent all of it, and a
write under way is never cancelled. The step sits outside retry, the
breaker, the timeout and auth: it saves the one answer the agent got, and it
sees the call before the credential is injected. Whatever auth injected
(read back from the call once it returns, so OAuth2 and JWT tokens too) and
the `redact` headers are replaced by "[redacted]" everywhere before a byte is
written, bodies included (an upstream may echo a header).

Replay: a call is matched on method, path, query and request body (its
SHA-256, or its JSON with `ignore_json_fields` left out) and answered from the
file; SSE answers event by event at the recorded pace (or at once). Nothing
after the step runs: no credential read or injected, no upstream contacted.
It sits after the refusals, so an agent is refused as in production, and
before pause and rate limits, which guard an upstream that is not called.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote_plus

from multidict import CIMultiDict, CIMultiDictProxy

from ...core.call import Call, Handler, Reply, ReplyView, StaticReply, make_replayable
from ...core.headers import HOP_BY_HOP
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.cloud import AwsSigV4Auth
from ...policy.loaded import ServicePolicy
from ...policy.models import BasicAuth, BearerAuth, HeaderAuth, QueryAuth
from ...policy.testing import Cassettes
from ..credentials.auth import header_name
from ..operation import annotate

log = logging.getLogger("sidecar.cassette")

REPLAY_HEADER = "X-Sidecar-Replay"
REDACTED = "[redacted]"
# Largest request body read to match a call (a larger one is never recorded).
REQUEST_LIMIT = 8 << 20
_NOT_KEPT = HOP_BY_HOP | {"content-length"}
_SSE_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_SLUG = re.compile(r"[^A-Za-z0-9._-]+")
# Cassettes written by this process, per directory: `sidecar record` reports them at exit.
WRITTEN: dict[str, int] = {}


# -- what is written -------------------------------------------------------------------


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


# How an upstream may have written its JSON: (separators name, separators, indent).
# Pretty ones (Flask's, many APIs') are kept parsed too, so they diff line by line.
_JSON_STYLES: tuple[tuple[str, tuple[str, str], int | None], ...] = (
    ("spaced", (", ", ": "), None),
    ("compact", (",", ":"), None),
    ("spaced", (",", ": "), 2),
    ("spaced", (",", ": "), 4),
)


def _encode_body(data: bytes, out: dict[str, Any], *, exact: bool) -> None:
    """Put `data` into `out` as readably as it allows: JSON, text or base64.

    An answer must be replayed byte for byte: its JSON is kept parsed only when
    a plain re-serialization gives back the same bytes, else it is kept as text.
    """
    text = _text(data)
    if text is None:
        out["body_base64"] = base64.b64encode(data).decode("ascii")
        return
    try:
        value = json.loads(text)
    except ValueError:
        value = None
    else:
        if not exact:
            out["body_json"] = value
            return
        newline = text.endswith("\n")
        for style, separators, indent in _JSON_STYLES:
            for ascii_only in (True, False):
                again = json.dumps(
                    value, separators=separators, ensure_ascii=ascii_only, indent=indent
                )
                if again + ("\n" if newline else "") == text:
                    out["body_json"] = value
                    found: dict[str, Any] = {"separators": style, "ascii": ascii_only}
                    if indent is not None:
                        found["indent"] = indent
                    if newline:
                        found["newline"] = True
                    out["json_style"] = found
                    return
    out["body"] = text


def _decode_body(stored: dict[str, Any]) -> bytes:
    if "body_base64" in stored:
        return base64.b64decode(stored["body_base64"])
    if "body_json" in stored:
        style = stored.get("json_style") or {}
        indent = style.get("indent")
        if style.get("separators") == "compact":
            separators = (",", ":")
        else:
            separators = (",", ": ") if indent is not None else (", ", ": ")
        text = json.dumps(
            stored["body_json"],
            separators=separators,
            ensure_ascii=style.get("ascii", True),
            indent=indent,
        )
        if style.get("newline"):
            text += "\n"
        return text.encode()
    body = stored.get("body")
    return body.encode() if isinstance(body, str) else b""


def _drop_fields(value: Any, fields: list[str]) -> Any:
    for field in fields:
        *parents, last = field.split(".")
        node = value
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(last, None)
    return value


def _match_form(data: bytes | None, ignore: list[str]) -> str:
    """What two request bodies must share to match: their hash, or their JSON less `ignore`."""
    data = data or b""
    if ignore:
        try:
            value = json.loads(data)
        except ValueError:
            pass
        else:
            value = _drop_fields(value, ignore)
            return "json:" + json.dumps(value, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(data).hexdigest()


class _Scrub:
    """Replaces the credential's values (and their encoded spellings) in text."""

    def __init__(self, secrets: set[str]) -> None:
        found: set[str] = set()
        for secret in secrets:
            if len(secret) < 4:  # a 1-3 character "secret" would shred every body
                continue
            found.add(secret)
            found.add(quote(secret, safe=""))
            found.add(json.dumps(secret)[1:-1])
        self.secrets = sorted(found, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        return text

    def deep(self, value: Any) -> Any:
        if isinstance(value, str):
            return self(value)
        if isinstance(value, list):
            return [self.deep(v) for v in value]
        if isinstance(value, dict):
            return {self(k): self.deep(v) for k, v in value.items()}
        return value

    def bytes(self, data: bytes) -> bytes:
        if not self.secrets:
            return data
        for secret in self.secrets:
            raw = secret.encode()
            if raw in data:
                data = data.replace(raw, REDACTED.encode())
        return data


def _split_query(target: str, drop: str | None) -> tuple[str, str]:
    path, _, query = target.partition("?")
    if drop and query:
        # The agent's own value of the credential's parameter is never the upstream's.
        query = "&".join(p for p in query.split("&") if unquote_plus(p.partition("=")[0]) != drop)
    return path, query


def _prefix(method: str, path: str, query: str) -> str:
    slug = _SLUG.sub("_", path).strip("_")[:60] or "root"
    where = hashlib.sha256(f"{method} {path}?{query}".encode()).hexdigest()[:10]
    return f"{method}-{slug}-{where}"


def _sorted(value: Any) -> Any:
    """The file's own keys sorted, so cassettes diff cleanly; a JSON body's keys stay in
    the upstream's order, so it re-serializes to the very bytes it came as."""
    if isinstance(value, dict):
        return {k: (v if k == "body_json" else _sorted(v)) for k, v in sorted(value.items())}
    if isinstance(value, list):
        return [_sorted(v) for v in value]
    return value


def _write(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_sorted(record), indent=2, ensure_ascii=False) + "\n"
    # Two identical calls at once each write their own file; the last one stays.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _read_candidates(directory: Path, prefix: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        names = sorted(p for p in directory.glob(f"{prefix}-*.json"))
    except OSError:
        return out
    for name in names:
        try:
            record = json.loads(name.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            log.warning("cassette %s cannot be read; skipped", name)
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


# -- record ----------------------------------------------------------------------------


class _Tape:
    """The answer's copy as it streams: its bytes, and SSE events with their offsets."""

    def __init__(self, limit: int, sse: bool) -> None:
        self.limit = limit
        self.sse = sse
        self.size = 0
        self.chunks: list[bytes] = []
        self.whole = True
        self.started = time.monotonic()
        self.pending = b""
        self.events: list[tuple[float, bytes]] = []

    def feed(self, data: bytes) -> None:
        if not self.whole:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.whole = False
            self.chunks = []
            self.events = []
            return
        self.chunks.append(data)
        if self.sse:
            at = time.monotonic() - self.started
            self.pending += data
            while (m := _SSE_END.search(self.pending)) is not None:
                self.events.append((at, self.pending[: m.end()]))
                self.pending = self.pending[m.end() :]

    def end(self) -> None:
        if self.sse and self.pending:
            self.events.append((time.monotonic() - self.started, self.pending))
            self.pending = b""


class _Recording:
    """One exchange on its way to a cassette: saved once, when the upstream's answer is whole."""

    __slots__ = ("reply", "request", "saved", "scrub", "step", "tape", "target")

    def __init__(
        self,
        step: CassetteStep,
        target: Path,
        request: dict[str, Any],
        reply: Reply,
        tape: _Tape,
        scrub: _Scrub,
    ) -> None:
        self.step = step
        self.target = target
        self.request = request
        self.reply = reply
        self.tape = tape
        self.scrub = scrub
        self.saved = False

    async def save(self) -> None:
        if self.saved:
            return
        self.saved = True
        self.tape.end()
        await self.step._save(self.target, self.request, self.reply, self.tape, self.scrub)

    async def copied(self, body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
        length = self.reply.content_length
        async for data in body:
            self.tape.feed(data)
            if length is not None and self.tape.size == length:
                # Saved before its last bytes go out: an agent that has its whole answer
                # may hang up at once, and the relay then never asks for the stream's end.
                await self.save()
            yield data
        # Only an answer that reached its end is saved: a cut one would replay as whole.
        await self.save()

    def on_release(self) -> None:
        """The agent is done with the answer, maybe before the relay read its end (an MCP
        client hangs up once it has the SSE event it waited for): if the upstream's whole
        answer has arrived, what is still buffered completes the tape and it is saved."""
        if self.saved:
            return
        body = self.reply.body
        take_all = getattr(body, "take_all", None)
        if take_all is None or not getattr(body, "complete", False):
            return  # cut short: not saved
        self.tape.feed(take_all())
        self.step._background(self.save())


class RecordedReply(ReplyView):
    """The upstream's reply, its body copied on the way; the cassette written at its end."""

    __slots__ = ("_recording",)

    def __init__(self, reply: Reply, recording: _Recording) -> None:
        assert reply.body is not None
        super().__init__(reply, body=recording.copied(reply.body))
        self._recording = recording

    def release(self) -> Any:
        self._recording.on_release()
        return self._reply.release()


# -- replay ----------------------------------------------------------------------------


class ReplayedReply:
    """A recorded SSE answer, sent event by event."""

    __slots__ = ("_events", "_paced", "headers", "reason", "status")

    content_length = None

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str],
        events: list[tuple[float, bytes]],
        *,
        paced: bool,
        reason: str | None,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = CIMultiDictProxy(headers)
        self._events = events
        self._paced = paced

    @property
    def body(self) -> AsyncIterable[bytes] | None:
        return self._play() if self._events else None

    async def _play(self) -> AsyncIterator[bytes]:
        started = time.monotonic()
        for at, data in self._events:
            if self._paced:
                wait = at - (time.monotonic() - started)
                if wait > 0:
                    await asyncio.sleep(wait)
            yield data

    def release(self) -> None:
        return None


# -- the step --------------------------------------------------------------------------


class CassetteStep:
    def __init__(
        self,
        *,
        service: str,
        mode: str,
        directory: Path,
        settings: Cassettes,
        auth_header: str | None,
        auth_query: str | None,
        static_secrets: set[str],
    ) -> None:
        self.service = service
        self.mode = mode
        self.directory = directory
        self.settings = settings
        self.auth_header = auth_header
        self.auth_query = auth_query
        self.static_secrets = static_secrets
        redact = {h.lower() for h in settings.redact}
        if auth_header:
            redact.add(auth_header.lower())
        self.redact = frozenset(redact)
        self._saving: set[asyncio.Task[None]] = set()

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if call.upgrade:
            # A WebSocket becomes a tunnel after its 101: there is no answer to save.
            if self.mode == "replay":
                path, query = _split_query(call.target, self.auth_query)
                return await self._missing(call, next, call.method, path, query, None)
            return await next(call)
        if self.mode == "replay":
            return await self._replay(call, next)
        return await self._record(call, next)

    # record

    async def _record(self, call: Call, next: Handler) -> Reply:
        method = call.method
        path, query = _split_query(call.target, self.auth_query)
        kept = await make_replayable(call, REQUEST_LIMIT)
        body = call.body if kept and isinstance(call.body, bytes) else None
        request_headers = CIMultiDict(call.headers)
        reply = await next(call)
        if not kept:
            log.warning(
                "service %s: %s %s not recorded: its body is streamed or over %d bytes",
                self.service,
                method,
                path,
                REQUEST_LIMIT,
            )
            return reply
        # After the chain returned, the call holds what auth injected: a token that
        # was minted for this call is known only now.
        secrets = set(self.static_secrets)
        if self.auth_header and (value := call.headers.get(self.auth_header)):
            secrets.add(value)
            secrets.add(value.partition(" ")[2])
        if self.auth_query:
            for pair in call.target.partition("?")[2].split("&"):
                name, _, value = pair.partition("=")
                if unquote_plus(name) == self.auth_query and value:
                    secrets.add(unquote_plus(value))
        for name in self.redact:
            secrets.update(v for v in request_headers.getall(name, ()) if v)
        scrub = _Scrub(secrets)
        request = self._request_record(method, path, query, body, request_headers, scrub)
        if call.agent:
            # Who made the call, for `sidecar learn`'s allow rules; not part of the match.
            request["agent"] = call.agent
        content_type = reply.headers.get("Content-Type", "")
        sse = content_type.partition(";")[0].strip().lower() == "text/event-stream"
        tape = _Tape(self.settings.max_body, sse)
        name = f"{_prefix(method, path, query)}-{request['match'][-12:]}.json"
        target = self.directory / name
        recording = _Recording(self, target, request, reply, tape, scrub)
        if reply.body is None:
            await recording.save()
            return reply
        return RecordedReply(reply, recording)

    def _request_record(
        self,
        method: str,
        path: str,
        query: str,
        body: bytes | None,
        headers: CIMultiDict[str],
        scrub: _Scrub,
    ) -> dict[str, Any]:
        ignore = self.settings.match.ignore_json_fields
        out: dict[str, Any] = {
            "method": method,
            "path": path,
            "query": scrub(query),
            "body_sha256": hashlib.sha256(body or b"").hexdigest(),
            "match": hashlib.sha256(_match_form(body, ignore).encode()).hexdigest(),
        }
        if content_type := headers.get("Content-Type"):
            out["content_type"] = scrub(content_type)
        if body:
            _encode_body(scrub.bytes(body), out, exact=False)
        return out

    def _background(self, save: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(save)
        # Held until done: the loop keeps only a weak reference to a task.
        self._saving.add(task)
        task.add_done_callback(self._saving.discard)

    async def _save(
        self,
        target: Path,
        request: dict[str, Any],
        reply: Reply,
        tape: _Tape,
        scrub: _Scrub,
    ) -> None:
        if not tape.whole:
            log.warning(
                "service %s: %s %s not recorded: its answer is over max_body (%d bytes)",
                self.service,
                request["method"],
                request["path"],
                self.settings.max_body,
            )
            return
        headers: list[list[str]] = []
        for name, value in reply.headers.items():
            if name.lower() in _NOT_KEPT:
                continue
            headers.append([name, REDACTED if name.lower() in self.redact else scrub(value)])
        response: dict[str, Any] = {"status": reply.status, "headers": headers}
        if reply.reason:
            response["reason"] = reply.reason
        data = scrub.bytes(b"".join(tape.chunks))
        events = [(at, scrub.bytes(chunk)) for at, chunk in tape.events]
        texts = [_text(chunk) for _, chunk in events]
        if tape.sse and events and all(t is not None for t in texts):
            response["events"] = [
                {"at": round(at, 4), "data": text}
                for (at, _), text in zip(events, texts, strict=True)
            ]
        elif data:
            _encode_body(data, response, exact=True)
        record = {"request": request, "response": response}
        # Shielded: an agent that hangs up once it has its answer cancels this task, and
        # a write still queued for a worker thread would then be dropped.
        write = asyncio.get_running_loop().run_in_executor(None, _write, target, record)
        # Counted when the write ends, which may be after this task was cancelled.
        write.add_done_callback(lambda done: self._written(target, done))
        try:
            await asyncio.shield(write)
        except OSError as e:
            log.warning("service %s: cassette %s not written: %s", self.service, target, e)

    def _written(self, target: Path, done: asyncio.Future[None]) -> None:
        if done.cancelled() or done.exception() is not None:
            return
        where = str(target.parent)
        WRITTEN[where] = WRITTEN.get(where, 0) + 1
        log.info("service %s: recorded %s", self.service, target)

    # replay

    async def _replay(self, call: Call, next: Handler) -> Reply:
        method = call.method
        path, query = _split_query(call.target, self.auth_query)
        if not await make_replayable(call, REQUEST_LIMIT):
            # A streamed or large body is never recorded (see _record), so nothing can
            # match it; it is not read, so passthrough can still send it.
            return await self._missing(call, next, method, path, query, None)
        body = call.body if isinstance(call.body, bytes) else None
        ignore = self.settings.match.ignore_json_fields
        wanted = hashlib.sha256(_match_form(body, ignore).encode()).hexdigest()
        candidates = await asyncio.to_thread(
            _read_candidates, self.directory, _prefix(method, path, query)
        )
        for record in candidates:
            request = record.get("request") or {}
            if request.get("method") != method or request.get("path") != path:
                continue
            if request.get("query") != query:
                continue
            if self._match(request, ignore) == wanted:
                annotate(call, {"sidecar.replay": True})
                return self._answer(record.get("response") or {})
        return await self._missing(call, next, method, path, query, body)

    async def _missing(
        self, call: Call, next: Handler, method: str, path: str, query: str, body: bytes | None
    ) -> Reply:
        if self.settings.on_missing == "passthrough":
            return await next(call)
        size = f"{len(body)} bytes" if body is not None else "a streamed or large body"
        raise ProblemError(
            Reason.no_recording,
            f"Service '{self.service}' is in replay mode and no recording in "
            f"{self.directory.name}/ matches {method} {path}"
            + (f"?{query}" if query else "")
            + f" with a request body of {size}; record it with mode: record.",
            service=self.service,
            headers={REPLAY_HEADER: "true"},
        )

    @staticmethod
    def _match(request: dict[str, Any], ignore: list[str]) -> str:
        if ignore and "body_json" in request:
            value = _drop_fields(request["body_json"], ignore)
            form = "json:" + json.dumps(value, sort_keys=True, separators=(",", ":"))
            return hashlib.sha256(form.encode()).hexdigest()
        digest = request.get("body_sha256", "")
        return hashlib.sha256(f"sha256:{digest}".encode()).hexdigest()

    def _answer(self, response: dict[str, Any]) -> Reply:
        headers: CIMultiDict[str] = CIMultiDict()
        for pair in response.get("headers") or []:
            if isinstance(pair, list) and len(pair) == 2:
                headers.add(str(pair[0]), str(pair[1]))
        headers[REPLAY_HEADER] = "true"
        status = int(response.get("status", 200))
        reason = response.get("reason")
        events = response.get("events")
        if isinstance(events, list):
            played = [(float(e.get("at", 0.0)), str(e.get("data", "")).encode()) for e in events]
            paced = self.settings.pacing == "recorded"
            return ReplayedReply(status, headers, played, paced=paced, reason=reason)
        return StaticReply(status, headers, _decode_body(response), reason=reason)


def _static_secrets(service: ServicePolicy) -> set[str]:
    auth = service.spec.auth
    out: set[str] = set()
    if isinstance(auth, BearerAuth):
        out.add(auth.token.reveal())
    elif isinstance(auth, HeaderAuth | QueryAuth):
        out.add(auth.value.reveal())
    elif isinstance(auth, BasicAuth):
        user, password = auth.username.reveal(), auth.password.reveal()
        out.update((password, base64.b64encode(f"{user}:{password}".encode()).decode()))
    elif isinstance(auth, AwsSigV4Auth):
        for secret in (auth.secret_access_key, auth.session_token):
            if secret is not None:
                out.add(secret.reveal())
    return out


def announce(services: list[ServicePolicy]) -> None:
    """Where each recording or replaying service keeps its cassettes, logged at start."""
    for service in services:
        mode = service.spec.mode
        if mode == "record":
            log.info("service %s records its cassettes to %s", service.name, directory(service))
        elif mode == "replay":
            found = directory(service)
            count = len(list(found.glob("*.json"))) if found.is_dir() else 0
            log.info("service %s replays %d cassettes from %s", service.name, count, found)


def written_summary(services: list[ServicePolicy]) -> list[str]:
    """What recording services wrote in this process: one line per service, at exit."""
    lines = []
    for service in services:
        if service.spec.mode == "record":
            where = directory(service)
            count = WRITTEN.get(str(where), 0)
            lines.append(f"service {service.name}: wrote {count} cassette(s) to {where}")
    return lines


def directory(service: ServicePolicy) -> Path:
    settings = service.spec.cassettes
    base = Path(service.position.file).resolve().parent
    if settings is not None and settings.dir is not None:
        return base / settings.dir
    return base / "cassettes" / service.name


def build(service: ServicePolicy, *, state: StateBuild) -> CassetteStep | None:
    spec = service.spec
    if spec.mode not in ("record", "replay"):
        return None
    auth = spec.auth
    return CassetteStep(
        service=service.name,
        mode=spec.mode,
        directory=directory(service),
        settings=spec.cassettes or Cassettes(),
        auth_header=header_name(service),
        auth_query=auth.name if isinstance(auth, QueryAuth) else None,
        static_secrets=_static_secrets(service),
    )
