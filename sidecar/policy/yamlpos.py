"""YAML loading that remembers where every key and value stood in the file.

Validation errors must point at FILE:LINE:COL, so the loader keeps, for every
path into the document (("services", "github", "auth", "token"), ...), the
position of the key and of its value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.reader import ReaderError

from .positions import Position, Problem

Path = tuple[str | int, ...]


class YamlError(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(str(problem))
        self.problem = problem


@dataclass(slots=True)
class Document:
    """A parsed file: its data plus the positions of keys and values by path."""

    file: str
    data: Any
    keys: dict[Path, Position] = field(default_factory=dict)
    values: dict[Path, Position] = field(default_factory=dict)
    # Where a value that is not written in this file came from (a template's keys),
    # added to the message of an error at that path.
    notes: dict[Path, str] = field(default_factory=dict)

    def position(self, path: Path) -> Position:
        """The key's position when the path names a key, else the nearest known ancestor."""
        for i in range(len(path), -1, -1):
            prefix = path[:i]
            pos = self.keys.get(prefix) or self.values.get(prefix)
            if pos is not None:
                return pos
        return Position(self.file, 1, 1)

    def value_position(self, path: Path) -> Position:
        return self.values.get(path) or self.position(path)


def _pos(file: str, node: Node) -> Position:
    return Position(file, node.start_mark.line + 1, node.start_mark.column + 1)


def _reader_position(file: str, text: str, index: int) -> Position:
    """Line and column of a character index, counting line breaks as YAML's marks do."""
    line, col = 1, 1
    for i, ch in enumerate(text[:index]):
        if ch in "\n\x85\u2028\u2029" or (ch == "\r" and text[i + 1 : i + 2] != "\n"):
            line, col = line + 1, 1
        else:
            col += 1
    return Position(file, line, col)


def load_document(text: str, file: str) -> Document:
    try:
        # The reader refuses control characters (NUL, ESC, ...) here, before any mark exists.
        loader = yaml.SafeLoader(text)
    except ReaderError as exc:
        raise YamlError(
            Problem(
                _reader_position(file, text, exc.position),
                f"invalid YAML: character U+{exc.character:04X} is not allowed",
            )
        ) from None
    loader.name = file
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = exc.problem or exc.context or "invalid YAML"
        raise YamlError(Problem(Position(file, line, col), f"invalid YAML: {message}")) from None
    except yaml.YAMLError as exc:
        raise YamlError(Problem(Position(file, 1, 1), f"invalid YAML: {exc}")) from None

    doc = Document(file=file, data=None)
    try:
        if root is not None:
            doc.values[()] = _pos(file, root)
            doc.data = _build(loader, root, (), doc)
    except RecursionError:
        # An alias that contains itself (`x: &a [*a]`) or absurd nesting.
        where = _pos(file, root) if root is not None else Position(file, 1, 1)
        raise YamlError(
            Problem(where, "invalid YAML: recursive alias or nesting too deep")
        ) from None
    finally:
        loader.dispose()
    return doc


def _build(loader: yaml.SafeLoader, node: Node, path: Path, doc: Document) -> Any:
    if isinstance(node, MappingNode):
        loader.flatten_mapping(node)  # resolves `<<: *anchor` merge keys
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            # Keys are taken as written: YAML 1.1 would turn `on:` (a retry key) into True.
            if not isinstance(key_node, ScalarNode):
                raise YamlError(Problem(_pos(doc.file, key_node), "keys must be plain strings"))
            key = key_node.value
            if key in out:
                raise YamlError(Problem(_pos(doc.file, key_node), f"duplicate key '{key}'"))
            child = (*path, key)
            doc.keys[child] = _pos(doc.file, key_node)
            doc.values[child] = _pos(doc.file, value_node)
            out[key] = _build(loader, value_node, child, doc)
        return out
    if isinstance(node, SequenceNode):
        items = []
        for i, item in enumerate(node.value):
            child = (*path, i)
            doc.values[child] = _pos(doc.file, item)
            items.append(_build(loader, item, child, doc))
        return items
    if isinstance(node, ScalarNode):
        return loader.construct_object(node, deep=True)
    raise YamlError(Problem(_pos(doc.file, node), "unsupported YAML node"))
