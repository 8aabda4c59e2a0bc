"""Inbound webhooks: verify, deduplicate, route, store; 2xx only once stored.

An `Ingress` is compiled from the policy at load: per path, an `InboundHook`
with its verifier, routes and limits. The listener hands it the path, the
headers and the body, and sends back the `Result`. Refusals are counted and
logged with the webhook's name and the reason only: never the body, never a
header value, never the secret.
"""

from __future__ import annotations

import collections
import fnmatch
import json
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from ..core.reasons import Reason
from ..policy.webhooks import InboundWebhook, Match, ValueMatch, Webhooks
from .answers import Result, accepted, refused
from .queue import SUBSCRIPTION, Direction, Queue, StoreUnavailable, Target
from .signatures import SignatureError, build_verifier, lower_headers

log = logging.getLogger("sidecar.webhooks")

Headers = Mapping[str, str] | list[tuple[str, str]]
Test = Callable[[Any], bool]
MISSING = object()
# Stored with the event and replayed to local targets; what a sender put there to
# authenticate to us is not for them, and not for the database.
_NOT_STORED = frozenset(
    {"authorization", "cookie", "proxy-authorization", "host", "content-length", "connection"}
)


def compile_test(spec: ValueMatch, *, as_text: bool) -> Test:
    """A value test; `as_text` for headers and event types, which are always strings."""
    if spec.glob is not None:
        glob = spec.glob
        return lambda v: isinstance(v, str) and fnmatch.fnmatchcase(v, glob)
    wanted = [spec.equals] if spec.one_of is None else list(spec.one_of)
    if as_text:
        texts = {_text(w) for w in wanted}
        return lambda v: isinstance(v, str) and v in texts
    # JSON values: 1 == true in Python, not in JSON, so the types must agree too.
    pairs = [(type(w), w) for w in wanted]
    return lambda v: any(type(v) is t and v == w for t, w in pairs)


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resolve_pointer(document: Any, pointer: str) -> Any:
    """RFC 6901; `MISSING` when the pointer leads nowhere."""
    if pointer == "":
        return document
    node = document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            node = node.get(token, MISSING)
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return MISSING
        if node is MISSING:
            return MISSING
    return node


class CompiledRoute:
    __slots__ = ("event", "headers", "name", "pointers", "targets")

    def __init__(self, name: str, match: Match, deliver_to: list[str]) -> None:
        self.name = name
        self.headers = [(h.lower(), compile_test(t, as_text=True)) for h, t in match.header.items()]
        self.event = None if match.event is None else compile_test(match.event, as_text=True)
        self.pointers = [(p, compile_test(t, as_text=False)) for p, t in match.pointer.items()]
        self.targets = deliver_to

    def matches(self, headers: Mapping[str, str], event_type: str | None, body: _Body) -> bool:
        if self.event is not None and not self.event(event_type):
            return False
        for name, test in self.headers:
            if not test(headers.get(name)):
                return False
        return all(test(resolve_pointer(body.json(), p)) for p, test in self.pointers)


class _Body:
    """The body parsed as JSON once, and only when a route asks for it."""

    __slots__ = ("_parsed", "raw")

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self._parsed: Any = MISSING

    def json(self) -> Any:
        if self._parsed is MISSING:
            try:
                self._parsed = json.loads(self.raw)
            except (ValueError, UnicodeDecodeError):
                self._parsed = None
        return self._parsed


class InboundHook:
    """One `webhooks.inbound.<name>`, ready to receive."""

    def __init__(
        self, name: str, spec: InboundWebhook, *, store: Queue, clock: Callable[[], float]
    ) -> None:
        self.name = name
        self.path = spec.path
        self.max_body = spec.max_body
        self.subscribe = spec.subscribe
        self._store = store
        self._verifier = build_verifier(spec.verify, clock=clock)
        self._dedup_window = spec.dedup_window
        self._first_in = spec.retry.schedule[0]
        self._slack = spec.verify.type == "slack"
        self._routes = [
            CompiledRoute(r.name or f"route-{i}", r.match, r.deliver_to)
            for i, r in enumerate(spec.routes, 1)
        ]
        # outcome -> count: accepted, duplicate, unrouted, and each refusal reason.
        self.counts: collections.Counter[str] = collections.Counter()

    def route(
        self, headers: Mapping[str, str], event_type: str | None, body: bytes
    ) -> list[Target]:
        """The targets of every matching route, each once, in policy order."""
        parsed = _Body(body)
        urls: dict[str, None] = {}
        for route in self._routes:
            if route.matches(headers, event_type, parsed):
                urls.update(dict.fromkeys(route.targets))
        return [Target(endpoint=url, url=url) for url in urls]

    def _refuse(self, reason: str, detail: str, counted_as: str) -> Result:
        self.counts[counted_as] += 1
        log.info("inbound webhook %s refused: %s", self.name, counted_as)
        return refused(reason, detail, self.name, counted_as)

    async def receive(self, headers: Headers, body: bytes) -> Result:
        if len(body) > self.max_body:
            return self._refuse(
                Reason.request_too_large,
                f"the body is over this webhook's limit of {self.max_body} bytes",
                "request_too_large",
            )
        lowered = lower_headers(headers)
        try:
            verified = self._verifier.verify(lowered, body)
        except SignatureError as exc:
            return self._refuse(Reason.unauthenticated, exc.detail, exc.failure.value)
        if self._slack and (challenge := _slack_challenge(body)) is not None:
            return challenge
        targets = self.route(lowered, verified.event_type, body)
        if self.subscribe:
            targets.append(_SUBSCRIBED)
        try:
            result = await self._store.accept(
                direction=Direction.inbound,
                source=self.name,
                event_type=verified.event_type,
                headers=[(k, v) for k, v in lowered.items() if k not in _NOT_STORED],
                body=body,
                targets=targets,
                dedup_id=verified.delivery_id,
                dedup_window=self._dedup_window,
                first_attempt_in=self._first_in,
            )
        except StoreUnavailable as unavailable:  # not `exc`: compiled, it keeps one type
            log.error("inbound webhook %s: cannot store the event: %s", self.name, unavailable)
            return self._refuse(
                Reason.store_unavailable, "the event could not be stored; send it again", "store"
            )
        outcome = "duplicate" if result.duplicate else "accepted" if targets else "unrouted"
        self.counts[outcome] += 1
        return accepted(200, result.message_id, result.duplicate, outcome)


_SUBSCRIBED = Target(endpoint=SUBSCRIPTION, url="")


def _slack_challenge(body: bytes) -> Result | None:
    """Slack checks a new Events API URL with a signed url_verification: echo its challenge."""
    if b"url_verification" not in body:
        return None
    event = _Body(body).json()
    if not isinstance(event, dict) or event.get("type") != "url_verification":
        return None
    answer = json.dumps({"challenge": event.get("challenge")}).encode()
    return Result(200, {"Content-Type": "application/json"}, answer, outcome="challenge")


async def receive(hook: InboundHook, headers: Headers, body: bytes) -> Result:
    return await hook.receive(headers, body)


class Ingress:
    """Every inbound webhook by its path; what the ingress listener serves."""

    def __init__(
        self, webhooks: Webhooks | None, *, store: Queue, clock: Callable[[], float] = time.time
    ) -> None:
        inbound = webhooks.inbound if webhooks is not None else {}
        self.hooks = {
            spec.path: InboundHook(name, spec, store=store, clock=clock)
            for name, spec in inbound.items()
        }
        self.by_name = {hook.name: hook for hook in self.hooks.values()}

    def hook_for(self, path: str) -> InboundHook | None:
        return self.hooks.get(path)

    async def handle(self, path: str, headers: Headers, body: bytes) -> Result:
        hook = self.hooks.get(path)
        if hook is None:
            return refused(Reason.no_route, "no inbound webhook is declared at this path", None)
        return await hook.receive(headers, body)
