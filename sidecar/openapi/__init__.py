"""OpenAPI 3.0/3.1 documents: loading, matching calls to operations, validating them."""

import hashlib
import threading
from collections import OrderedDict

from .document import Document, OpenAPIError, parse, read
from .spec import Match, Operation, Spec, Violation

# Reloads recompile only documents that changed: GitHub's takes a second.
_CACHE: OrderedDict[tuple[str, str], Spec] = OrderedDict()
_CACHE_SIZE = 16
# Loads run in worker threads; two sidecars in one process (tests) may load at once.
_LOCK = threading.Lock()


def load(path: str) -> Spec:
    """Read and compile the document at `path`; raises OpenAPIError saying why not."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise OpenAPIError(f"cannot read OpenAPI document {path}: {exc.strerror}") from None
    key = (path, hashlib.sha256(text).hexdigest())
    with _LOCK:
        spec = _CACHE.get(key)
        if spec is not None:
            _CACHE.move_to_end(key)
            return spec
    spec = Spec(parse(text, source=path), source=path)
    with _LOCK:
        _CACHE[key] = spec
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return spec


__all__ = [
    "Document",
    "Match",
    "OpenAPIError",
    "Operation",
    "Spec",
    "Violation",
    "load",
    "parse",
    "read",
]
