"""Reading an OpenAPI 3.0/3.1 document and following its local `$ref`s.

Only references inside the document (`#/components/...`) are followed: the
sidecar reads nothing but the file the policy names, so a document that
points at other files must be bundled first (e.g. `redocly bundle`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")


class OpenAPIError(Exception):
    """The document cannot be used; the message says where in it and why."""


@dataclass(frozen=True, slots=True)
class Document:
    data: dict[str, Any]
    version: str  # "3.0" or "3.1"
    digest: str  # of the file's bytes: an unchanged document compiles to the same thing

    @property
    def title(self) -> str:
        info = self.data.get("info")
        return str(info.get("title", "")) if isinstance(info, dict) else ""


def _yaml(text: bytes) -> Any:
    # PyYAML only for a YAML document: a process that receives its documents parsed
    # (the serving process, policy/child.py) never imports it.
    import yaml

    try:  # libyaml: a large document (GitHub's is 13 MB) loads several times faster
        from yaml import CSafeLoader as Loader
    except ImportError:  # pragma: no cover - PyYAML built without libyaml
        from yaml import SafeLoader as Loader  # type: ignore[assignment]
    try:
        return yaml.load(text, Loader)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc)) from None


def digest_of(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()[:16]


def parse(text: bytes, *, source: str) -> Document:
    """A document from JSON or YAML text (JSON is YAML, but json.loads is much faster)."""
    digest = digest_of(text)
    data: Any
    try:
        stripped = text.lstrip()
        data = json.loads(text) if stripped[:1] in (b"{", b"[") else _yaml(text)
    except ValueError as exc:
        raise OpenAPIError(f"{source}: not valid JSON or YAML: {_first_line(exc)}") from None
    if not isinstance(data, dict):
        raise OpenAPIError(f"{source}: an OpenAPI document is a mapping")
    if "swagger" in data:
        raise OpenAPIError(
            f"{source}: Swagger {data['swagger']} is not supported; convert it to OpenAPI 3"
        )
    raw = str(data.get("openapi", ""))
    if raw.startswith("3.0"):
        version = "3.0"
    elif raw.startswith("3.1"):
        version = "3.1"
    else:
        raise OpenAPIError(f"{source}: 'openapi' must be 3.0.x or 3.1.x, not {raw or 'missing'!r}")
    paths = data.get("paths", {})
    if not isinstance(paths, dict):
        raise OpenAPIError(f"{source}: 'paths' must be a mapping")
    return Document(data=data, version=version, digest=digest)


def read(path: str) -> Document:
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as exc:
        raise OpenAPIError(f"cannot read OpenAPI document {path}: {exc.strerror}") from None
    return parse(text, source=path)


def pointer(doc: dict[str, Any], ref: str) -> Any:
    """The value a local reference (`#/a/b~1c`) names."""
    if not ref.startswith("#"):
        raise OpenAPIError(
            f"$ref {ref!r} points outside the document; bundle it into one file first"
        )
    node: Any = doc
    for part in ref[1:].split("/")[1:]:
        key = part.replace("~1", "/").replace("~0", "~")
        if isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        elif isinstance(node, dict) and key in node:
            node = node[key]
        else:
            raise OpenAPIError(f"$ref {ref!r} names nothing in the document")
    return node


def deref(doc: dict[str, Any], node: Any) -> Any:
    """Follow a chain of `$ref`s (of a parameter, request body, response...) to its target."""
    seen: set[str] = set()
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if ref in seen:
            raise OpenAPIError(f"$ref {ref!r} refers to itself")
        seen.add(ref)
        node = pointer(doc, ref)
    return node


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
