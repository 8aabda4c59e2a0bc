"""JSON values to JSON Schema (2020-12, as OpenAPI 3.1 uses it), merged across samples.

A property is `required` only when every sample of the object has it; a string gets a
`format` when every value has it (uuid, date-time, date, email, uri), and an `enum`
only when few short words were seen, often: a value that could be personal or secret
(digits, long text, a field named like a credential or beneath one) is never written
down.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from .paths import value_kind

_ENUM_MAX = 6  # at most this many distinct values
_ENUM_MIN_SEEN = 3  # seen at least this many times in all
_WORD = re.compile(r"^[A-Za-z][A-Za-z_.-]{0,23}$")
_SECRETISH = re.compile(
    r"(key|token|secret|pass|pwd|private|auth|cookie|session|signature|credential|jwt|bearer)"
    r"|(^|[^a-z])(pin|otp)([^a-z]|$)",
    re.I,
)
_FORMATS = (
    (
        "uuid",
        re.compile(
            r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
        ),
    ),
    (
        "date-time",
        re.compile(r"^\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?$"),
    ),
    ("date", re.compile(r"^\d{4}-\d{2}-\d{2}$")),
    ("email", re.compile(r"^[^@\s]+@[^@\s]+\.[A-Za-z]{2,}$")),
    ("uri", re.compile(r"^https?://\S+$")),
)
_MAX_DEPTH = 12  # deeper values are described as `{}` (anything)
_MAX_PROPERTIES = 200


def data_key(key: str) -> bool:
    """An object key that is a value (a number, UUID, date, hash, e-mail, id or token), as
    a path segment would be one: the object is a map, not a record."""
    return value_kind(key) is not None


def string_format(value: str) -> str | None:
    for name, pattern in _FORMATS:
        if pattern.match(value):
            return name
    return None


@dataclass
class Shape:
    """What was seen at one place in the samples (a union over all of them)."""

    seen: int = 0
    types: set[str] = field(default_factory=set)  # JSON Schema type names
    properties: dict[str, Shape] = field(default_factory=dict)
    objects: int = 0  # how many of the samples here were objects
    items: Shape | None = None
    formats: set[str | None] = field(default_factory=set)
    words: dict[str, int] = field(default_factory=dict)
    enumerable: bool = True
    truncated: bool = False
    # The values of an object used as a map, keyed by data (ids, e-mail addresses, API
    # keys): its keys are never written down.
    additional: Shape | None = None

    def add(self, value: Any, *, name: str = "", depth: int = 0) -> None:
        self.seen += 1
        if depth > _MAX_DEPTH:
            self.truncated = True
            return
        if value is None:
            self.types.add("null")
        elif isinstance(value, bool):
            self.types.add("boolean")
        elif isinstance(value, int):
            self.types.add("integer")
        elif isinstance(value, float):
            self.types.add("number")
        elif isinstance(value, str):
            self.types.add("string")
            self.formats.add(string_format(value))
            self._word(value, name)
        elif isinstance(value, list):
            self.types.add("array")
            if self.items is None:
                self.items = Shape()
            for item in value[:50]:
                self.items.add(item, name=name, depth=depth + 1)
        elif isinstance(value, dict):
            self.types.add("object")
            self.objects += 1
            secret = bool(name) and _SECRETISH.search(name) is not None
            for key, item in value.items():
                if not isinstance(key, str):
                    continue
                # What is beneath a credential's field is as secret as it: its name passes on.
                inner = name if secret else key
                if data_key(key):
                    if self.additional is None:
                        self.additional = Shape()
                    self.additional.add(item, name=name if secret else "", depth=depth + 1)
                    continue
                child = self.properties.get(key)
                if child is None:
                    if len(self.properties) >= _MAX_PROPERTIES:
                        self.truncated = True
                        continue
                    child = self.properties[key] = Shape()
                child.add(item, name=inner, depth=depth + 1)

    def _word(self, value: str, name: str) -> None:
        if not self.enumerable:
            return
        if _SECRETISH.search(name) or not _WORD.match(value):
            self.enumerable = False
            self.words.clear()
            return
        self.words[value] = self.words.get(value, 0) + 1
        if len(self.words) > _ENUM_MAX:
            self.enumerable = False
            self.words.clear()

    def schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        types = sorted(self.types)
        if "integer" in self.types and "number" in self.types:
            types.remove("integer")
        if len(types) == 1:
            out["type"] = types[0]
        elif types:
            out["type"] = types
        if "string" in self.types:
            formats = self.formats - {None}
            if len(formats) == 1 and None not in self.formats:
                out["format"] = next(iter(formats))
            strings = sum(self.words.values())
            if (
                self.enumerable
                and self.words
                and strings >= _ENUM_MIN_SEEN
                and len(self.words) < strings
                and "format" not in out
            ):
                enum: list[Any] = sorted(self.words)
                if "null" in self.types:
                    enum.append(None)
                out["enum"] = enum
        if "object" in self.types:
            out["properties"] = {k: v.schema() for k, v in sorted(self.properties.items())}
            required = sorted(k for k, v in self.properties.items() if v.seen == self.objects)
            if required and self.objects:
                out["required"] = required
        if "object" in self.types and self.additional is not None:
            out["additionalProperties"] = self.additional.schema()
        if "array" in self.types and self.items is not None and self.items.seen:
            out["items"] = self.items.schema()
        return out


def infer(values: list[Any]) -> dict[str, Any]:
    shape = Shape()
    for value in values:
        shape.add(value)
    return shape.schema()
