"""Request bodies translated between OpenAI chat completions and Anthropic messages.

Pure functions from one API's JSON document to the other's, as LiteLLM maps
them. What has no counterpart is dropped (OpenAI's `response_format`,
`logprobs`, `seed`; Anthropic's `top_k`, `thinking`); what cannot be honoured
is refused with `Untranslatable`, which the step answers as a 400 in the
agent's own API's error shape.
"""

from __future__ import annotations

import json
from typing import Any

# Anthropic requires max_tokens; OpenAI agents often leave it out. LiteLLM's default.
DEFAULT_MAX_TOKENS = 4096

# Anthropic's temperature is 0..1, OpenAI's 0..2: a higher value is the hottest allowed.
_MAX_TEMPERATURE = 1.0


class Untranslatable(ValueError):
    """A request the other API cannot serve as asked; the message says why."""


def _text_of(content: Any) -> str:
    """The text of an OpenAI content (a string, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    return ""


# --- OpenAI chat completions -> Anthropic messages ---------------------------------------


def _image_block(part: dict[str, Any]) -> dict[str, Any]:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str):
        raise Untranslatable("an image_url part has no url")
    if url.startswith("data:"):
        head, _, data = url.partition(",")
        media = head[5:].partition(";")[0]
        if not head.endswith(";base64"):
            raise Untranslatable("an image data URL must be base64")
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    return {"type": "image", "source": {"type": "url", "url": url}}


def _blocks(content: Any) -> list[dict[str, Any]]:
    """OpenAI user/assistant content as Anthropic content blocks."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if not isinstance(content, list):
        raise Untranslatable("message content must be a string or a list of parts")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            blocks.append(_image_block(part))
        else:
            raise Untranslatable(f"content parts of type {kind!r} are not translated")
    return blocks


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except (TypeError, ValueError):
        raise Untranslatable("a tool call's arguments are not JSON") from None
    return value if isinstance(value, dict) else {"value": value}


def _tool_uses(message: dict[str, Any]) -> list[dict[str, Any]]:
    uses = []
    for call in message.get("tool_calls") or ():
        if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
            raise Untranslatable("each tool call must be an object with a function")
        function = call["function"]
        uses.append(
            {
                "type": "tool_use",
                "id": call.get("id"),
                "name": function.get("name"),
                "input": _arguments(function.get("arguments")),
            }
        )
    return uses


def _tool_result(message: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "tool_result",
        "tool_use_id": message.get("tool_call_id"),
        "content": _text_of(message.get("content")),
    }


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    # Tool results must all sit in the one user turn after the assistant's tool_use:
    # consecutive messages of one role become one turn.
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _tool(tool: Any) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(function, dict) or tool.get("type") != "function":
        raise Untranslatable("only tools of type function are translated")
    out: dict[str, Any] = {
        "name": function.get("name"),
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        out["description"] = function["description"]
    return out


def _tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any] | None
    if choice is None:
        out = None
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "none":
        out = {"type": "none"}
    elif choice == "required":
        out = {"type": "any"}
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        out = {"type": "tool", "name": choice["function"].get("name")}
    else:
        raise Untranslatable("tool_choice is auto, none, required or a function")
    if parallel is False:
        out = out or {"type": "auto"}
        if out["type"] != "none":
            out["disable_parallel_tool_use"] = True
    return out


def openai_to_anthropic(doc: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI chat completions request as an Anthropic messages request."""
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise Untranslatable("messages must be a list")
    if doc.get("n") not in (None, 1):
        raise Untranslatable("n other than 1 has no Anthropic counterpart")
    if doc.get("functions") or doc.get("function_call"):
        raise Untranslatable("it uses the deprecated functions or function_call (use tools)")
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise Untranslatable("each message must be an object")
        role = message.get("role")
        if role in ("system", "developer"):
            system.append(_text_of(message.get("content")))
        elif role == "user":
            _append(turns, "user", _blocks(message.get("content")))
        elif role == "assistant":
            blocks = _blocks(message.get("content")) + _tool_uses(message)
            _append(turns, "assistant", blocks)
        elif role == "tool":
            _append(turns, "user", [_tool_result(message)])
        else:
            raise Untranslatable(f"messages of role {role!r} are not translated")
    out: dict[str, Any] = {"model": doc.get("model")}
    if system:
        out["system"] = "\n\n".join(system)
    out["messages"] = turns
    limit = doc.get("max_completion_tokens", doc.get("max_tokens"))
    out["max_tokens"] = limit if isinstance(limit, int) else DEFAULT_MAX_TOKENS
    temperature = doc.get("temperature")
    if isinstance(temperature, (int, float)):
        out["temperature"] = min(temperature, _MAX_TEMPERATURE)
    if doc.get("top_p") is not None:
        out["top_p"] = doc["top_p"]
    stop = doc.get("stop")
    if stop:
        out["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if doc.get("stream") is True:
        out["stream"] = True
    tools = doc.get("tools")
    if tools:
        out["tools"] = [_tool(t) for t in tools]
    choice = _tool_choice(doc.get("tool_choice"), doc.get("parallel_tool_calls"))
    if choice is not None:
        out["tool_choice"] = choice
    if isinstance(doc.get("user"), str):
        out["metadata"] = {"user_id": doc["user"]}
    return out


def wants_usage(doc: dict[str, Any]) -> bool:
    """Whether an OpenAI streaming request asked for the usage chunk."""
    options = doc.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


# --- Anthropic messages -> OpenAI chat completions ---------------------------------------


def _parts(blocks: Any) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """Anthropic content as OpenAI (content parts, tool calls, tool messages)."""
    if isinstance(blocks, str):
        return [{"type": "text", "text": blocks}], [], []
    if not isinstance(blocks, list):
        raise Untranslatable("message content must be a string or a list of blocks")
    parts: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            source = block.get("source") or {}
            if source.get("type") == "base64":
                url = f"data:{source.get('media_type')};base64,{source.get('data')}"
            elif source.get("type") == "url":
                url = str(source.get("url"))
            else:
                raise Untranslatable("images are translated from base64 or url sources")
            parts.append({"type": "image_url", "image_url": {"url": url}})
        elif kind == "tool_use":
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
        elif kind == "tool_result":
            content = block.get("content")
            text = content if isinstance(content, str) else _text_of(content)
            results.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text}
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise Untranslatable(f"content blocks of type {kind!r} are not translated")
    return parts, calls, results


def _content(parts: list[dict[str, Any]]) -> str | list[dict[str, Any]] | None:
    if not parts:
        return None
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def anthropic_to_openai(doc: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic messages request as an OpenAI chat completions request."""
    messages = doc.get("messages")
    if not isinstance(messages, list):
        raise Untranslatable("messages must be a list")
    out_messages: list[dict[str, Any]] = []
    system = doc.get("system")
    if system:
        out_messages.append({"role": "system", "content": _text_of(system)})
    for message in messages:
        if not isinstance(message, dict):
            raise Untranslatable("each message must be an object")
        role = message.get("role")
        parts, calls, results = _parts(message.get("content"))
        if role == "user":
            # Tool results answer the assistant's last calls: they come first.
            out_messages.extend(results)
            if parts:
                out_messages.append({"role": "user", "content": _content(parts)})
        elif role == "assistant":
            out: dict[str, Any] = {"role": "assistant", "content": _content(parts)}
            if calls:
                out["tool_calls"] = calls
            out_messages.append(out)
        else:
            raise Untranslatable(f"messages of role {role!r} are not translated")
    request: dict[str, Any] = {"model": doc.get("model"), "messages": out_messages}
    if isinstance(doc.get("max_tokens"), int):
        request["max_tokens"] = doc["max_tokens"]
    for key in ("temperature", "top_p"):
        if doc.get(key) is not None:
            request[key] = doc[key]
    if doc.get("stop_sequences"):
        request["stop"] = list(doc["stop_sequences"])
    if doc.get("stream") is True:
        # Anthropic streams always report usage: the OpenAI stream is asked to.
        request["stream"] = True
        request["stream_options"] = {"include_usage": True}
    tools = doc.get("tools")
    if tools:
        request["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name"),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema") or {"type": "object", "properties": {}},
                },
            }
            for t in tools
            if isinstance(t, dict)
        ]
    choice = doc.get("tool_choice")
    if isinstance(choice, dict):
        kind = choice.get("type")
        if kind == "tool":
            request["tool_choice"] = {"type": "function", "function": {"name": choice.get("name")}}
        elif kind in ("auto", "none"):
            request["tool_choice"] = kind
        elif kind == "any":
            request["tool_choice"] = "required"
        if choice.get("disable_parallel_tool_use") is True and tools:
            request["parallel_tool_calls"] = False
    metadata = doc.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        request["user"] = metadata["user_id"]
    return request
