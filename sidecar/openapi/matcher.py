"""Method + path -> operation, through a tree of path segments built once per document.

A request walks one node per segment: a literal segment is a dict lookup, and
only where it misses are the templated children (`{id}`, `{name}.json`) tried,
so `/pets/mine` wins over `/pets/{id}` as OpenAPI asks, whatever the order of
the document. Nothing is compiled per request.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Generic, TypeVar
from urllib.parse import unquote

T = TypeVar("T")

_PARAM = re.compile(r"\{([^{}/]+)\}")


class _Node(Generic[T]):
    __slots__ = ("literals", "methods", "params", "template")

    def __init__(self) -> None:
        self.literals: dict[str, _Node[T]] = {}
        # (name of a whole-segment parameter, or a pattern for a mixed one, names, child)
        self.params: list[tuple[re.Pattern[str] | None, tuple[str, ...], _Node[T]]] = []
        self.methods: dict[str, T] | None = None
        self.template = ""


class Matcher(Generic[T]):
    """Templates (`/repos/{owner}/{repo}`) with one value per method each."""

    def __init__(self, entries: Iterable[tuple[str, str, T]]) -> None:
        self._root: _Node[T] = _Node()
        for template, method, value in entries:
            node = self._insert(template)
            if node.methods is None:
                node.methods = {}
                node.template = template
            node.methods[method.upper()] = value

    def _insert(self, template: str) -> _Node[T]:
        node = self._root
        for segment in template.strip("/").split("/") if template.strip("/") else []:
            names = tuple(_PARAM.findall(segment))
            if not names:
                node = node.literals.setdefault(segment, _Node())
                continue
            pattern: re.Pattern[str] | None = None
            if segment != "{" + names[0] + "}" or len(names) > 1:
                parts = _PARAM.split(segment)  # literal, name, literal, name, ..., literal
                pattern = re.compile(
                    "".join(re.escape(p) if i % 2 == 0 else "(.+?)" for i, p in enumerate(parts))
                    + r"\Z"
                )
            for p, n, child in node.params:
                if n == names and (p.pattern if p else None) == (
                    pattern.pattern if pattern else None
                ):
                    node = child
                    break
            else:
                child = _Node()
                node.params.append((pattern, names, child))
                # Mixed segments (`{name}.json`) are more specific than a bare `{id}`.
                node.params.sort(key=lambda entry: entry[0] is None)
                node = child
        return node

    def match(self, path: str) -> tuple[str, dict[str, T], dict[str, str]] | None:
        """(template, its values by method, path parameters); None: no template matches.

        `path` is as sent (percent-encoded, no query); a parameter's value is
        decoded after splitting, so an encoded `/` stays inside its segment.
        """
        stripped = path.strip("/")
        segments = stripped.split("/") if stripped else []
        if stripped and path.endswith("/"):
            segments.append("")  # `/pets/` is not `/pets`: OpenAPI paths are exact
        params: dict[str, str] = {}
        node = self._walk(self._root, segments, 0, params)
        if node is None or node.methods is None:
            return None
        return node.template, node.methods, params

    def _walk(
        self, node: _Node[T], segments: list[str], i: int, params: dict[str, str]
    ) -> _Node[T] | None:
        if i == len(segments):
            return node if node.methods is not None else None
        segment = segments[i]
        child = node.literals.get(segment)
        if child is None and "%" in segment:
            child = node.literals.get(unquote(segment))
        if child is not None:
            found = self._walk(child, segments, i + 1, params)
            if found is not None:
                return found
        if not segment:
            return None
        for pattern, names, child in node.params:
            if pattern is None:
                values: tuple[str, ...] = (segment,)
            else:
                m = pattern.match(segment)
                if m is None:
                    continue
                values = m.groups()
            found = self._walk(child, segments, i + 1, params)
            if found is not None:
                for name, value in zip(names, values, strict=True):
                    params[name] = unquote(value)
                return found
        return None
