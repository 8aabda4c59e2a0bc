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
# (path, digest) -> operation ids of the documents the serving process already holds
# compiled: a loading child (policy/child.py) stands in for those, compiling none.
_HELD_ELSEWHERE: dict[tuple[str, str], tuple[str, ...]] = {}


def load(path: str) -> Spec:
    """Read and compile the document at `path`; raises OpenAPIError saying why not."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise OpenAPIError(f"cannot read OpenAPI document {path}: {exc.strerror}") from None
    key = (path, digest_of(text))
    spec = _cached(key)
    if spec is not None:
        return spec
    held = _HELD_ELSEWHERE.get(key)
    if held is not None:
        return _compile(key, _stand_in(key[1], held))
    return _compile(key, parse(text, source=path))


def held() -> dict[tuple[str, str], Spec]:
    """The compiled documents of this process by (path, digest), as they are now."""
    with _LOCK:
        return dict(_CACHE)


def held_elsewhere(operations: dict[tuple[str, str], tuple[str, ...]]) -> None:
    """Say which documents the serving process holds compiled (a loading child's call):
    load() then answers those with a stand-in that has their operation ids (all the
    policy's checks read) and none of their schemas. The child's answer names each
    stand-in by its (path, digest), never pickling it (policy/child.py)."""
    _HELD_ELSEWHERE.clear()
    _HELD_ELSEWHERE.update(operations)


def _stand_in(digest: str, operations: tuple[str, ...]) -> Document:
    paths = {f"/{i}": {"get": {"operationId": op}} for i, op in enumerate(operations)}
    return Document(data={"openapi": "3.1.0", "paths": paths}, version="3.1", digest=digest)


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
    "held",
    "held_elsewhere",
    "load",
    "parse",
    "read",
]
