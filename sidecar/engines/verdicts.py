"""Credentials proven before, for the identity engine (identity.py) and jwks.py.

Apart from both, as refused.py is: jwks.py (and pyjwt with it) is imported only by
policies that verify JWTs, and no import runs from jwks.py back to identity.py.
"""

from __future__ import annotations

import time
from typing import Final

# Credentials remembered at most: made-up ones are never remembered, and agents' real
# ones cannot exhaust memory either.
VERDICTS: Final = 1024
# The expiry of what proves an identity until the policy changes (an agent key).
NEVER: Final = float("inf")


class Verdicts:
    """Credentials proven before: the exact text presented -> (agent, expiry in wall-clock
    seconds). Only proven ones: a refusal is decided afresh each time."""

    __slots__ = ("_items",)

    def __init__(self) -> None:
        self._items: dict[str, tuple[str, float]] = {}

    def get(self, presented: str) -> str | None:
        found = self._items.get(presented)
        if found is None:
            return None
        expires = found[1]
        # A token's `exp` is enforced on every use, not only when it was first verified.
        if expires != NEVER and time.time() >= expires:
            del self._items[presented]
            return None
        return found[0]

    def put(self, presented: str, agent: str, expires: float) -> None:
        items = self._items
        if presented not in items and len(items) >= VERDICTS:
            # The oldest out (dicts keep insertion order): one at a time, so many
            # agents past the bound cost a verification each, not everyone's at once.
            del items[next(iter(items))]
        items[presented] = (agent, expires)

    def clear(self) -> None:
        self._items.clear()

    def __len__(self) -> int:
        return len(self._items)
