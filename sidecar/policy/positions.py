"""Where a problem of a policy stands: FILE:LINE:COL, and the message printed after it.

Apart from yamlpos.py, which finds them, so that a process holding a loaded policy
and its problems (the serving process: policy/child.py) never imports the YAML parser.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Position:
    file: str
    line: int  # 1-based
    col: int  # 1-based

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a policy file, printed as FILE:LINE:COL: message."""

    position: Position
    message: str

    def __str__(self) -> str:
        return f"{self.position}: {self.message}"
