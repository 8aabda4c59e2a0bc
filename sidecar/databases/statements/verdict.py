"""What a refused statement gets back: the SQLSTATE, the sidecar's reason name and a
sentence an agent (often an LLM) can act on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# The SQLSTATEs the engine answers with (PostgreSQL's own codes for the same refusals).
INSUFFICIENT_PRIVILEGE: Final = "42501"
READ_ONLY_TRANSACTION: Final = "25006"
SYNTAX_ERROR: Final = "42601"

# The sidecar's reason name (sidecar/core/problems.py), for the HTTP face and telemetry.
FORBIDDEN: Final = "forbidden"


@dataclass(frozen=True, slots=True)
class Verdict:
    """A refusal. `message` says what was refused and why; `hint` what is allowed."""

    sqlstate: str
    reason: str
    message: str
    hint: str | None
