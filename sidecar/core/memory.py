"""Free heap pages handed back to the system once start-up or a reload is done.

Loading a policy parses YAML and builds pydantic models; what it leaves behind is
freed, but glibc keeps the free pages of its heap mapped, and they count in the
process's RSS until a later allocation reuses them. malloc_trim(0) returns them.
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable

_trim: Callable[[int], int] | None = None
if sys.platform.startswith("linux"):
    try:
        _trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):  # musl has no malloc_trim: nothing to hand back
        _trim = None


def release() -> None:
    """Collect the cycles left by a load, then give the free heap pages back."""
    gc.collect()
    if _trim is not None:
        _trim(0)
