"""Observed paths to templates: `/repos/python/cpython` and `/repos/psf/black` become
`/repos/{owner}/{repo}`.

A segment becomes a parameter when
- it looks like a value by itself: a number, a UUID, a date, a hex hash, an e-mail, a
  long token mixing letters and digits (`value_kind`); or
- it is one of several siblings at the same place that tell the same kind of thing
  apart. Siblings are merged when they sit under a collection (a static plural such as
  `repos`, `users`), when there are many of them (`_MANY`), or when they sit under a
  parameter and each belongs to one value of it only (a repository name belongs to
  its owner; `issues`, found under several repositories, is a word of the API); or
- it is the one value seen under a collection and the path goes on below it
  (`/orgs/python/repos`).
Paths are never merged at their first segment unless the segment is a value.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

_MANY = 6  # this many distinct siblings are values, whatever sits above them

_UUID = re.compile(
    r"^[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}$"
)
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?(Z|[+-]\d{2}:?\d{2})?)?$")
_HEX = re.compile(r"^[0-9a-fA-F]{7,}$")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?$")
_EMAIL = re.compile(r"^[^@/\s]+@[^@/\s]+\.[A-Za-z]{2,}$")
# Prefixed ids (`cus_9s8d7f`, `chatcmpl-AbC123`, `msg_01XyZ`): a word, a separator, a token.
_PREFIXED = re.compile(r"^[a-z]{2,12}[_-][A-Za-z0-9]{6,}$")
_TOKEN = re.compile(r"^[A-Za-z0-9_-]{16,}$")


def value_kind(segment: str) -> str | None:
    """What kind of value a segment is by its look alone, or None when it could be a word."""
    if _NUMBER.match(segment):
        return "integer" if "." not in segment else "number"
    if _UUID.match(segment):
        return "uuid"
    if _DATE.match(segment):
        return "date" if len(segment) == 10 else "date-time"
    if _HEX.match(segment) and any(c.isdigit() for c in segment):
        return "hash"
    if _EMAIL.match(segment):
        return "email"
    if _PREFIXED.match(segment) and any(c.isdigit() for c in segment):
        return "id"
    if _TOKEN.match(segment) and any(c.isdigit() for c in segment):
        return "id"
    return None


def singular(word: str) -> str:
    word = re.sub(r"[^A-Za-z0-9_]", "_", word).strip("_").lower() or "item"
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith(("sses", "shes", "ches", "xes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith("ss") and len(word) > 3:
        return word[:-1]
    return word


def _plural(word: str) -> bool:
    return len(word) > 3 and word.endswith("s") and not word.endswith("ss") and word.isalpha()


@dataclass
class _Node:
    # literal segment -> child; the observed values of one merged parameter live in `values`
    children: dict[str, _Node] = field(default_factory=dict)
    terminal: bool = False
    # The original values seen above, for the "belongs to one parent value" test.
    parents: set[str] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class Segment:
    text: str  # the literal, or the parameter's name
    param: bool = False
    kind: str | None = None  # value_kind of the parameter's values, when they agree

    def render(self) -> str:
        return "{" + self.text + "}" if self.param else self.text


@dataclass(frozen=True, slots=True)
class Template:
    segments: tuple[Segment, ...]

    @property
    def path(self) -> str:
        return "/" + "/".join(s.render() for s in self.segments)

    @property
    def glob(self) -> str:
        """The allow-rule glob for it: each parameter one `*` segment."""
        return "/" + "/".join("*" if s.param else s.text for s in self.segments)

    def match(self, path: str) -> bool:
        parts = _split(path)
        if len(parts) != len(self.segments):
            return False
        return all(s.param or s.text == p for s, p in zip(self.segments, parts, strict=True))


def _split(path: str) -> list[str]:
    path = path.split("?", 1)[0]
    return [p for p in path.split("/") if p != ""]


class Templater:
    """Learns templates from observed paths (`add`), then names each path's template."""

    def __init__(self) -> None:
        self._paths: dict[tuple[str, ...], int] = {}

    def add(self, path: str) -> None:
        key = tuple(_split(path))
        self._paths[key] = self._paths.get(key, 0) + 1

    def templates(self) -> dict[tuple[str, ...], Template]:
        """Each observed path (as its segments) -> its template."""
        out: dict[tuple[str, ...], Template] = {}
        groups: dict[int, list[tuple[str, ...]]] = {}
        for key in self._paths:
            groups.setdefault(len(key), []).append(key)
        for keys in groups.values():
            out.update(_template_group(keys))
        return out

    def template(self, path: str) -> Template | None:
        return self.templates().get(tuple(_split(path)))


def _template_group(keys: list[tuple[str, ...]]) -> dict[tuple[str, ...], Template]:
    """Templates for paths of one length, decided position by position, left to right:
    paths that agree on the template so far are judged together at the next position."""
    shapes: dict[tuple[str, ...], list[Segment]] = {k: [] for k in keys}
    depth = len(keys[0]) if keys else 0
    for i in range(depth):
        # The paths that share a template prefix so far form one group at position i.
        by_prefix: dict[tuple[Segment, ...], list[tuple[str, ...]]] = {}
        for key in keys:
            by_prefix.setdefault(tuple(shapes[key]), []).append(key)
        for prefix, members in by_prefix.items():
            values = {k[i] for k in members}
            merged = _merge(i, prefix, members, values)
            for key in members:
                value = key[i]
                kind = value_kind(value)
                if merged or kind is not None:
                    shapes[key].append(Segment("", True, kind))
                else:
                    shapes[key].append(Segment(value))
    return {k: Template(_named(v)) for k, v in shapes.items()}


def _merge(
    i: int, prefix: tuple[Segment, ...], members: list[tuple[str, ...]], values: set[str]
) -> bool:
    words = {v for v in values if value_kind(v) is None}
    if not words or i == 0:
        return False
    above = prefix[-1]
    deeper = i + 1 < len(members[0])
    if len(words) == 1:
        # One value seen: an item of a collection when the path goes on below it
        # (`/orgs/python/repos`), else it could as well be a word of the API.
        return deeper and not above.param and _plural(above.text)
    if len(words) >= _MANY:
        return True
    if not above.param:
        return _plural(above.text)
    # Under a parameter: merge when no word is found under two values of it.
    seen_under: dict[str, set[str]] = {}
    for key in members:
        if key[i] in words:
            seen_under.setdefault(key[i], set()).add(key[i - 1])
    return all(len(parents) == 1 for parents in seen_under.values())


def _named(segments: list[Segment]) -> tuple[Segment, ...]:
    """Names the parameters after the collection they follow: `/repos/{owner}/{repo}`,
    `/users/{user}`, `/issues/{issue_id}`; unique within the path."""
    out: list[Segment] = []
    used: set[str] = set()
    for index, seg in enumerate(segments):
        if not seg.param:
            out.append(seg)
            continue
        # The static segment this parameter (run) follows.
        j = index
        while j > 0 and segments[j - 1].param:
            j -= 1
        base = singular(segments[j - 1].text) if j > 0 else "id"
        run_length = 0
        k = j
        while k < len(segments) and segments[k].param:
            run_length += 1
            k += 1
        position = index - j
        if seg.kind in ("integer", "uuid", "hash", "id") and run_length == 1:
            name = f"{base}_id" if base != "id" else "id"
        elif run_length == 2 and position == 0:
            name = "owner"
        else:
            name = base
        candidate, n = name, 2
        while candidate in used:
            candidate = f"{name}_{n}"
            n += 1
        used.add(candidate)
        out.append(Segment(candidate, True, seg.kind))
    return tuple(out)


def template_all(paths: Iterable[str]) -> dict[str, Template]:
    """Each path -> its template (a convenience for tests and one-shot use)."""
    templater = Templater()
    listed = list(paths)
    for p in listed:
        templater.add(p)
    found = templater.templates()
    return {p: found[tuple(_split(p))] for p in listed}
