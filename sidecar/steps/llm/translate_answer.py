"""Answers translated between Anthropic messages and OpenAI chat completions.

- JSON: a whole message (or chat.completion) becomes the other one; an error
  document becomes the other API's error shape, with the same status.
- SSE: `SSEReader` cuts the upstream's stream into events as bytes arrive
  (holding only the event being received), and `ToOpenAIChunks` /
  `ToAnthropicEvents` turn each event into the other API's events at once, so
  the agent's stream advances with the upstream's, event by event.
"""

from __future__ import annotations

import json
import time
from typing import Any

# Anthropic stop_reason -> OpenAI finish_reason.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
STOP_REASONS = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

# Anthropic's error types by status, for OpenAI errors that carry none of them.
_ANTHROPIC_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}

# The largest SSE event held while it arrives (a tool call's whole input fits).
MAX_EVENT = 1 << 20


def dumps(doc: Any) -> bytes:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def _obj(doc: dict[str, Any], key: str) -> dict[str, Any]:
    value = doc.get(key)
    return value if isinstance(value, dict) else {}


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def anthropic_input(usage: dict[str, Any]) -> int:
    """All the input Anthropic counted: cached input is reported apart from input_tokens."""
    return (
        _count(usage.get("input_tokens"))
        + _count(usage.get("cache_creation_input_tokens"))
        + _count(usage.get("cache_read_input_tokens"))
    )


def _openai_usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# --- JSON ------------------------------------------------------------------------------


def message_to_completion(doc: dict[str, Any], *, created: int | None = None) -> dict[str, Any]:
    """An Anthropic message as an OpenAI chat.completion."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in doc.get("content") or ():
        if not isinstance(block, dict):
            continue
        if block.get("type") == "text":
            text.append(str(block.get("text", "")))
        elif block.get("type") == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": json.dumps(block.get("input") or {}),
                    },
                }
            )
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) if text or not calls else None,
        "refusal": None,
    }
    if calls:
        message["tool_calls"] = calls
    usage = _obj(doc, "usage")
    return {
        "id": doc.get("id"),
        "object": "chat.completion",
        "created": created if created is not None else int(time.time()),
        "model": doc.get("model"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(str(doc.get("stop_reason")), "stop"),
            }
        ],
        "usage": _openai_usage(anthropic_input(usage), _count(usage.get("output_tokens"))),
    }


def completion_to_message(doc: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat.completion (its first choice) as an Anthropic message."""
    choices = doc.get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    message = _obj(choice, "message")
    content: list[dict[str, Any]] = []
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict):
            continue
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {}
        content.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": arguments,
            }
        )
    usage = _obj(doc, "usage")
    return {
        "id": doc.get("id"),
        "type": "message",
        "role": "assistant",
        "model": doc.get("model"),
        "content": content,
        "stop_reason": STOP_REASONS.get(str(choice.get("finish_reason")), "end_turn"),
        "stop_sequence": None,
        "usage": {
            "input_tokens": _count(usage.get("prompt_tokens")),
            "output_tokens": _count(usage.get("completion_tokens")),
        },
    }


def _message(doc: Any, fallback: str) -> str:
    if isinstance(doc, dict):
        error = doc.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(doc.get("message"), str):
            return str(doc["message"])
    return fallback


def error_to_openai(doc: Any, status: int) -> dict[str, Any]:
    """An Anthropic error document (or anything else) in OpenAI's error shape."""
    error = doc.get("error") if isinstance(doc, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    return {
        "error": {
            "message": _message(doc, f"the upstream answered {status}"),
            "type": kind if isinstance(kind, str) else "api_error",
            "param": None,
            "code": None,
        }
    }


def error_to_anthropic(doc: Any, status: int) -> dict[str, Any]:
    """An OpenAI error document (or anything else) in Anthropic's error shape."""
    kind = _ANTHROPIC_ERRORS.get(status, "api_error")
    return {
        "type": "error",
        "error": {"type": kind, "message": _message(doc, f"the upstream answered {status}")},
    }


# --- SSE -------------------------------------------------------------------------------


class StreamTooLarge(ValueError):
    pass


class SSEReader:
    """Complete SSE events (event name, data) out of chunks of a stream."""

    __slots__ = ("_data", "_event", "_held", "_tail")

    def __init__(self) -> None:
        self._tail = b""
        self._event: str | None = None
        self._data: list[str] = []
        self._held = 0

    def feed(self, chunk: bytes) -> list[tuple[str | None, str]]:
        data = self._tail + chunk if self._tail else chunk
        end = data.rfind(b"\n")
        if end < 0:
            self._tail = data
            if len(data) > MAX_EVENT:
                raise StreamTooLarge
            return []
        self._tail = data[end + 1 :]
        events: list[tuple[str | None, str]] = []
        for line in data[:end].split(b"\n"):
            self._line(line, events)
        return events

    def finish(self) -> list[tuple[str | None, str]]:
        events: list[tuple[str | None, str]] = []
        if self._tail:
            self._line(self._tail, events)
            self._tail = b""
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[tuple[str | None, str]]) -> None:
        if line.endswith(b"\r"):
            line = line[:-1]
        if not line:
            if self._data:
                events.append((self._event, "\n".join(self._data)))
            self._event, self._data, self._held = None, [], 0
            return
        name, _, value = line.partition(b":")
        if value.startswith(b" "):
            value = value[1:]
        if name == b"data":
            self._held += len(value)
            if self._held > MAX_EVENT:
                raise StreamTooLarge
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")


def _sse(doc: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + dumps(doc) + b"\n\n"


class ToOpenAIChunks:
    """Anthropic stream events -> OpenAI chat.completion.chunk events, one at a time."""

    __slots__ = ("_base", "_input", "_output", "_tools", "_usage", "done")

    def __init__(self, *, usage: bool, created: int | None = None) -> None:
        self._usage = usage
        self._base: dict[str, Any] = {
            "id": "",
            "object": "chat.completion.chunk",
            "created": created if created is not None else int(time.time()),
            "model": "",
            "system_fingerprint": None,
        }
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool call index
        self._input = 0
        self._output = 0
        self.done = False

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = dict(self._base)
        chunk["choices"] = [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
        if self._usage:
            chunk["usage"] = None
        return _sse(chunk)

    def event(self, data: str) -> bytes:
        try:
            doc = json.loads(data)
        except ValueError:
            return b""
        if not isinstance(doc, dict):
            return b""
        kind = doc.get("type")
        if kind == "message_start":
            message = _obj(doc, "message")
            self._base["id"] = message.get("id", "")
            self._base["model"] = message.get("model", "")
            usage = _obj(message, "usage")
            self._input = anthropic_input(usage)
            self._output = _count(usage.get("output_tokens"))
            return self._chunk({"role": "assistant", "content": ""})
        if kind == "content_block_start":
            block = _obj(doc, "content_block")
            if block.get("type") != "tool_use":
                return b""
            index = self._tools[_count(doc.get("index"))] = len(self._tools)
            call = {
                "index": index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return self._chunk({"tool_calls": [call]})
        if kind == "content_block_delta":
            delta = _obj(doc, "delta")
            if delta.get("type") == "text_delta":
                return self._chunk({"content": delta.get("text", "")})
            if delta.get("type") == "input_json_delta":
                position = self._tools.get(_count(doc.get("index")))
                if position is None:
                    return b""
                call = {"index": position, "function": {"arguments": delta.get("partial_json", "")}}
                return self._chunk({"tool_calls": [call]})
            return b""  # thinking and signature deltas have no OpenAI counterpart
        if kind == "message_delta":
            delta = _obj(doc, "delta")
            usage = _obj(doc, "usage")
            if "output_tokens" in usage:
                self._output = _count(usage["output_tokens"])
            if "input_tokens" in usage:  # newer API versions report it here too
                self._input = anthropic_input(usage)
            reason = FINISH_REASONS.get(str(delta.get("stop_reason")), "stop")
            return self._chunk({}, reason)
        if kind == "message_stop":
            self.done = True
            out = b""
            if self._usage:
                chunk = dict(self._base)
                chunk["choices"] = []
                chunk["usage"] = _openai_usage(self._input, self._output)
                out = _sse(chunk)
            return out + b"data: [DONE]\n\n"
        if kind == "error":
            # The OpenAI SDK raises on a data event holding an "error".
            return _sse(error_to_openai(doc, 500))
        return b""  # ping, content_block_stop

    def finish(self) -> bytes:
        return b""  # a stream cut before message_stop stays cut: no [DONE]


class ToAnthropicEvents:
    """OpenAI chat.completion.chunk events -> Anthropic stream events, one at a time."""

    __slots__ = (
        "_block",
        "_finished",
        "_input",
        "_next",
        "_output",
        "_reason",
        "_started",
        "_tools",
        "done",
    )

    def __init__(self) -> None:
        self._started = False
        self._block: int | None = None  # the open content block
        self._next = 0  # the next content block's index
        self._tools: dict[int, int] = {}  # OpenAI tool call index -> block index
        self._reason = "end_turn"
        self._finished = False  # a finish_reason was seen
        self._input = 0
        self._output = 0
        self.done = False

    def _close(self) -> bytes:
        if self._block is None:
            return b""
        index, self._block = self._block, None
        return _sse({"type": "content_block_stop", "index": index}, "content_block_stop")

    def _open(self, block: dict[str, Any]) -> tuple[bytes, int]:
        out = self._close()
        index = self._block = self._next
        self._next += 1
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return out + _sse(start, "content_block_start"), index

    def event(self, data: str) -> bytes:
        if data.strip() == "[DONE]":
            return self.end()
        try:
            doc = json.loads(data)
        except ValueError:
            return b""
        if not isinstance(doc, dict):
            return b""
        if isinstance(doc.get("error"), dict):
            return _sse(error_to_anthropic(doc, 500), "error")
        out = b""
        if not self._started:
            self._started = True
            message: dict[str, Any] = {
                "id": doc.get("id"),
                "type": "message",
                "role": "assistant",
                "model": doc.get("model"),
                "content": [],
                "stop_reason": None,
                "stop_sequence": None,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }
            out += _sse({"type": "message_start", "message": message}, "message_start")
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self._input = _count(usage.get("prompt_tokens"))
            self._output = _count(usage.get("completion_tokens"))
        for choice in doc.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = _obj(choice, "delta")
            text = delta.get("content")
            if isinstance(text, str) and text:
                if self._block is None or self._block in self._tools.values():
                    opened, _ = self._open({"type": "text", "text": ""})
                    out += opened
                text_delta = {"type": "text_delta", "text": text}
                out += _sse(
                    {"type": "content_block_delta", "index": self._block, "delta": text_delta},
                    "content_block_delta",
                )
            for call in delta.get("tool_calls") or ():
                if not isinstance(call, dict):
                    continue
                function = _obj(call, "function")
                position = _count(call.get("index"))
                index = self._tools.get(position)
                if index is None:
                    block = {"type": "tool_use", "id": call.get("id"), "name": function.get("name")}
                    block["input"] = {}
                    opened, index = self._open(block)
                    self._tools[position] = index
                    out += opened
                arguments = function.get("arguments")
                if isinstance(arguments, str) and arguments:
                    json_delta = {"type": "input_json_delta", "partial_json": arguments}
                    out += _sse(
                        {"type": "content_block_delta", "index": index, "delta": json_delta},
                        "content_block_delta",
                    )
            reason = choice.get("finish_reason")
            if isinstance(reason, str):
                self._reason = STOP_REASONS.get(reason, "end_turn")
                self._finished = True
        return out

    def finish(self) -> bytes:
        """At the end of the upstream's stream: some OpenAI-compatible servers end a
        finished answer without `data: [DONE]`; a stream cut before its end stays cut."""
        return self.end() if self._finished else b""

    def end(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": self._reason, "stop_sequence": None},
            "usage": {"input_tokens": self._input, "output_tokens": self._output},
        }
        return (
            self._close()
            + _sse(delta, "message_delta")
            + _sse({"type": "message_stop"}, "message_stop")
        )
