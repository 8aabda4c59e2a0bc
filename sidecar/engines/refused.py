"""Why a presented credential proves no identity (engines/identity.py, jwks.py).

Apart from both, so that jwks.py (and pyjwt with it) is imported only by policies that
verify JWTs, and no import runs from jwks.py back to identity.py.
"""

from __future__ import annotations


class Refused(Exception):
    """The credential does not prove an identity; the text says why, never quoting it."""


class KeysUnavailable(Exception):
    """No key set could be fetched yet: the sidecar's problem, not the agent's."""
