"""What a refused statement gets back: the SQLSTATE, the sidecar's reason name and a
sentence an agent (often an LLM) can act on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ...core.reasons import Reason

# The SQLSTATEs the engine answers with (PostgreSQL's own codes for the same refusals).
INSUFFICIENT_PRIVILEGE: Final = "42501"
READ_ONLY_TRANSACTION: Final = "25006"
SYNTAX_ERROR: Final = "42601"

# The sidecar's reason (core/reasons.py), for the HTTP face and telemetry.
FORBIDDEN: Final = Reason.forbidden


@dataclass(frozen=True, slots=True)
class Verdict:
    """A refusal. `message` says what was refused and why; `hint` what is allowed."""

    sqlstate: str
    reason: str  # a core.reasons.Reason
    message: str
    hint: str | None
