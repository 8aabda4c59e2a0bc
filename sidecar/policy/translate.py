"""The `translate:` key of a service: the agent speaks one LLM API, the upstream another.

`translate: openai->anthropic` on a service whose upstream speaks Anthropic
messages: an OpenAI chat completions call that reaches it (an agent's own, or
another service's fallback hop) is sent as a messages call, and its answer
(JSON, SSE or error) comes back as OpenAI's. Calls already in the upstream's
API pass as they are. See steps/llm/translate.py.
"""

from __future__ import annotations

from typing import Literal

Translate = Literal["openai->anthropic", "anthropic->openai"]


def apis(value: Translate) -> tuple[str, str]:
    """(the agent's API, the upstream's API)."""
    source, _, target = value.partition("->")
    return source, target
