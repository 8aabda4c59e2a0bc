"""A GraphQL operation measured: its type, name, depth, aliases and estimated cost.

Parsing is graphql-core's; documents are cached by a hash of their text, so
an agent that sends the same query again (the usual case) costs a dict lookup
and one walk of the tree.

The cost estimate, a simplified form of GitHub's node limit: every field
costs 1, and the fields inside a field with a `first`, `last` or `limit`
argument cost that many times more (the page size, from a literal or a
variable). `{ repos(first: 10) { issues(first: 20) { title } } }` costs
1 + 10 * (1 + 20 * 1) = 211. Fragments count where they are spread; the walk
measures each fragment once, so a document that spreads fragments into
fragments cannot make it take exponential time.

Introspection (`__schema`, `__type`) is measured apart: the standard query of gql,
GraphiQL and code generators is about 15 levels deep, and a limit set for the
API's data would refuse it. Those selections count toward none of the limits; the
operation is flagged instead (`graphql.introspection` decides), and their own depth
is bounded by INTROSPECTION_MAX_DEPTH.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    SelectionSetNode,
    VariableNode,
    parse,
)

# Tokens parsed at most per document: parsing happens on the event loop, and a
# real operation is far smaller than this.
MAX_TOKENS = 20_000
# Documents kept parsed; the least recently used goes first.
CACHE_SIZE = 512
PAGE_ARGUMENTS = frozenset({"first", "last", "limit"})
# The page size assumed for a literal too long to be a real one.
HUGE_PAGE = 10**18
INTROSPECTION_FIELDS = frozenset({"__schema", "__type"})
# Deeper than any client's standard introspection query (about 15, `ofType` nested 8
# times), shallow enough that a crafted one cannot walk the schema without end.
INTROSPECTION_MAX_DEPTH = 20


class InvalidOperation(Exception):
    """The request holds no operation the sidecar can measure (the text says why)."""


class TooComplex(Exception):
    """The document is too large or too deeply nested to measure."""


@dataclass(frozen=True, slots=True)
class Operation:
    type: str  # query, mutation or subscription
    name: str  # "" for an anonymous operation
    depth: int
    aliases: int
    cost: int
    # Selects `__schema` or `__type` (measured apart from the limits above).
    introspection: bool = False
    introspection_depth: int = 0

    @property
    def label(self) -> str:
        return f"{self.type}:{self.name}"

    def describe(self) -> str:
        return f"GraphQL {self.type} '{self.name}'" if self.name else f"anonymous {self.type}"


class Documents:
    """Parsed documents by the hash of their text; parse failures are kept too."""

    def __init__(self, size: int = CACHE_SIZE) -> None:
        self._size = size
        self._items: OrderedDict[bytes, DocumentNode | Exception] = OrderedDict()

    def parse(self, text: str) -> DocumentNode:
        key = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        found = self._items.get(key)
        if found is None:
            found = _parse(text)
            self._items[key] = found
            if len(self._items) > self._size:
                self._items.popitem(last=False)
        else:
            self._items.move_to_end(key)
        if isinstance(found, Exception):
            raise found
        return found


def _parse(text: str) -> DocumentNode | Exception:
    try:
        return parse(text, no_location=True, max_tokens=MAX_TOKENS)
    except RecursionError:
        return TooComplex("the document is nested too deeply to parse")
    except GraphQLError as err:
        # graphql-core's own guards against a document built to exhaust the parser.
        if "tokens" in err.message or "nested too deeply" in err.message:
            return TooComplex(
                f"the document is too large (over {MAX_TOKENS} tokens) or nested too deeply"
            )
        return InvalidOperation(f"the query is not valid GraphQL: {err.message}")


def measure(
    document: DocumentNode, operation_name: str | None, variables: Mapping[str, Any]
) -> Operation:
    """The operation `operation_name` picks (or the only one), measured."""
    operations = [d for d in document.definitions if isinstance(d, OperationDefinitionNode)]
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    if operation_name is not None:
        wanted = operation_name
        chosen = [op for op in operations if op.name is not None and op.name.value == wanted]
        if not chosen:
            raise InvalidOperation(f"the document has no operation named '{operation_name}'")
    elif len(operations) != 1:
        raise InvalidOperation(
            "the document holds no operation"
            if not operations
            else f"the document holds {len(operations)} operations: name one in operationName"
        )
    else:
        chosen = operations
    op = chosen[0]
    defaults: dict[str, Any] = {}
    for definition in op.variable_definitions or ():
        default = definition.default_value
        if isinstance(default, IntValueNode) and len(default.value) < 19:
            defaults[definition.variable.name.value] = int(default.value)
    walk = _Walk(fragments, {**defaults, **variables})
    try:
        depth, aliases, cost = walk.selections(op.selection_set)
    except RecursionError:
        raise TooComplex("the operation is nested too deeply to measure") from None
    return Operation(
        type=op.operation.value,
        name=op.name.value if op.name is not None else "",
        depth=depth,
        aliases=aliases,
        cost=cost,
        introspection=walk.introspection_depth > 0,
        introspection_depth=walk.introspection_depth,
    )


class _Walk:
    def __init__(
        self, fragments: dict[str, FragmentDefinitionNode], variables: Mapping[str, Any]
    ) -> None:
        self.fragments = fragments
        self.variables = variables
        self.measured: dict[str, tuple[int, int, int]] = {}
        self.open: set[str] = set()
        # The deepest introspection selection, from its `__schema`/`__type` field down.
        self.introspection_depth = 0

    def selections(self, selection_set: SelectionSetNode) -> tuple[int, int, int]:
        """(depth, aliases, cost) of a selection set."""
        depth = aliases = cost = 0
        for node in selection_set.selections:
            if isinstance(node, FieldNode):
                if node.name.value in INTROSPECTION_FIELDS:
                    inner = (0, 0, 0)
                    if node.selection_set is not None:
                        inner = self.selections(node.selection_set)
                    self.introspection_depth = max(self.introspection_depth, inner[0] + 1)
                    continue
                inner = (0, 0, 0)
                if node.selection_set is not None:
                    inner = self.selections(node.selection_set)
                depth = max(depth, inner[0] + 1)
                aliases += inner[1] + (node.alias is not None)
                cost += 1 + self.page_size(node) * inner[2]
                continue
            if isinstance(node, InlineFragmentNode):
                inner = self.selections(node.selection_set)
            elif isinstance(node, FragmentSpreadNode):
                inner = self.fragment(node.name.value)
            else:  # pragma: no cover - the three kinds of selection
                continue
            depth = max(depth, inner[0])
            aliases += inner[1]
            cost += inner[2]
        return depth, aliases, cost

    def fragment(self, name: str) -> tuple[int, int, int]:
        found = self.measured.get(name)
        if found is not None:
            return found
        if name in self.open:
            raise InvalidOperation(f"fragment '{name}' spreads itself")
        definition = self.fragments.get(name)
        if definition is None:
            raise InvalidOperation(f"the document has no fragment named '{name}'")
        self.open.add(name)
        found = self.measured[name] = self.selections(definition.selection_set)
        self.open.discard(name)
        return found

    def page_size(self, field: FieldNode) -> int:
        for argument in field.arguments or ():
            if argument.name.value not in PAGE_ARGUMENTS:
                continue
            value = argument.value
            if isinstance(value, IntValueNode):
                # Past Python's int-from-text limit it is larger than any page anyway.
                digits = value.value
                return max(1, int(digits)) if len(digits) < 19 else HUGE_PAGE
            if isinstance(value, VariableNode):
                given = self.variables.get(value.name.value)
                if isinstance(given, int) and not isinstance(given, bool):
                    return max(1, given)
        return 1
