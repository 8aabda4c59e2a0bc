"""OpenAPI 3.0/3.1 documents: loading, matching calls to operations, validating them."""

import hashlib
from collections import OrderedDict

from .document import Document, OpenAPIError, parse, read
from .spec import Match, Operation, Spec, Violation

# Reloads recompile only documents that changed: GitHub's takes a second.
_CACHE: OrderedDict[tuple[str, str], Spec] = OrderedDict()
_CACHE_SIZE = 16


def load(path: str) -> Spec:
    """Read and compile the document at `path`; raises OpenAPIError saying why not."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise OpenAPIError(f"cannot read OpenAPI document {path}: {exc.strerror}") from None
    key = (path, hashlib.sha256(text).hexdigest())
    spec = _CACHE.get(key)
    if spec is None:
        spec = Spec(parse(text, source=path), source=path)
        _CACHE[key] = spec
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
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
