"""LLM awareness: token usage of OpenAI- and Anthropic-compatible services.

For a service with an `llm:` block (every LLM template sets one), each POST
is looked at twice:

- the request: its JSON body names the model (`model`; Azure's deployment
  or Gemini's `models/NAME:` in the path otherwise). A body sent without
  Content-Length, or larger than 1 MiB, is not read: its model is "unknown".
  With `stream_usage`, an OpenAI streaming request without
  `stream_options.include_usage` gets it, so its stream reports usage.
- the answer: a JSON, SSE or NDJSON answer is read as it passes to the agent
  (llm_usage.Scanner); the reply's body is a wrapper that hands each chunk on
  as it came, so a stream stays a stream, event by event.

When the answer is over (or cut short), its usage counts in
`sidecar_llm_tokens_total{service,agent,model,kind}` and goes on the server
span as OpenTelemetry GenAI attributes (`gen_ai.usage.input_tokens`, ...).
Telemetry ends that span after the body was relayed and after the reply was
released, which is when the wrapper reports.

Token limits (`rate_limit: [{tokens: ...}]`, llm_limits.py) are checked here
before the call goes on, and charged the usage when the answer is over.

In the chain it runs after the call limiters and outside retry: it sees the one
reply that reaches the agent, a call the sidecar refuses costs no body parse,
and the body it reads is the one every retry sends.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any
from urllib.parse import unquote

from ..call import Call, Handler, Reply, ReplyView, make_replayable
from ..policy.llm import LLM
from ..policy.loader import ServicePolicy
from ..state import StateBuild
from .llm_limits import Charge, Clock, Sleep, TokenLimit, admit, settle
from .llm_usage import MAX_MODEL, Scanner, Usage, kind_of
from .operation import annotate, endpoint

UNKNOWN_MODEL = "unknown"

# The model when the body does not name it: an Azure deployment, a Gemini model.
_PATH_MODEL = re.compile(r"/deployments/([^/]+)/|/models/([^/:]+):")

# GenAI operation names (gen_ai.operation.name) by the endpoint's last segments.
_OPERATIONS = (
    ("/chat/completions", "chat"),
    ("/completions", "text_completion"),
    ("/messages", "chat"),
    ("/responses", "chat"),
    ("/embeddings", "embeddings"),
    ("/api/chat", "chat"),
    ("/api/generate", "text_completion"),
    ("/api/embed", "embeddings"),
    (":generateContent", "generate_content"),
    (":streamGenerateContent", "generate_content"),
)


def operation_name(path: str) -> str | None:
    for suffix, name in _OPERATIONS:
        if path.endswith(suffix):
            return name
    return None


class LLMStep:
    def __init__(
        self,
        *,
        service: str,
        llm: LLM,
        limits: list[TokenLimit] | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep | None = None,
    ) -> None:
        self.service = service
        self.api = llm.api
        self.provider = llm.provider or llm.api
        self.stream_usage = llm.stream_usage and llm.api == "openai"
        self.limits = limits or []
        self._clock = clock
        self._sleep = sleep or asyncio.sleep

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if call.method != "POST" or call.upgrade:
            return await next(call)
        charge: Charge = []
        if self.limits:
            charge = await admit(
                self.limits, call.agent, service=self.service, clock=self._clock, sleep=self._sleep
            )
        path = endpoint(call.target)
        model = await self._request_model(call, path)
        attributes: dict[str, str | int | bool] = {
            "gen_ai.system": self.provider,
            "gen_ai.provider.name": self.provider,
        }
        operation = operation_name(path)
        if operation is not None:
            attributes["gen_ai.operation.name"] = operation
        if model is not None:
            attributes["gen_ai.request.model"] = model
        annotate(call, attributes)
        reply = await next(call)
        if not 200 <= reply.status < 300 or reply.body is None:
            return reply
        headers = reply.headers
        kind = kind_of(headers.get("Content-Type"))
        encoding = (headers.get("Content-Encoding") or "identity").strip().lower()
        if kind is None or encoding not in ("identity", "gzip", "x-gzip", "deflate"):
            return reply
        meter = _Meter(self.service, call, model, Scanner(kind, encoding=encoding), charge)
        return MeteredReply(reply, meter)

    async def _request_model(self, call: Call, path: str) -> str | None:
        model: str | None = None
        if await make_replayable(call) and isinstance(call.body, bytes):
            body = call.body
            doc = _parse(body) if body[:1] in (b"{", b" ", b"\n", b"\r", b"\t") else None
            if isinstance(doc, dict):
                found = doc.get("model")
                if isinstance(found, str) and found:
                    model = found[:MAX_MODEL]
                if self.stream_usage and _add_stream_usage(doc, path):
                    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
                    call.body = data
                    call.content_length = len(data)
        if model is None:
            match = _PATH_MODEL.search(path)
            if match is not None:
                model = unquote(match.group(1) or match.group(2))[:MAX_MODEL]
        return model


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _add_stream_usage(doc: dict[str, Any], path: str) -> bool:
    """Ask a streamed chat/text completion to report its usage; True when changed."""
    if doc.get("stream") is not True or not path.endswith("/completions"):
        return False
    options = doc.get("stream_options")
    if options is None:
        doc["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and "include_usage" not in options:
        options["include_usage"] = True
        return True
    return False  # the agent chose: include_usage false stays false


class _Meter:
    """One answer's scanner, and where its usage goes once it is over."""

    __slots__ = ("call", "charge", "done", "model", "scanner", "service")

    def __init__(
        self, service: str, call: Call, model: str | None, scanner: Scanner, charge: Charge
    ) -> None:
        self.service = service
        self.call = call
        self.model = model
        self.scanner = scanner
        self.charge = charge
        self.done = False

    def finish(self) -> None:
        if self.done:
            return
        self.done = True
        usage: Usage = self.scanner.finish()
        if not usage.known:
            return
        if self.charge:
            settle(self.charge, (usage.input or 0) + (usage.output or 0))
        call = self.call
        model = self.model or usage.model or UNKNOWN_MODEL
        attributes: dict[str, str | int | bool] = {}
        if usage.model is not None:
            attributes["gen_ai.response.model"] = usage.model
        if usage.input is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.input
        if usage.output is not None:
            attributes["gen_ai.usage.output_tokens"] = usage.output
        annotate(call, attributes)
        exchange = call.exchange
        if exchange is not None:
            exchange.telemetry.metrics.on_llm_usage(
                self.service, call.agent or "", model, usage.input, usage.output
            )


class MeteredReply(ReplyView):
    """The upstream's reply with its body read on the way; the rest delegated."""

    __slots__ = ("_meter",)

    def __init__(self, reply: Reply, meter: _Meter) -> None:
        inner = reply.body
        super().__init__(reply, body=_scanned(inner, meter) if inner is not None else None)
        self._meter = meter

    def release(self) -> Any:
        # Called once the answer was relayed or abandoned, before telemetry ends the
        # server span: an answer cut short still reports the usage seen so far.
        self._meter.finish()
        return self._reply.release()


async def _scanned(body: AsyncIterable[bytes], meter: _Meter) -> AsyncIterator[bytes]:
    feed = meter.scanner.feed
    async for data in body:
        feed(data)
        yield data
    meter.finish()


def build(
    service: ServicePolicy,
    *,
    state: StateBuild,
    clock: Clock = time.monotonic,
    sleep: Sleep | None = None,
) -> LLMStep | None:
    llm = service.spec.llm
    if llm is None:
        return None
    name = service.name
    limits: list[TokenLimit] = []
    for limit in service.spec.rate_limit:
        tokens = limit.tokens
        if tokens is None:
            continue
        # Keyed by the whole limit: an unchanged limit keeps its bucket across reloads.
        found = state.get(
            name,
            "llm-tokens",
            limit,
            lambda lim=limit, t=tokens.per_second: TokenLimit(  # type: ignore[misc]
                service=name, limit=lim, tokens=t, clock=clock
            ),
        )
        if found not in limits:
            limits.append(found)
    return LLMStep(service=name, llm=llm, limits=limits, clock=clock, sleep=sleep)
