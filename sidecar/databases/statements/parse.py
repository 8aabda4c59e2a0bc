"""One SQL string, parsed once by PostgreSQL's own grammar (pglast, i.e. libpg_query).

`parse()` walks the parse tree (libpg_query's JSON form, which pglast builds in C and
is several times cheaper than its Python node objects) and records what the string
does: its statements' kinds, the tables each reads or writes, the functions it calls,
and what it does that no rule may allow (a guard). Nothing here looks at SQL text
with anything but PostgreSQL's lexer and parser.

Tables are named as PostgreSQL resolves them with `search_path = public`: an
unqualified name is `public.x` (the sidecar pins that search path and refuses SET
search_path), except that a name starting with `pg_` may also be the catalog's
(pg_catalog is searched first), so it counts as both. A CTE's name is not a table
inside the statement that defines it, with PostgreSQL's scoping: a non-recursive
CTE does not see itself, so `WITH t AS (SELECT * FROM t) ...` reads the table t.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from .kinds import (
    CATALOG_SCHEMAS,
    COMMENT_TOKENS,
    DDL,
    DDL_PREFIXES,
    DML,
    GUARDED_SETTINGS,
    HOUSEKEEPING,
    HOUSEKEEPING_STATEMENTS,
    LARGE_OBJECT_FUNCTIONS,
    LITERAL_TOKENS,
    REFUSED_STATEMENTS,
    RELATION_OBJECTS,
    SENSITIVE_CATALOG,
    SIMPLE,
    WRITE_KINDS,
    refused_function,
)
from .names import identifier
from .shape import integer_spans, shape
from .verdict import FORBIDDEN, INSUFFICIENT_PRIVILEGE, Verdict

# Texts longer than this are parsed every time rather than kept in the cache: a few
# huge statements must not pin megabytes. Each of the two caches (by text, by shape)
# keeps this many.
CACHE_ENTRIES: Final = 2048
CACHE_MAX_TEXT: Final = 8 * 1024
# The kinds whose verdict no integer literal can change (see shape.py).
_SHAPE_KINDS: Final = frozenset({"select", "insert", "update", "delete", "merge"})

_NO_CTES: Final[frozenset[str]] = frozenset()
# Nodes that hold no table, function or statement: not walked (a bulk INSERT's VALUES
# holds thousands of them).
_LEAVES: Final = frozenset(
    {"A_Const", "ColumnRef", "ParamRef", "String", "Integer", "Float", "Boolean", "A_Star"}
)


@dataclass(frozen=True, slots=True)
class Access:
    """One table a statement touches. `schema` is None for an object that is not a
    table (DROP SCHEMA, GRANT ... ON SCHEMA): only a rule on every table covers it."""

    action: str  # the kind it needs on that table: "select" for a read
    schema: str | None
    name: str
    write: bool
    catalog: bool  # a catalog read any agent that may SELECT may make

    @property
    def table(self) -> str:
        if self.schema is None:
            return self.name
        return f"{identifier(self.schema)}.{identifier(self.name)}"


class StatementError(Exception):
    """The text does not parse (SQLSTATE 42601), or nests too deeply to be checked
    (54001, PostgreSQL's statement_too_complex); `.message` says where or why."""

    def __init__(self, message: str, position: int | None = None, sqlstate: str = "42601") -> None:
        super().__init__(message)
        self.message = message
        # 1-based character position, as an ErrorResponse's P field wants it.
        self.position = position
        self.sqlstate = sqlstate


@dataclass(frozen=True, slots=True)
class Statement:
    """One SQL string (possibly several statements), parsed once and cached by its text
    or its shape. It holds no text but `normalized` (literals replaced by "?"), which
    every text of one shape shares: a Statement is never one call's."""

    kinds: frozenset[str]
    reads: frozenset[str]
    writes: frozenset[str]
    functions: frozenset[str]
    count: int
    operation: str
    collection: str | None
    normalized: str
    # What the rules engine needs, worked out once here so judging is a few lookups.
    accesses: tuple[Access, ...] = field(default=(), repr=False)
    needs: frozenset[str] = field(default=frozenset(), repr=False)  # kinds a rule must allow
    refusal: Verdict | None = field(default=None, repr=False)  # refused whatever the rules
    read_write: bool = field(default=False, repr=False)  # asks for a read-write transaction
    write: Access | None = field(default=None, repr=False)  # the first write, if any
    write_kind: str | None = field(default=None, repr=False)  # the first write kind
    # "RESET ALL" or "DISCARD ALL" when the string holds one: they undo the session's
    # guards, so they are refused unless the connector restores the guards after them.
    resets_all: str | None = field(default=None, repr=False)


def parse(text: str) -> Statement:
    """Parse `text`; StatementError when PostgreSQL's grammar rejects it."""
    statement = _texts.get(text)
    if statement is not None:
        return statement
    if len(text) > CACHE_MAX_TEXT:
        return _parse(text)
    key = shape(text)
    if key is not None:
        statement = _shapes.get(key)
        if statement is not None:
            return statement
    statement = _parse(text)
    if key is not None and shape_safe(statement) and _scanner_agrees(text):
        _keep(_shapes, key, statement)
    else:
        _keep(_texts, text, statement)
    return statement


# Statements by text and by shape (their text with integer literals masked, see
# shape.py), oldest first: the oldest goes when one is full. A text whose shape is
# kept is not kept by text too (pgbench's texts would crowd the others out).
_texts: dict[str, Statement] = {}
_shapes: dict[str, Statement] = {}


def _keep(cache: dict[str, Statement], key: str, statement: Statement) -> None:
    if len(cache) >= CACHE_ENTRIES:
        del cache[next(iter(cache))]
    cache[key] = statement


def shape_safe(statement: Statement) -> bool:
    """Whether every text of this statement's shape gets the same verdict: plain DML,
    not refused, no set_config (judged on its string arguments), no transaction options."""
    return (
        statement.refusal is None
        and statement.count > 0
        and statement.kinds <= _SHAPE_KINDS
        and "set_config" not in statement.functions
        and not statement.read_write
        and statement.resets_all is None
    )


def _scanner_agrees(text: str) -> bool:
    """Whether PostgreSQL's own scanner reads every span `shape` masks as an integer
    literal: the shape's lexer is trusted only where the real one agrees."""
    from pglast import parser

    spans = integer_spans(text)
    if not spans:
        return False
    integers = {(t.start, t.end + 1) for t in parser.scan(text) if t.name == "ICONST"}
    return all(span in integers for span in spans)


def _parse(text: str) -> Statement:
    try:
        return _parse_tree(text)
    except RecursionError:
        # Hundreds of nested expressions (`1 + 1 + ...`, subqueries in subqueries):
        # refused rather than judged in part.
        raise StatementError(
            "statement refused: it nests too deeply for the sidecar to check; "
            "split it, or nest fewer expressions",
            sqlstate="54001",
        ) from None


def _parse_tree(text: str) -> Statement:
    from pglast import parser  # lazily: only a sidecar with databases loads libpg_query

    if "\x00" in text:
        # libpg_query reads a C string: what follows a NUL would go unjudged.
        raise StatementError("a statement cannot hold a NUL character", text.index("\x00") + 1)
    try:
        tree = json.loads(parser.parse_sql_json(text))
        tokens = parser.scan(text)
    except parser.ParseError as exc:
        message, index = exc.args if len(exc.args) == 2 else (str(exc), None)
        if isinstance(index, int) and 0 <= index <= len(text):
            line = text.count("\n", 0, index) + 1
            column = index - (text.rfind("\n", 0, index) + 1) + 1
            raise StatementError(f"{message} (line {line}, column {column})", index + 1) from None
        raise StatementError(str(message)) from None
    walk = _Walk()
    raws: list[dict[str, Any]] = tree.get("stmts", [])
    for raw in raws:
        walk.statement(raw.get("stmt") or {})
    operation = ""
    if raws:
        operation = walk.operations[0] or _first_word(tokens, raws[0])
    return walk.statement_for(len(raws), operation, _normalize(text, tokens))


def _first_word(tokens: Any, raw: dict[str, Any]) -> str:
    start = raw.get("stmt_location", 0)
    for token in tokens:
        if token.start >= start and token.name not in COMMENT_TOKENS:
            return str(token.name).removesuffix("_P").upper()
    return ""


def _normalize(text: str, tokens: Any) -> str:
    """The text with every literal replaced by '?' and comments dropped: what telemetry
    may show (values and comments can hold personal data)."""
    out: list[str] = []
    at = 0
    for token in tokens:
        if token.name in LITERAL_TOKENS:
            out.append(text[at : token.start])
            out.append("?")
            at = token.end + 1
        elif token.name in COMMENT_TOKENS:
            out.append(text[at : token.start].rstrip(" "))
            at = token.end + 1
    out.append(text[at:])
    return "".join(out).strip()


def _names(items: Any) -> list[str]:
    return [item["String"]["sval"] for item in items if isinstance(item, dict) and "String" in item]


class _Walk:
    """Collects what one string does, statement by statement."""

    def __init__(self) -> None:
        self.kinds: set[str] = set()
        self.needs: set[str] = set()
        self.accesses: dict[Access, None] = {}  # in order, each once (a string may hold 10k)
        self.functions: set[str] = set()
        self.refusal: Verdict | None = None
        self.read_write = False
        self.operations: list[str] = []
        self.targeted = False  # the current statement names a table it writes
        self.resets_all: str | None = None

    # -- statements -----------------------------------------------------------------

    def statement(self, node: dict[str, Any]) -> str:
        """Record one statement (top-level, or wrapped by EXPLAIN or PREPARE); its kind."""
        if not node:
            self.operations.append("")
            return "other"
        ((name, body),) = node.items()
        # DML is named by its node (a WITH may come first); anything else by its first word.
        self.operations.append(DML[name][1] if name in DML else "")
        self.targeted = False
        kind = self._statement(name, body, node)
        self.kinds.add(kind)
        if kind not in HOUSEKEEPING and name not in HOUSEKEEPING_STATEMENTS:
            self.needs.add(kind)
        return kind

    def _statement(self, name: str, body: dict[str, Any], node: dict[str, Any]) -> str:
        if name in REFUSED_STATEMENTS:
            self.refuse(f"{REFUSED_STATEMENTS[name]}; it is refused for every agent")
            return "ddl" if name.startswith(DDL_PREFIXES) else "other"
        if name in DML:
            self.node(node, _NO_CTES, "select")
            return DML[name][0]
        if name == "ExplainStmt":
            # Judged as the statement it wraps, as if it ran: EXPLAIN ANALYZE does run it.
            self.statement(body.get("query") or {})
            return "explain"
        if name == "PrepareStmt":
            # What EXECUTE will run later is judged now.
            self.statement(body.get("query") or {})
            return "prepare"
        if name == "DeclareCursorStmt":
            self.node(body.get("query"), _NO_CTES, "select")
            return "select"
        if name == "CopyStmt":
            return self._copy(body)
        if name == "VariableSetStmt":
            return self._set(body)
        if name == "TransactionStmt":
            if _read_write(body.get("options")):
                self.read_write = True
            return "transaction"
        if name == "DiscardStmt" and body.get("target") == "DISCARD_ALL":
            self.resets_all = "DISCARD ALL"
            return "reset"
        if name == "DropStmt":
            self._objects(body.get("removeType"), body.get("objects", ()))
            return "ddl"
        if name == "CommentStmt" and body.get("objtype") in RELATION_OBJECTS:
            self._objects(body.get("objtype"), [body.get("object")])
            return "ddl"
        if name in ("RenameStmt", "AlterObjectSchemaStmt"):
            # The new name is written too: a rule on staging.* must not let a table be
            # moved, or renamed, where other rules reach it.
            relation = body.get("relation")
            relation_renamed = (
                name == "AlterObjectSchemaStmt" or body.get("renameType") in RELATION_OBJECTS
            )
            if isinstance(relation, dict) and relation_renamed:
                self.relation(relation, _NO_CTES, "ddl")
                self.table(
                    body.get("newschema", relation.get("schemaname")),
                    str(body.get("newname", relation.get("relname", ""))),
                    "ddl",
                    write=True,
                )
        if name in ("CreateTableAsStmt", "ViewStmt"):
            into = body.get("into", {}).get("rel")
            target = into if name == "CreateTableAsStmt" else body.get("view")
            if target:
                self.relation(target, _NO_CTES, "ddl")
            self.node(body.get("query"), _NO_CTES, "select")
            return "ddl"
        kind = SIMPLE.get(name)
        if kind is None:
            kind = "ddl" if name in DDL or name.startswith(DDL_PREFIXES) else "other"
        self.fields(body, _NO_CTES, kind)
        if kind in ("ddl", "grant") and not self.targeted:
            # A schema, a role, a function...: no table names it, so only a rule on
            # every table covers it.
            self.add(Access(kind, None, "an object that is not a table", True, False))
        return kind

    def _copy(self, body: dict[str, Any]) -> str:
        if body.get("is_program"):
            self.refuse(
                "COPY ... PROGRAM runs a command on the database server; it is refused for "
                "every agent (use COPY ... FROM STDIN or COPY ... TO STDOUT)"
            )
        elif body.get("filename") is not None:
            self.refuse(
                "COPY to or from a file reads or writes the database server's disk; it is "
                "refused for every agent (use COPY ... FROM STDIN or COPY ... TO STDOUT)"
            )
        relation = body.get("relation")
        if relation:
            self.relation(relation, _NO_CTES, "copy", write=bool(body.get("is_from")))
        self.node(body.get("query"), _NO_CTES, "select")
        rest = {k: v for k, v in body.items() if k not in ("relation", "query")}
        self.fields(rest, _NO_CTES, "select")
        return "copy"

    def _set(self, body: dict[str, Any]) -> str:
        set_kind = body.get("kind", "")
        kind = "reset" if set_kind.startswith("VAR_RESET") else "set"
        if set_kind == "VAR_RESET_ALL":
            self.resets_all = "RESET ALL"
            return kind
        setting = str(body.get("name", "")).lower()
        if set_kind == "VAR_SET_MULTI":
            # SET TRANSACTION / SET SESSION CHARACTERISTICS AS TRANSACTION ...
            if _read_write(body.get("args")):
                self.read_write = True
            return kind
        why = GUARDED_SETTINGS.get(setting)
        if setting == "client_encoding" and set_kind == "VAR_SET_VALUE":
            args = body.get("args", ())
            values = [a.get("A_Const", {}).get("sval", {}).get("sval") for a in args]
            if any(str(v).lower().replace("-", "") not in ("utf8", "unicode") for v in values):
                why = (
                    "the sidecar reads statements as UTF-8; an encoding such as SJIS or GBK "
                    "would let the server read them differently"
                )
        if why is not None:
            shown = "SET" if kind == "set" else "RESET"
            self.refuse(f"{shown} {setting}: {why}; it is refused for every agent")
        self.fields(body, _NO_CTES, "select")
        return kind

    def _objects(self, object_type: Any, objects: Any) -> None:
        """The objects a DROP or COMMENT names: tables when they are relations."""
        if object_type in RELATION_OBJECTS:
            for obj in objects or ():
                items = obj.get("List", {}).get("items", ()) if isinstance(obj, dict) else ()
                parts = _names(items)
                if parts:
                    schema = parts[-2] if len(parts) >= 2 else None
                    self.table(schema, parts[-1], "ddl", write=True)
            return
        self.add(Access("ddl", None, "an object that is not a table", True, False))

    # -- the tree ---------------------------------------------------------------------

    def node(self, value: Any, ctes: frozenset[str], action: str) -> None:
        """Walk any JSON value. `action` is what a table found here is used for."""
        if isinstance(value, list):
            for item in value:
                self.node(item, ctes, action)
            return
        if not isinstance(value, dict) or not value:
            return
        if len(value) == 1:
            ((key, body),) = value.items()
            if key[:1].isupper():  # a node wrapped in its type's name
                if key not in _LEAVES and isinstance(body, dict):
                    self.typed(key, body, ctes, action)
                return
        self.fields(value, ctes, action)

    def typed(self, name: str, body: dict[str, Any], ctes: frozenset[str], action: str) -> None:
        if name == "RangeVar":
            self.relation(body, ctes, action)
        elif name in DML:
            self.dml(name, body, ctes)
        elif name in REFUSED_STATEMENTS:
            self.refuse(f"{REFUSED_STATEMENTS[name]}; it is refused for every agent")
        else:
            self.fields(body, ctes, action)

    def fields(self, body: dict[str, Any], ctes: frozenset[str], action: str) -> None:
        """Walk a node's fields; typed fields come unwrapped in libpg_query's JSON, so a
        RangeVar is recognised by its `relname`, a function call by its `funcname`."""
        if "relname" in body:
            self.relation(body, ctes, action)
            return
        funcname = body.get("funcname")
        if isinstance(funcname, list):
            names = _names(funcname)
            if names:
                self.function(names[-1])
        with_clause = body.get("withClause")
        if isinstance(with_clause, dict):
            ctes = self.with_clause(with_clause, ctes)
        into = body.get("intoClause")
        if isinstance(into, dict) and isinstance(into.get("rel"), dict):
            # SELECT ... INTO creates a table.
            self.kinds.add("ddl")
            self.relation(into["rel"], ctes, "ddl")
        for key, value in body.items():
            if key in ("withClause", "intoClause"):
                continue
            if isinstance(value, dict | list):
                self.node(value, ctes, action)

    def dml(self, name: str, body: dict[str, Any], ctes: frozenset[str]) -> None:
        kind = DML[name][0]
        if "valuesLists" not in body:  # INSERT ... VALUES reads nothing
            self.kinds.add(kind)
        with_clause = body.get("withClause")
        if isinstance(with_clause, dict):
            ctes = self.with_clause(with_clause, ctes)
        if kind == "select":
            self.fields({k: v for k, v in body.items() if k != "withClause"}, ctes, "select")
            return
        # The target is always a table (PostgreSQL never resolves it to a CTE).
        target = body.get("relation")
        if isinstance(target, dict):
            self.relation(target, _NO_CTES, kind)
            conflict = body.get("onConflictClause")
            if isinstance(conflict, dict) and conflict.get("action") == "ONCONFLICT_UPDATE":
                self.relation(target, _NO_CTES, "update")
        rest = {k: v for k, v in body.items() if k not in ("withClause", "relation")}
        self.fields(rest, ctes, "select")

    def with_clause(self, clause: dict[str, Any], outer: frozenset[str]) -> frozenset[str]:
        recursive = bool(clause.get("recursive"))
        visible = set(outer)
        for item in clause.get("ctes", ()):
            cte = item.get("CommonTableExpr") if isinstance(item, dict) else None
            if not isinstance(cte, dict):
                continue
            name = cte.get("ctename", "")
            if recursive:
                visible.add(name)
            self.node(cte.get("ctequery"), frozenset(visible), "select")
            visible.add(name)
        return frozenset(visible)

    def relation(
        self, body: dict[str, Any], ctes: frozenset[str], action: str, *, write: bool | None = None
    ) -> None:
        name = body.get("relname", "")
        schema = body.get("schemaname")
        if schema is None and name in ctes:
            return
        if write is None:
            write = action in WRITE_KINDS
        self.table(schema, name, action, write=write)

    def table(self, schema: str | None, name: str, action: str, *, write: bool) -> None:
        if schema is None:
            if name.startswith("pg_"):
                self.table("pg_catalog", name, action, write=write)
            schema = "public"
        catalog = schema in CATALOG_SCHEMAS
        if catalog and write:
            self.refuse(
                f"it writes the system catalog ({identifier(schema)}.{identifier(name)}); "
                "it is refused for every agent"
            )
        self.targeted = self.targeted or write
        readable = catalog and not write and action == "select" and name not in SENSITIVE_CATALOG
        self.add(Access(action, schema, name, write, readable))

    def add(self, access: Access) -> None:
        self.accesses.setdefault(access)

    def function(self, name: str) -> None:
        lowered = name.lower()
        self.functions.add(lowered)
        if refused_function(lowered):
            self.refuse(
                f"{lowered}() acts outside the query (the server's files or settings, other "
                "sessions or servers, or a query hidden in text); it is refused for every agent"
            )
        elif lowered.startswith(LARGE_OBJECT_FUNCTIONS):
            self.add(Access("select", "pg_catalog", "pg_largeobject", False, False))

    def refuse(self, why: str) -> None:
        if self.refusal is None:
            self.refusal = Verdict(
                INSUFFICIENT_PRIVILEGE,
                FORBIDDEN,
                f"statement refused: {why}",
                "nothing in this string ran; send it again without that part",
            )

    # -- the result -------------------------------------------------------------------

    def statement_for(self, count: int, operation: str, normalized: str) -> Statement:
        tables = [a for a in self.accesses if a.schema is not None]
        write = next((a for a in self.accesses if a.write), None)
        write_kind = write.action if write is not None else None
        if write_kind is None:
            write_kind = next((k for k in sorted(self.kinds) if k in WRITE_KINDS), None)
        return Statement(
            kinds=frozenset(self.kinds),
            reads=frozenset(a.table for a in tables if not a.write),
            writes=frozenset(a.table for a in tables if a.write),
            functions=frozenset(self.functions),
            count=count,
            operation=operation,
            collection=tables[0].table if tables else None,
            normalized=normalized,
            accesses=tuple(self.accesses),
            needs=frozenset(self.needs),
            refusal=self.refusal,
            read_write=self.read_write,
            write=write,
            write_kind=write_kind,
            resets_all=self.resets_all,
        )


def _read_write(options: Any) -> bool:
    """Whether transaction options ask for READ WRITE (transaction_read_only = 0)."""
    for option in options or ():
        elem = option.get("DefElem") if isinstance(option, dict) else None
        if isinstance(elem, dict) and elem.get("defname") == "transaction_read_only":
            value = elem.get("arg", {}).get("A_Const", {}).get("ival", {})
            if not value.get("ival"):
                return True
    return False
