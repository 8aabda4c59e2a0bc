"""OpenAPI 3.0/3.1 documents: loading, matching calls to operations, validating them."""

import threading
from collections import OrderedDict

from .document import Document, OpenAPIError, digest_of, parse, read
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
    key = (path, digest_of(text))
    spec = _cached(key)
    return spec if spec is not None else _compile(key, parse(text, source=path))


def compiled(document: Document, source: str) -> Spec:
    """The Spec of a document already parsed: how a Spec is unpickled (Spec.__reduce__).

    A policy loaded in a child process (policy/child.py) carries its documents parsed;
    each is compiled here once, and again only when it changed."""
    key = (source, document.digest)
    spec = _cached(key)
    return spec if spec is not None else _compile(key, document)


def _cached(key: tuple[str, str]) -> Spec | None:
    with _LOCK:
        spec = _CACHE.get(key)
        if spec is not None:
            _CACHE.move_to_end(key)
        return spec


def _compile(key: tuple[str, str], document: Document) -> Spec:
    spec = Spec(document, source=key[0])
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
    "compiled",
    "load",
    "parse",
    "read",
]
