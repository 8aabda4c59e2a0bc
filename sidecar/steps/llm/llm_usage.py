"""Token usage read from an LLM answer as its bytes pass, never holding the stream.

`Scanner` is fed each chunk of the answer on its way to the agent:

- a JSON answer is kept (up to `cap` bytes; a larger one is not read) and
  parsed at its end;
- an SSE stream (text/event-stream) is cut into events as it passes; only the
  event being received is held, and only an event that holds a usage object
  is parsed (OpenAI's last chunk under `stream_options.include_usage`,
  Anthropic's message_start and message_delta, the Responses API's
  response.completed);
- NDJSON (Ollama's native API) is read line by line the same way;
- an AWS event stream (Bedrock's InvokeModelWithResponseStream and
  ConverseStream, application/vnd.amazon.eventstream) is cut into its binary
  frames; a frame's JSON payload, or the JSON inside its base64 `bytes`
  (InvokeModel's chunks), is read like an SSE event.

gzip and deflate answers are inflated for reading (the agent still gets the
bytes as sent). With `estimate`, every event (or the whole JSON answer) is
parsed and the characters of its generated text counted (`Usage.chars`), for
an estimate when the answer reports no usage. Usage reports are cumulative: a
later report of a count
replaces an earlier one, which is how Anthropic's message_delta and Gemini's
usageMetadata chunks count. Nothing here raises: a scanner that meets
garbage stops reading and reports what it found before, often nothing.
"""

from __future__ import annotations

import base64
import json
import re
import zlib
from typing import Any, Literal

Kind = Literal["json", "sse", "ndjson", "eventstream"]

# Most SSE events (every token's chunk) carry no usage: they are not parsed. OpenAI
# chunks under include_usage carry `"usage":null` until the last.
_HAS_USAGE = re.compile(
    rb'"usage(?:Metadata)?"\s*:\s*\{|"prompt_eval_count"\s*:|"amazon-bedrock-invocationMetrics"'
)
# An AWS event-stream frame: total length, headers length, prelude CRC (4 bytes each),
# the headers, the payload, the message CRC (4 bytes).
_PRELUDE = 12
_INFLATE_STEP = 64 * 1024
MAX_MODEL = 128


def kind_of(content_type: str | None) -> Kind | None:
    """How an answer of this media type is read; None: it is not."""
    if not content_type:
        return None
    media = content_type.partition(";")[0].strip().lower()
    if media == "text/event-stream":
        return "sse"
    if media in ("application/x-ndjson", "application/ndjson", "application/jsonl"):
        return "ndjson"
    if media == "application/json" or media.endswith("+json"):
        return "json"
    if media == "application/vnd.amazon.eventstream":
        return "eventstream"
    return None


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


# Where an answer's generated text is, in the APIs read here: OpenAI's chat deltas and
# messages (content, tool-call arguments, refusals, reasoning), completions' `text`,
# Anthropic's text/thinking/partial_json deltas and text blocks, the Responses API's
# output_text deltas, Gemini's parts and Ollama's message/response.
_TEXT_KEYS = frozenset(
    {
        "content",
        "text",
        "arguments",
        "refusal",
        "reasoning_content",
        "thinking",
        "partial_json",
        "delta",
        "response",
    }
)
# Containers that hold that text (and nothing counted twice).
_TEXT_HOLDERS = frozenset(
    {"choices", "delta", "message", "content", "tool_calls", "function", "content_block"}
    | {"candidates", "parts", "output"}
)


def text_chars(doc: Any, depth: int = 0) -> int:
    """Characters of generated text in one answer or stream event (see _TEXT_KEYS)."""
    if depth > 8:
        return 0
    if depth == 0 and isinstance(doc, dict):
        kind = doc.get("type")
        # The Responses API repeats a stream's text in its *.done and completed events.
        if (
            isinstance(kind, str)
            and kind.startswith("response.")
            and kind.endswith((".done", ".completed", ".added"))
        ):
            return 0
    total = 0
    if isinstance(doc, list):
        for item in doc[:1000]:
            total += text_chars(item, depth + 1)
    elif isinstance(doc, dict):
        for key, value in doc.items():
            if isinstance(value, str):
                if key in _TEXT_KEYS:
                    total += len(value)
            elif key in _TEXT_HOLDERS or (depth == 0 and isinstance(value, list)):
                total += text_chars(value, depth + 1)
    return total


class Usage:
    """Token counts an answer reported, and the model that answered."""

    __slots__ = ("chars", "input", "model", "output")

    def __init__(self) -> None:
        self.input: int | None = None
        self.output: int | None = None
        self.model: str | None = None
        # Characters of generated text seen (counted only when the scanner estimates).
        self.chars = 0

    @property
    def known(self) -> bool:
        return self.input is not None or self.output is not None

    def fold(self, doc: Any) -> None:
        """Take what one JSON document (an answer, or one stream event) reports."""
        if isinstance(doc, list):
            for item in doc[:10_000]:  # Gemini's streamed JSON array
                self.fold(item)
            return
        if not isinstance(doc, dict):
            return
        # Anthropic's message_start, the Responses API's response.* events.
        for inner in ("message", "response"):
            nested = doc.get(inner)
            if isinstance(nested, dict):
                self.fold(nested)
        model = doc.get("model", doc.get("modelVersion"))
        if isinstance(model, str) and model:
            self.model = model[:MAX_MODEL]
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        gemini = doc.get("usageMetadata")
        if isinstance(gemini, dict):
            self._gemini(gemini)
        bedrock = doc.get("amazon-bedrock-invocationMetrics")
        if isinstance(bedrock, dict):  # the last chunk of a Bedrock InvokeModel stream
            self._set(
                _count(bedrock.get("inputTokenCount")), _count(bedrock.get("outputTokenCount"))
            )
        if doc.get("done") is True and "eval_count" in doc:  # Ollama's native API
            self._set(_count(doc.get("prompt_eval_count")), _count(doc.get("eval_count")))

    def _usage(self, usage: dict[str, Any]) -> None:
        if "prompt_tokens" in usage or "completion_tokens" in usage:  # chat completions
            self._set(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")))
            return
        if "inputTokens" in usage or "outputTokens" in usage:  # Bedrock's Converse
            self._set(_count(usage.get("inputTokens")), _count(usage.get("outputTokens")))
            return
        # Anthropic and the Responses API. Anthropic counts cached input apart from
        # input_tokens; GenAI's input_tokens is all the input, so they are added.
        tokens = _count(usage.get("input_tokens"))
        if tokens is not None:
            for cached in ("cache_creation_input_tokens", "cache_read_input_tokens"):
                tokens += _count(usage.get(cached)) or 0
        self._set(tokens, _count(usage.get("output_tokens")))

    def _gemini(self, meta: dict[str, Any]) -> None:
        output = _count(meta.get("candidatesTokenCount"))
        thoughts = _count(meta.get("thoughtsTokenCount"))
        if thoughts is not None:
            output = (output or 0) + thoughts
        self._set(_count(meta.get("promptTokenCount")), output)

    def _set(self, input: int | None, output: int | None) -> None:
        if input is not None:
            self.input = input
        if output is not None:
            self.output = output


def _parse(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


class Scanner:
    """Reads one answer's usage from its chunks; `feed` each, then `finish`."""

    __slots__ = (
        "_cap",
        "_chunks",
        "_data",
        "_dead",
        "_estimate",
        "_held",
        "_inflate",
        "_kind",
        "_tail",
        "usage",
    )

    def __init__(
        self,
        kind: Kind,
        *,
        encoding: str | None = None,
        cap: int = 1 << 20,
        estimate: bool = False,
    ) -> None:
        self._kind = kind
        self._estimate = estimate
        self._cap = cap
        self._dead = False
        self._chunks: list[bytes] = []  # a JSON answer so far
        self._held = 0  # bytes in _chunks, or in _data for an SSE event
        self._tail = b""  # an unfinished line
        self._data: list[bytes] = []  # the data lines of the SSE event being received
        self._inflate = (
            zlib.decompressobj(zlib.MAX_WBITS | 32) if encoding in ("gzip", "x-gzip") else None
        )
        if encoding == "deflate":
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS)
        self.usage = Usage()

    def feed(self, data: bytes) -> None:
        if self._dead:
            return
        try:
            inflate = self._inflate
            if inflate is None:
                self._take(data)
                return
            # Inflated a step at a time: a small compressed chunk may be a large answer.
            out = inflate.decompress(data, _INFLATE_STEP)
            while True:
                self._take(out)
                if self._dead or not inflate.unconsumed_tail:
                    break
                out = inflate.decompress(inflate.unconsumed_tail, _INFLATE_STEP)
        except Exception:
            self._stop()

    def finish(self) -> Usage:
        """The usage found, once the answer ended (or was cut short)."""
        if self._dead:
            return self.usage
        try:
            if self._kind == "json":
                if self._chunks:
                    self._fold(_parse(b"".join(self._chunks)))
            elif self._kind == "eventstream":
                pass  # an unfinished frame has no usage to read
            else:
                if self._tail:
                    self._line(self._tail)
                    self._tail = b""
                self._line(b"")  # an event the stream ended without a blank line after
        except Exception:
            pass
        self._stop()
        return self.usage

    def _fold(self, doc: Any) -> None:
        self.usage.fold(doc)
        if self._estimate:
            self.usage.chars += text_chars(doc)

    def _stop(self) -> None:
        self._dead = True
        self._chunks = []
        self._data = []
        self._tail = b""

    def _take(self, data: bytes) -> None:
        if not data:
            return
        if self._kind == "json":
            self._held += len(data)
            if self._held > self._cap:
                self._stop()  # too large to hold: not read at all
            else:
                self._chunks.append(data)
            return
        if self._tail:
            data = self._tail + data
        if self._kind == "eventstream":
            self._frames(data)
            return
        end = data.rfind(b"\n")
        if end < 0:
            if len(data) > self._cap:
                self._stop()
            else:
                self._tail = data
            return
        self._tail = data[end + 1 :]
        for line in data[:end].split(b"\n"):
            self._line(line)

    def _frames(self, data: bytes) -> None:
        start = 0
        while len(data) - start >= _PRELUDE:
            total = int.from_bytes(data[start : start + 4], "big")
            if total < _PRELUDE + 4 or total > self._cap:
                self._stop()
                return
            if len(data) - start < total:
                break
            headers = int.from_bytes(data[start + 4 : start + 8], "big")
            payload = data[start + _PRELUDE + headers : start + total - 4]
            start += total
            if not payload:
                continue
            doc = _parse(payload) if payload[:1] == b"{" else None
            inner = doc.get("bytes") if isinstance(doc, dict) else None
            if isinstance(inner, str):  # InvokeModel's chunk: the model's own event, base64
                payload = base64.b64decode(inner)
                if self._estimate or _HAS_USAGE.search(payload):
                    self._fold(_parse(payload))
            elif self._estimate or _HAS_USAGE.search(payload):
                self._fold(doc)
        rest = data[start:]
        if len(rest) > self._cap:
            self._stop()
        else:
            self._tail = rest

    def _line(self, line: bytes) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if self._kind == "ndjson":
            if line and (self._estimate or _HAS_USAGE.search(line)):
                self._fold(_parse(line))
            return
        if not line:  # the end of an SSE event
            data = self._data
            if data:
                self._data = []
                self._held = 0
                payload = data[0] if len(data) == 1 else b"\n".join(data)
                if self._estimate or _HAS_USAGE.search(payload):
                    self._fold(_parse(payload))
            return
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._held += len(value)
            if self._held > self._cap:
                self._stop()
            else:
                self._data.append(value)
