"""LLM awareness: token usage of OpenAI- and Anthropic-compatible services.

For a service with an `llm:` block (every LLM template sets one), each POST
is looked at twice:

- the request: its JSON body names the model (`model`; Azure's deployment
  or Gemini's `models/NAME:` in the path otherwise). A body sent without
  Content-Length, or larger than 1 MiB, is not read: its model is "unknown".
  With `stream_usage`, an OpenAI streaming request without
  `stream_options.include_usage` gets it, so its stream reports usage. A
  service with a budget or a token limit asks for it on every streamed
  completion (without `stream_usage`: on the agent's behalf, and the answer
  is relayed without what that added, so the agent gets the stream it asked
  for: no usage-only chunk, no `"usage":null` member).
- the answer: a JSON, SSE or NDJSON answer is read as it passes to the agent
  (llm_usage.Scanner); the reply's body is a wrapper that hands each chunk on
  as it came, so a stream stays a stream, event by event.

When the answer is over (or cut short), its usage counts in
`sidecar_llm_tokens_total{service,agent,model,kind}` and goes on the server
span as OpenTelemetry GenAI attributes (`gen_ai.usage.input_tokens`, ...).
Telemetry ends that span after the body was relayed and after the reply was
released, which is when the wrapper reports.

Token limits (`rate_limit: [{tokens: ...}]`, llm_limits.py; in Redis with a
`backend`) and budgets (`budget:`, budget.py) are checked here before the call
goes on, and charged the usage when the answer is over. A budget's charge is
durable (the data dir, or Redis) before the answer ends: the body's end waits
for it, and a JSON answer's last chunk is held back until then, so an agent
that got its whole answer was charged for it even if the sidecar is killed.

An answer that reports no usage on such a service (an upstream that ignores
`include_usage`, a stream cut short) is estimated instead of counted as zero:
input from the characters of the request's text, output from those of the
generated text seen, one token per CHARS_PER_TOKEN characters, rounded up.

In the chain it runs after the call limiters and outside retry: it sees the one
reply that reaches the agent, a call the sidecar refuses costs no body parse,
and the body it reads is the one every retry sends.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ...core.call import Call, Handler, Reply, ReplyView, make_replayable
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...engines.ledger import Ledger, MemoryLedger
from ...engines.limits import limit_headers
from ...policy.budget import Budget
from ...policy.llm import LLM
from ...policy.loaded import ServicePolicy
from ...policy.models import RateLimit
from ..operation import annotate, endpoint
from ..resilience.ratelimit import refusal
from .budget import BudgetLimit, Pricing
from .llm_limits import Charge, Clock, Sleep, TokenLimit, admit, describe_tokens, settle
from .llm_usage import MAX_MODEL, Scanner, Usage, kind_of

if TYPE_CHECKING:
    from ...engines.limits_redis import SharedTokenLimit

log = logging.getLogger("sidecar.llm")

UNKNOWN_MODEL = "unknown"

# OpenAI's rule of thumb for English text; an estimate is only made where an answer
# reports no usage, and errs high for code and low for some other languages.
CHARS_PER_TOKEN = 4

# The request members whose text the model reads (chat, completions, Responses,
# Anthropic, Gemini): an estimate of the input counts their strings' characters.
_INPUT_KEYS = ("messages", "prompt", "input", "system", "instructions", "contents", "tools")

# Charges still being written after an answer was abandoned (see MeteredReply.release).
_charging: set[asyncio.Future[Any]] = set()

# The model when the body does not name it: an Azure deployment, a Gemini model.
_PATH_MODEL = re.compile(
    r"/deployments/([^/]+)/|/models/([^/:]+):|/model/([^/]+)/(?:invoke|converse)"
)

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
    # Bedrock: InvokeModel and Converse, streamed or not, the model in the path.
    ("/invoke", "chat"),
    ("/converse", "chat"),
    ("/invoke-with-response-stream", "chat"),
    ("/converse-stream", "chat"),
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
        shared: list[SharedTokenLimit] | None = None,
        budgets: list[BudgetLimit] | None = None,
        pricing: Pricing | None = None,
        clock: Clock = time.monotonic,
        sleep: Sleep | None = None,
    ) -> None:
        self.service = service
        self.api = llm.api
        self.provider = llm.provider or llm.api
        self.stream_usage = llm.stream_usage and llm.api == "openai"
        self.limits = limits or []
        self.shared = shared or []
        self.budgets = budgets or []
        # Every call must count: usage is asked for, and estimated where none comes.
        self.metered = bool(self.limits or self.shared or self.budgets)
        self.pricing = pricing
        self._clock = clock
        self._sleep = sleep or asyncio.sleep

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if call.method != "POST" or call.upgrade:
            return await next(call)
        agent = call.agent
        # Budgets first: a call refused for a spent budget takes no token.
        for budget in self.budgets:
            try:
                await budget.check(agent)
            except ProblemError as err:
                exchange = call.exchange
                if err.reason == Reason.budget_exhausted and exchange is not None:
                    exchange.telemetry.metrics.on_budget_exhausted(self.service, budget.name)
                raise
        charge: Charge = []
        if self.limits:
            charge = await admit(
                self.limits, agent, service=self.service, clock=self._clock, sleep=self._sleep
            )
        shared: list[SharedTokenLimit] = []
        if self.shared:
            shared = await self._take_shared(agent)
        path = endpoint(call.target)
        request = await self._read_request(call, path)
        model = request.model
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
        scanner = Scanner(kind, encoding=encoding, estimate=self.metered)
        meter = _Meter(self, call, model, scanner, charge, shared, request.input_chars)
        metered = MeteredReply(reply, meter, hold_last=kind == "json" and bool(self.budgets))
        if request.hidden_usage and kind == "sse" and encoding == "identity":
            return UsageHidden(metered)
        return metered

    async def _take_shared(self, agent: str | None) -> list[SharedTokenLimit]:
        """Take one token of every shared limit (waiting up to max_wait), or refuse."""
        delay = 0.0
        taken: list[SharedTokenLimit] = []
        for limit in self.shared:
            try:
                ok, wait, tokens = await limit.take(agent)
            except BaseException:
                self._give_back(taken, agent)
                raise
            if not ok:
                self._give_back(taken, agent)
                headers = limit_headers(limit.burst, tokens, wait)
                raise refusal(self.service, limit.detail, max(delay, wait), headers)
            taken.append(limit)
            delay = max(delay, wait)
        if delay > 0:
            try:
                await self._sleep(delay)
            except asyncio.CancelledError:
                self._give_back(taken, agent)
                raise
        return taken

    @staticmethod
    def _give_back(taken: list[SharedTokenLimit], agent: str | None) -> None:
        for limit in taken:
            _keep(asyncio.ensure_future(limit.charge(agent, 0)))

    async def _read_request(self, call: Call, path: str) -> _Request:
        request = _Request()
        if await make_replayable(call) and isinstance(call.body, bytes):
            body = call.body
            doc = _parse(body) if body[:1] in (b"{", b" ", b"\n", b"\r", b"\t") else None
            if isinstance(doc, dict):
                found = doc.get("model")
                if isinstance(found, str) and found:
                    request.model = found[:MAX_MODEL]
                if self.metered:
                    request.input_chars = sum(_chars(doc.get(key)) for key in _INPUT_KEYS)
                changed = False
                if self.stream_usage:
                    changed = _add_stream_usage(doc, path)
                elif self.metered and self.api == "openai":
                    changed = request.hidden_usage = _add_stream_usage(doc, path, force=True)
                if request.hidden_usage:
                    # The added chunk is taken out of the stream as it passes: it must come
                    # as plain text to be found.
                    call.set_header("Accept-Encoding", "identity")
                if changed:
                    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
                    call.body = data
                    call.content_length = len(data)
            elif self.metered:
                request.input_chars = len(body)
        elif self.metered and call.content_length is not None:
            request.input_chars = call.content_length  # not held: its size is all there is
        if request.model is None:
            match = _PATH_MODEL.search(path)
            if match is not None:
                found_in_path = match.group(1) or match.group(2) or match.group(3)
                request.model = unquote(found_in_path)[:MAX_MODEL]
        return request


class _Request:
    """What the step read from a request: its model, the characters of its text (for an
    estimate), and whether it asked for usage on the agent's behalf."""

    __slots__ = ("hidden_usage", "input_chars", "model")

    def __init__(self) -> None:
        self.model: str | None = None
        self.input_chars = 0
        self.hidden_usage = False


def _chars(value: Any, depth: int = 0) -> int:
    if isinstance(value, str):
        return len(value)
    if depth > 16:
        return 0
    if isinstance(value, list):
        return sum(_chars(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return sum(_chars(item, depth + 1) for item in value.values())
    return 0


def _parse(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _add_stream_usage(doc: dict[str, Any], path: str, *, force: bool = False) -> bool:
    """Ask a streamed chat/text completion to report its usage; True when changed.
    `force`: an agent's own `include_usage: false` is overridden too (its answer is
    then relayed without the usage, see UsageHidden)."""
    if doc.get("stream") is not True or not path.endswith("/completions"):
        return False
    options = doc.get("stream_options")
    if options is None:
        doc["stream_options"] = {"include_usage": True}
        return True
    if isinstance(options, dict) and (
        "include_usage" not in options or (force and options["include_usage"] is not True)
    ):
        options["include_usage"] = True
        return True
    return False  # the agent chose: include_usage false stays false


class _Meter:
    """One answer's scanner, and where its usage goes once it is over."""

    __slots__ = ("call", "charge", "done", "input_chars", "model", "scanner", "shared", "step")

    def __init__(
        self,
        step: LLMStep,
        call: Call,
        model: str | None,
        scanner: Scanner,
        charge: Charge,
        shared: list[SharedTokenLimit],
        input_chars: int = 0,
    ) -> None:
        self.step = step
        self.input_chars = input_chars
        self.call = call
        self.model = model
        self.scanner = scanner
        self.charge = charge
        self.shared = shared
        self.done = False

    def finish(self) -> Awaitable[Any] | None:
        """Count the usage; what is still being written to a ledger, if anything."""
        if self.done:
            return None
        self.done = True
        usage: Usage = self.scanner.finish()
        step = self.step
        estimated = False
        if not usage.known:
            if not step.metered:
                return None
            # Counted as zero, a call would be free: an agent could stream its way
            # around a budget.
            usage.input = math.ceil(self.input_chars / CHARS_PER_TOKEN)
            usage.output = math.ceil(usage.chars / CHARS_PER_TOKEN)
            estimated = True
        call = self.call
        agent = call.agent
        tokens = (usage.input or 0) + (usage.output or 0)
        if self.charge:
            settle(self.charge, tokens)
        model = self.model or usage.model or UNKNOWN_MODEL
        exchange = call.exchange
        metrics = exchange.telemetry.metrics if exchange is not None else None
        writes: list[Awaitable[None]] = [limit.charge(agent, tokens) for limit in self.shared]
        for budget in step.budgets:
            if budget.unit == "tokens":
                amount: float = tokens
            elif step.pricing is not None:
                amount = step.pricing.cost(model, usage.input or 0, usage.output or 0)
            else:
                continue
            writes.append(budget.charge(agent, amount))
            if metrics is not None and amount > 0 and math.isfinite(amount):
                metrics.on_budget_spent(step.service, budget.name, amount)
        attributes: dict[str, str | int | bool] = {}
        if estimated:
            attributes["sidecar.llm.usage_estimated"] = True
        if usage.model is not None:
            attributes["gen_ai.response.model"] = usage.model
        if usage.input is not None:
            attributes["gen_ai.usage.input_tokens"] = usage.input
        if usage.output is not None:
            attributes["gen_ai.usage.output_tokens"] = usage.output
        annotate(call, attributes)
        if metrics is not None:
            metrics.on_llm_usage(step.service, agent or "", model, usage.input, usage.output)
        return asyncio.gather(*writes) if writes else None


def _keep(future: asyncio.Future[Any]) -> None:
    _charging.add(future)
    future.add_done_callback(_charged)


def _charged(future: asyncio.Future[Any]) -> None:
    _charging.discard(future)
    if not future.cancelled() and future.exception() is not None:
        log.error("a budget or token charge could not be written: %s", future.exception())


async def _written(pending: Awaitable[Any]) -> None:
    try:
        # Shielded: an agent that hangs up now does not cancel the charge it owes.
        await asyncio.shield(pending)
    except Exception as exc:
        # The answer is not failed for it: it was served, and its charge is logged lost.
        log.error("a budget or token charge could not be written: %s", exc)


class MeteredReply(ReplyView):
    """The upstream's reply with its body read on the way; the rest delegated."""

    __slots__ = ("_meter",)

    def __init__(self, reply: Reply, meter: _Meter, *, hold_last: bool = False) -> None:
        inner = reply.body
        body: AsyncIterable[bytes] | None = None
        if inner is not None:
            body = _held(inner, meter) if hold_last else _scanned(inner, meter)
        super().__init__(reply, body=body)
        self._meter = meter

    def release(self) -> Any:
        # Called once the answer was relayed or abandoned, before telemetry ends the
        # server span: an answer cut short still reports the usage seen so far.
        pending = self._meter.finish()
        if pending is not None:
            _keep(asyncio.ensure_future(pending))
        return self._reply.release()


async def _scanned(body: AsyncIterable[bytes], meter: _Meter) -> AsyncIterator[bytes]:
    feed = meter.scanner.feed
    async for data in body:
        feed(data)
        yield data
    pending = meter.finish()
    if pending is not None:
        # Before the body ends (a chunked or SSE answer's last bytes): the charge is
        # durable before the agent sees the answer complete.
        await _written(pending)


async def _held(body: AsyncIterable[bytes], meter: _Meter) -> AsyncIterator[bytes]:
    """A JSON answer, whose last chunk waits until its charge is written."""
    feed = meter.scanner.feed
    last: bytes | None = None
    async for data in body:
        feed(data)
        if last is not None:
            yield last
        last = data
    pending = meter.finish()
    if pending is not None:
        await _written(pending)
    if last is not None:
        yield last


class UsageHidden(ReplyView):
    """An OpenAI stream the sidecar asked usage for on the agent's behalf, relayed as the
    agent asked for it: without the usage-only chunk, and without the `"usage":null`
    member every other chunk then carries. Events without `"usage"` pass as they came."""

    __slots__ = ()

    def __init__(self, reply: Reply) -> None:
        assert reply.body is not None
        super().__init__(reply, body=_without_usage(reply.body))


_EVENT_END = re.compile(rb"\r?\n\r?\n|\r\r")
_NULL_USAGE = re.compile(rb',\s*"usage"\s*:\s*null(?=\s*[,}])|"usage"\s*:\s*null\s*,')
# An event is never held past this: one so large is relayed as it is.
_EVENT_LIMIT = 1 << 20


async def _without_usage(body: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    pending = b""
    async for chunk in body:
        pending += chunk
        out: list[bytes] = []
        start = 0
        while True:
            match = _EVENT_END.search(pending, start)
            if match is None:
                break
            out.append(_event_without_usage(pending[start : match.end()]))
            start = match.end()
        pending = pending[start:]
        if len(pending) > _EVENT_LIMIT:
            out.append(pending)
            pending = b""
        data = b"".join(out)
        if data:
            yield data
    if pending:
        yield pending


def _event_without_usage(event: bytes) -> bytes:
    if b'"usage"' not in event:
        return event
    stripped = _NULL_USAGE.sub(b"", event)
    if b'"usage"' not in stripped:
        return stripped
    lines = event.splitlines()
    data = b"\n".join(line[5:].removeprefix(b" ") for line in lines if line.startswith(b"data:"))
    doc = _parse(data)
    if not isinstance(doc, dict) or not isinstance(doc.get("usage"), dict):
        return event
    if doc.get("choices") == []:
        return b""  # the chunk only the sidecar asked for
    del doc["usage"]
    kept = [line for line in lines if line and not line.startswith(b"data:")]
    payload = json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()
    return b"\n".join([*kept, b"data: " + payload]) + b"\n\n"


def build(
    service: ServicePolicy,
    *,
    state: StateBuild,
    clock: Clock = time.monotonic,
    sleep: Sleep | None = None,
    wall: Clock = time.time,
) -> LLMStep | None:
    llm = service.spec.llm
    if llm is None:
        return None
    name = service.name
    limits: list[TokenLimit] = []
    shared: list[SharedTokenLimit] = []
    for limit in service.spec.rate_limit:
        tokens = limit.tokens
        if tokens is None:
            continue
        if limit.backend is not None:
            shared_limit = _shared(name, limit, limit.backend, tokens.per_second, state)
            if all(shared_limit.key_prefix != s.key_prefix for s in shared):
                shared.append(shared_limit)
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
    budgets = [_budget(name, b, state, wall) for b in service.spec.budget]
    pricing = Pricing(service.spec.prices) if service.spec.prices else None
    return LLMStep(
        service=name,
        llm=llm,
        limits=limits,
        shared=shared,
        budgets=budgets,
        pricing=pricing,
        clock=clock,
        sleep=sleep,
    )


def _shared(
    name: str, limit: RateLimit, url: str, rate: float, state: StateBuild
) -> SharedTokenLimit:
    # Only a policy with a shared limit pays for the redis client's import.
    from ...engines.limits_redis import RedisBackend, SharedTokenLimit

    backend = state.get("*", "ratelimit-redis", url, lambda: RedisBackend(url))
    burst = limit.burst or max(1, math.floor(rate * 60))
    detail = describe_tokens(name, limit)
    return SharedTokenLimit(
        service=name, limit=limit, tokens=rate, burst=burst, backend=backend, detail=detail
    )


def _budget(name: str, budget: Budget, state: StateBuild, wall: Clock) -> BudgetLimit:
    ledger: Ledger
    url = budget.backend
    if url is not None:
        from ...engines.ledger_redis import RedisLedger
        from ...engines.limits_redis import RedisBackend

        backend = state.get("*", "ratelimit-redis", url, lambda: RedisBackend(url))
        ledger = state.get("*", "budget-redis", url, lambda: RedisLedger(backend))
    elif state.data_dir is not None:
        from ...engines.ledger_sqlite import SqliteLedger

        data_dir = state.data_dir
        # One file per data dir, whatever the budgets: reloads keep it open.
        ledger = state.get("*", "budget-ledger", data_dir, lambda: SqliteLedger(data_dir))
    else:
        ledger = state.get("*", "budget-ledger", None, MemoryLedger)
    # Keyed by the budget: an unchanged one keeps its object (and its /services view).
    return state.get(
        name,
        "llm-budget",
        budget,
        lambda: BudgetLimit(service=name, budget=budget, ledger=ledger, clock=wall),
    )
