"""Translation between LLM APIs (`translate: openai->anthropic`, `anthropic->openai`).

Configured on the service whose upstream speaks the other API, as `model_map`
is: whether the call comes from an agent pointed at this service or from
another service's fallback hop, it runs this service's chain, and this step
translates the calls written for the agent's API (recognised by their path:
`.../chat/completions` for OpenAI, `.../messages` for Anthropic). A call
already in the upstream's API passes untouched.

The request: the JSON body is rewritten (translate_request.py), the path
becomes the upstream's endpoint, and the agent's API headers (its credential
above all: `Authorization` or `x-api-key`) are dropped; this service's auth
step adds its own credential further in.

The answer: an SSE stream is translated event by event as it passes, a JSON
answer (or error) once whole (translate_answer.py). The step sits outside
`llm`, so token accounting reads the upstream's own answer, in its own API.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

from ...core.call import Call, Handler, Reply, ReplyView
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ...policy.translate import apis
from ..operation import annotate, endpoint
from .llm_usage import kind_of
from .translate_answer import (
    SSEReader,
    ToAnthropicEvents,
    ToOpenAIChunks,
    completion_to_message,
    dumps,
    error_to_anthropic,
    error_to_openai,
    message_to_completion,
)
from .translate_request import Untranslatable, anthropic_to_openai, openai_to_anthropic, wants_usage

# The path each API's calls end with, and the headers that belong to it alone.
_ENDPOINTS = {"openai": "/chat/completions", "anthropic": "/messages"}
_OWN_HEADERS = {
    "openai": ("authorization", "openai-organization", "openai-project", "openai-beta"),
    "anthropic": (
        "x-api-key",
        "anthropic-version",
        "anthropic-beta",
        "anthropic-dangerous-direct-browser-access",
    ),
}

# The largest request held to be translated (Anthropic's own limit for messages,
# base64 images included), and the largest JSON answer.
MAX_REQUEST = 32 << 20
MAX_ANSWER = 16 << 20


class Translate:
    def __init__(self, *, service: str, source: str, target: str, path: str) -> None:
        self.service = service
        self.source = source
        self.target = target
        self.path = path  # the upstream's endpoint, relative to its base path
        self._suffix = _ENDPOINTS[source]
        self._drop = _OWN_HEADERS[source]

    async def __call__(self, call: Call, next: Handler) -> Reply:
        # On every call, translated or not: an agent written for the other API sends
        # its own credential for it, which this upstream must never see.
        headers = call.headers
        for name in self._drop:
            headers.popall(name, None)
        if call.method != "POST" or call.upgrade:
            return await next(call)
        if not endpoint(call.target).endswith(self._suffix):
            return await next(call)
        body = await self._body(call)
        try:
            doc = json.loads(body)
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise self._refuse("its body is not a JSON object")
        try:
            if self.source == "openai":
                translated = openai_to_anthropic(doc)
            else:
                translated = anthropic_to_openai(doc)
        except Untranslatable as err:
            raise self._refuse(str(err)) from None
        data = dumps(translated)
        call.body = data
        call.content_length = len(data)
        query = call.target.partition("?")[2]
        call.target = f"{self.path}?{query}" if query else self.path
        headers["Content-Type"] = "application/json"
        # The answer is read to be translated: it comes plain.
        headers["Accept-Encoding"] = "identity"
        annotate(call, {"sidecar.translate": f"{self.source}->{self.target}"})
        reply = await next(call)
        return await self._answer(reply, doc)

    async def _body(self, call: Call) -> bytes:
        """The whole request body: a call is translated as one JSON document."""
        body = call.body
        if body is None or isinstance(body, bytes):
            return body or b""
        chunks: list[bytes] = []
        held = 0
        async for chunk in body:
            held += len(chunk)
            if held > MAX_REQUEST:
                raise ProblemError(
                    Reason.request_too_large,
                    f"Service '{self.service}' translates calls, so the sidecar must hold "
                    f"them: this one is over {MAX_REQUEST >> 20} MiB.",
                    service=self.service,
                )
            chunks.append(chunk)
        data = b"".join(chunks)
        call.body = data
        call.content_length = len(data)
        return data

    def _refuse(self, why: str) -> ProblemError:
        return ProblemError(
            Reason.bad_request,
            f"Service '{self.service}' translates {self.source} calls to {self.target}, "
            f"and this call cannot be: {why}.",
            service=self.service,
        )

    async def _answer(self, reply: Reply, doc: dict[str, Any]) -> Reply:
        headers = reply.headers
        inflate = _inflater(headers.get("Content-Encoding"))
        if inflate is None:
            return reply  # an encoding the sidecar did not ask for and cannot read
        kind = kind_of(headers.get("Content-Type"))
        ok = 200 <= reply.status < 300
        if ok and kind == "sse" and reply.body is not None:
            translator: ToOpenAIChunks | ToAnthropicEvents
            if self.source == "openai":
                translator = ToOpenAIChunks(usage=wants_usage(doc))
            else:
                translator = ToAnthropicEvents()
            body = _events(reply.body, inflate, translator)
            return ReplyView(reply, body=body, headers=_headers(headers, "text/event-stream"))
        if ok and kind != "json":
            return reply  # not an LLM answer (a 204, a file): as it came
        try:
            data = await _read(reply, inflate, service=self.service)
        except BaseException:
            await _release(reply)
            raise
        try:
            answer = json.loads(data) if data else None
        except (ValueError, RecursionError):
            answer = None
        if ok:
            if not isinstance(answer, dict):
                await _release(reply)
                raise ProblemError(
                    Reason.untranslatable_answer,
                    f"Service '{self.service}' answered {reply.status} with a body that is "
                    f"not a JSON object, so it could not be translated to {self.source}'s API.",
                    service=self.service,
                )
            if self.source == "openai":
                out = message_to_completion(answer)
            else:
                out = completion_to_message(answer)
        elif self.source == "openai":
            out = error_to_openai(answer, reply.status)
        else:
            out = error_to_anthropic(answer, reply.status)
        translated = dumps(out)
        return ReplyView(
            reply,
            body=_once(translated),
            headers=_headers(headers, "application/json"),
            content_length=len(translated),
        )


async def _release(reply: Reply) -> None:
    result = reply.release()
    if hasattr(result, "__await__"):
        await result


def _headers(headers: CIMultiDictProxy[str], content_type: str) -> CIMultiDictProxy[str]:
    out = CIMultiDict(headers)
    for name in ("Content-Length", "Content-Encoding", "Transfer-Encoding", "ETag"):
        out.popall(name, None)
    out["Content-Type"] = content_type
    return CIMultiDictProxy(out)


Inflate = Callable[[bytes], bytes]


def _inflater(encoding: str | None) -> Inflate | None:
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return _same
    if coding in ("gzip", "x-gzip"):
        return zlib.decompressobj(zlib.MAX_WBITS | 32).decompress
    if coding == "deflate":
        return zlib.decompressobj(zlib.MAX_WBITS).decompress
    return None


def _same(data: bytes) -> bytes:
    return data


async def _once(data: bytes) -> AsyncIterator[bytes]:
    yield data


async def _read(reply: Reply, inflate: Inflate, *, service: str) -> bytes:
    body = reply.body
    if body is None:
        return b""
    chunks: list[bytes] = []
    held = 0
    async for chunk in body:
        data = inflate(chunk)
        held += len(data)
        if held > MAX_ANSWER:
            raise ProblemError(
                Reason.untranslatable_answer,
                f"Service '{service}' answered with more than {MAX_ANSWER >> 20} MiB of JSON, "
                "too large to translate.",
                service=service,
            )
        chunks.append(data)
    return b"".join(chunks)


async def _events(
    body: AsyncIterable[bytes], inflate: Inflate, translator: ToOpenAIChunks | ToAnthropicEvents
) -> AsyncIterator[bytes]:
    reader = SSEReader()
    event = translator.event
    async for chunk in body:
        out = b"".join(event(data) for _, data in reader.feed(inflate(chunk)))
        if out:
            yield out
    out = b"".join(event(data) for _, data in reader.finish()) + translator.finish()
    if out:
        yield out


def upstream_path(upstream: str, api: str) -> str:
    """The endpoint of `api` relative to an upstream's base path (which may hold /v1)."""
    base = urlsplit(upstream).path.rstrip("/")
    tail = _ENDPOINTS[api]
    return tail if base.endswith("/v1") else "/v1" + tail


def build(service: ServicePolicy, *, state: StateBuild) -> Translate | None:
    spec = service.spec
    if spec.translate is None:
        return None
    source, target = apis(spec.translate)
    return Translate(
        service=service.name,
        source=source,
        target=target,
        path=upstream_path(spec.upstream, target),
    )
