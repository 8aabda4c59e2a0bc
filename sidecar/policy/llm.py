"""The `llm:` part of a service: an OpenAI- or Anthropic-compatible API.

A service with an `llm:` block (every LLM template sets one) has its token
usage counted from the answers, per agent and model, and its spans carry the
OpenTelemetry GenAI attributes. See steps/llm/llm.py.
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, Field

from .base import Model

LLMApi = Literal["openai", "anthropic"]

_PROVIDER = re.compile(r"^[a-z0-9_.-]{1,64}$")


def _provider(value: str) -> str:
    if not _PROVIDER.match(value):
        raise ValueError("provider is a lower-case name like 'openai' or 'gcp.gemini'")
    return value


class LLM(Model):
    api: LLMApi = Field(
        description="The wire format the service speaks: openai (chat completions, "
        "responses, embeddings; also Mistral, Ollama, vLLM, ...) or anthropic (messages)"
    )
    provider: Annotated[str, AfterValidator(_provider)] | None = Field(
        default=None,
        description="The gen_ai.system value on spans (openai, anthropic, az.ai.openai, "
        "gcp.gemini, mistral_ai, ...); default: the api",
    )
    stream_usage: bool = Field(
        default=False,
        description="Add stream_options.include_usage to OpenAI streaming requests that lack "
        "it, so streamed answers can be counted (the agent then gets one more chunk, with "
        "empty choices and the usage)",
    )
