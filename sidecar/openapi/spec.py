"""A compiled OpenAPI document: operations found by method and path, each with the
checks of its parameters, request body and responses, all built once per reload."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, cast
from urllib.parse import parse_qsl

from .document import METHODS, Document, OpenAPIError, deref, pointer
from .matcher import Matcher
from .schemas import Schemas, Validator, escape

# Header parameters OpenAPI says to ignore: they are described elsewhere in the document.
_IGNORED_HEADERS = frozenset({"accept", "content-type", "authorization"})


@dataclass(frozen=True, slots=True)
class Violation:
    """One way a request breaks the document."""

    location: str  # path, query, header, body
    name: str | None  # the parameter's name; None for the body
    pointer: str  # JSON pointer into the value ("" for the value itself)
    message: str

    def as_dict(self) -> dict[str, str]:
        out = {"in": self.location, "pointer": self.pointer, "message": self.message}
        if self.name is not None:
            out["name"] = self.name
        return out

    def __str__(self) -> str:
        where = self.location if self.name is None else f"{self.location} parameter {self.name!r}"
        return (
            f"{where} at '{self.pointer}': {self.message}"
            if self.pointer
            else (f"{where}: {self.message}")
        )


def _kind(doc: dict[str, Any], schema: Any) -> tuple[str | None, str | None]:
    """(type, item type) of a parameter's schema, to turn its text into that type."""
    schema = deref(doc, schema)
    if not isinstance(schema, dict):
        return None, None
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), None)
    item = None
    if kind == "array":
        items = deref(doc, schema.get("items"))
        item = items.get("type") if isinstance(items, dict) else None
        if isinstance(item, list):
            item = next((k for k in item if k != "null"), None)
    return kind if isinstance(kind, str) else None, item if isinstance(item, str) else None


def _scalar(text: str, kind: str | None) -> Any:
    # A text that is not of the type stays text: the schema then says what is wrong.
    if kind == "integer":
        try:
            return int(text)
        except ValueError:
            return text
    if kind == "number":
        try:
            value = float(text)
        except ValueError:
            return text
        return value if value == value and value not in (float("inf"), float("-inf")) else text
    if kind == "boolean":
        return {"true": True, "false": False}.get(text, text)
    return text


class Parameter:
    __slots__ = ("explode", "item", "kind", "location", "name", "required", "validator")

    def __init__(self, *, doc: dict[str, Any], spec: dict[str, Any], validator: Validator | None):
        self.name: str = spec["name"]
        self.location: str = spec["in"]
        self.required = bool(spec.get("required")) or self.location == "path"
        style = spec.get("style", "form" if self.location in ("query", "cookie") else "simple")
        self.explode = bool(spec.get("explode", style == "form"))
        self.kind, self.item = _kind(doc, spec.get("schema"))
        # Objects and styles other than form/simple are only checked for presence.
        if self.kind == "object" or style not in ("form", "simple"):
            validator = None
        self.validator = validator

    def value(self, texts: list[str]) -> Any:
        if self.kind == "array":
            if self.explode and self.location == "query":
                parts = texts
            else:
                parts = [p for t in texts for p in t.split(",")] if texts[0] else []
            return [_scalar(p, self.item) for p in parts]
        return _scalar(texts[-1], self.kind)

    def check(self, texts: list[str] | None, out: list[Violation]) -> None:
        if not texts:
            if self.required:
                out.append(Violation(self.location, self.name, "", "is required"))
            return
        if self.validator is None:
            return
        value = self.value(texts)
        if not self.validator.is_valid(value):
            for err in self.validator.errors(value):
                out.append(Violation(self.location, self.name, err.pointer, err.message))


# The decoder's C scanner, which json.loads reaches through two Python layers.
_scan: Any = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
# The smallest magnitude of a float orjson makes of an integer it cannot hold in 64 bits.
_BEYOND_64_BITS = float(2**63)
# orjson's loads, imported by the first document with a JSON body schema (_use_orjson):
# a sidecar that validates no body does not load it.
_orjson_loads: Callable[[bytes], Any] | None = None


def _use_orjson() -> None:
    global _orjson_loads
    if _orjson_loads is None:
        from orjson import loads

        _orjson_loads = loads


def _parse(body: bytes) -> Any:
    """json.loads(body), in about half its instructions for the common body.

    orjson parses strict RFC 8259 JSON in UTF-8 only, and where it succeeds it gives
    what json.loads gives, but for an integer beyond 64 bits, which it turns into a
    float of 2**63 or more: a value holding such a float (rare, whatever made it) is
    parsed again by json's own scanner, as is any body orjson refuses (NaN, a byte
    order mark, a lone surrogate, UTF-16, an error: json.loads says what is wrong)."""
    loads = _orjson_loads
    if loads is not None:
        try:
            value = loads(body)
        except ValueError:
            return _parse_json(body)
        try:
            if not _holds_huge_float(value):
                return value
        except RecursionError:
            pass  # as deep as json's scanner may refuse: it says so, or parses it
    return _parse_json(body)


def _holds_huge_float(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_huge_float(item) for item in value.values())
    if isinstance(value, list):
        return any(_holds_huge_float(item) for item in value)
    if isinstance(value, float):
        return not -_BEYOND_64_BITS < value < _BEYOND_64_BITS
    return False


def _parse_json(body: bytes) -> Any:
    """json.loads(body), without its encoding detection and whitespace regexes for the
    common body: UTF-8 text that is one JSON value from its first byte to its last.
    Anything else goes through json.loads itself, with its error messages."""
    try:
        text = body.decode()
        value, end = _scan(text, 0)
    except (UnicodeDecodeError, StopIteration, ValueError):
        return json.loads(body)
    if end != len(text):
        return json.loads(body)  # whitespace or more after the value (an error, or not)
    return value


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


def _media(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


# Content-Type values kept per body with what each decides: agents send one or two
# spellings over and over. Cleared when full, so values never seen again cannot grow it.
MEDIA_CACHE_SIZE = 64
_UNDECIDED: Any = object()


class Body:
    __slots__ = ("_decided", "exact", "listed", "required", "wildcards")

    def __init__(self, *, required: bool, media: dict[str, Validator | None]):
        self.required = required
        self.exact = {m: v for m, v in media.items() if "*" not in m}
        self.wildcards = [(m.partition("/")[0], v) for m, v in media.items() if "*" in m]
        self.listed = ", ".join(media) or "none"
        # Content-Type as sent -> what decide() made of it.
        self._decided: dict[str | None, str | Validator | None] = {}

    def entry(self, media: str) -> tuple[bool, Validator | None]:
        if media in self.exact:
            return True, self.exact[media]
        major = media.partition("/")[0]
        for prefix, validator in self.wildcards:
            if prefix in ("*", major):
                return True, validator
        return False, None

    def decide(self, content_type: str | None) -> str | Validator | None:
        """What a body of this Content-Type gets: the message refusing the type, the
        validator of its JSON, or None when its bytes are not checked."""
        media = _media(content_type)
        if not media:
            return f"Content-Type is missing; send one of: {self.listed}"
        listed, validator = self.entry(media)
        if not listed:
            return f"Content-Type {media} is not one of: {self.listed}"
        if validator is None or not _is_json(media):
            return None
        return validator

    def check(self, content_type: str | None, body: bytes | None, out: list[Violation]) -> None:
        if not body:
            if self.required:
                out.append(Violation("body", None, "", "a request body is required"))
            return
        # Any: the sentinel is none of the types, which compiled code would check at once.
        kept: Any = self._decided.get(content_type, _UNDECIDED)
        if kept is _UNDECIDED:
            if len(self._decided) >= MEDIA_CACHE_SIZE:
                self._decided.clear()
            kept = self._decided[content_type] = self.decide(content_type)
        decided = cast("str | Validator | None", kept)
        if decided is None:
            return
        if isinstance(decided, str):
            out.append(Violation("body", None, "", decided))
            return
        try:
            value = _parse(body)
        except (ValueError, UnicodeDecodeError) as exc:
            out.append(Violation("body", None, "", f"not valid JSON: {exc}"))
            return
        if not decided.is_valid(value):
            for err in decided.errors(value):
                out.append(Violation("body", None, err.pointer, err.message))


class Operation:
    __slots__ = (
        "body",
        "headers",
        "label",
        "method",
        "operation_id",
        "path_params",
        "query",
        "responses",
        "template",
    )

    def __init__(
        self,
        *,
        method: str,
        template: str,
        operation_id: str | None,
        parameters: list[Parameter],
        body: Body | None,
        responses: dict[str, frozenset[str]],
    ) -> None:
        self.method = method
        self.template = template
        self.operation_id = operation_id
        # The metric label and the name in messages: the id, or what identifies it anyway.
        self.label = operation_id or f"{method} {template}"
        self.path_params = [p for p in parameters if p.location == "path"]
        self.query = [p for p in parameters if p.location == "query"]
        self.headers = [
            p
            for p in parameters
            if p.location == "header" and p.name.lower() not in _IGNORED_HEADERS
        ]
        self.body = body
        self.responses = responses

    def check_request(
        self,
        *,
        path_params: dict[str, str],
        query: str,
        headers: Fields,
        body: bytes | None,
        content_type: str | None = None,
        check_body: bool = True,
        injected: frozenset[tuple[str, str]] = frozenset(),
    ) -> list[Violation]:
        """Every way the call breaks the document. `injected` names the parameters the
        sidecar adds itself (the service's credential: ("header", "x-api-key") or
        ("query", "api_key")), which the agent neither sends nor is asked for.
        `content_type` is the call's first Content-Type field when the caller has it at
        hand; None: read from `headers`."""
        out: list[Violation] = []
        for p in self.path_params:
            text = path_params.get(p.name)
            p.check([text] if text is not None else None, out)
        if self.query:
            given: dict[str, list[str]] = {}
            for key, value in parse_qsl(query, keep_blank_values=True):
                given.setdefault(key, []).append(value)
            for p in self.query:
                if not injected or ("query", p.name) not in injected:
                    p.check(given.get(p.name), out)
        for p in self.headers:
            if not injected or ("header", p.name.lower()) not in injected:
                p.check(headers.getall(p.name, None), out)
        if self.body is not None and check_body:
            if content_type is None:
                content_type = headers.get("Content-Type")
            self.body.check(content_type, body, out)
        return out

    def response_drift(self, status: int, content_type: str | None, has_body: bool) -> str | None:
        """ "status" or "content_type" when the answer is not one the document describes."""
        code = str(status)
        media = self.responses.get(code)
        if media is None:
            media = self.responses.get(code[0] + "XX")
        if media is None:
            media = self.responses.get("default")
        if media is None:
            return "status"
        if not media or not has_body:
            return None
        found = _media(content_type)
        if found in media:
            return None
        major = found.partition("/")[0]
        if "*/*" in media or f"{major}/*" in media:
            return None
        return "content_type"


class Fields(Protocol):
    """The call's header fields as check_request reads them (a CIMultiDict is one)."""

    def get(self, name: str) -> str | None: ...

    def getall(self, name: str, default: None) -> list[str] | None: ...


# Matches kept per Spec, by (method, path): agents call the same few paths over and over.
# Cleared when full, so paths never seen again cannot grow it.
MATCH_CACHE_SIZE = 1024
_UNMATCHED: Any = object()


class Match(NamedTuple):
    operation: Operation | None  # None: the path is known, the method is not
    template: str
    methods: tuple[str, ...]
    path_params: dict[str, str]


class Spec:
    """The compiled document of one service."""

    def __init__(self, document: Document, *, source: str) -> None:
        self.source = source
        self.document = document
        self.digest = document.digest
        self.version = document.version
        doc = document.data
        schemas = Schemas(doc, document.version)
        entries: list[tuple[str, str, Operation]] = []
        self.operations: dict[str, Operation] = {}
        for template, item in (doc.get("paths") or {}).items():
            base = f"/paths/{escape(template)}"
            item, base = _follow(doc, item, base)
            if not isinstance(item, dict):
                continue
            shared = item.get("parameters") or []
            for method in METHODS:
                op = item.get(method)
                if not isinstance(op, dict):
                    continue
                where = f"{method.upper()} {template}"
                try:
                    operation = _operation(
                        doc, schemas, template, method, op, shared, f"{base}/{method}"
                    )
                except (OpenAPIError, ValueError, KeyError, TypeError) as exc:
                    raise OpenAPIError(f"{source}: {where}: {exc}") from None
                entries.append((template, method, operation))
                if operation.operation_id:
                    self.operations[operation.operation_id] = operation
        self._matcher: Matcher[Operation] = Matcher(entries)
        self._matches: dict[tuple[str, str], Match | None] = {}
        self.count = len(entries)

    def __reduce__(self) -> tuple[Any, tuple[Document, str]]:
        # Its validators are compiled code that does not pickle: a Spec travels as its
        # parsed document and is compiled again where it lands.
        from . import compiled

        return compiled, (self.document, self.source)

    def match(self, method: str, path: str) -> Match | None:
        """The operation a call makes; `path` is percent-encoded, without the query.

        The Match is shared between calls of the same method and path: read it only."""
        key = (method, path)
        cache = self._matches
        # Any: the sentinel is no Match, which compiled code would check at once.
        kept: Any = cache.get(key, _UNMATCHED)
        if kept is not _UNMATCHED:
            return cast("Match | None", kept)
        if len(cache) >= MATCH_CACHE_SIZE:
            cache.clear()
        found = cache[key] = self._match(method, path)
        return found

    def _match(self, method: str, path: str) -> Match | None:
        found = self._matcher.match(path)
        if found is None:
            return None
        template, methods, params = found
        operation = methods.get(method.upper())
        if operation is None and method.upper() == "HEAD":
            operation = methods.get("GET")  # a HEAD is a GET without its body
        return Match(operation, template, tuple(sorted(methods)), params)

    def operation_id(self, method: str, target: str) -> str | None:
        """The operationId of a call (`target` may hold a query), for allow rules."""
        found = self.match(method, target.partition("?")[0])
        return found.operation.operation_id if found and found.operation else None


def _follow(doc: dict[str, Any], node: Any, at: str) -> tuple[Any, str]:
    """Like deref, also keeping the JSON pointer of where the target lives."""
    seen: set[str] = set()
    while isinstance(node, dict) and isinstance(node.get("$ref"), str):
        ref = node["$ref"]
        if ref in seen:
            raise OpenAPIError(f"$ref {ref!r} refers to itself")
        seen.add(ref)
        node = pointer(doc, ref)
        at = ref[1:]
    return node, at


def _operation(
    doc: dict[str, Any],
    schemas: Schemas,
    template: str,
    method: str,
    op: dict[str, Any],
    shared: list[Any],
    at: str,
) -> Operation:
    params: dict[tuple[str, str], Parameter] = {}
    # Path-level parameters first, then the operation's, which override them by (name, in).
    base_at = at.rsplit("/", 1)[0]
    listed = [(f"{base_at}/parameters/{i}", p) for i, p in enumerate(shared)] + [
        (f"{at}/parameters/{i}", p) for i, p in enumerate(op.get("parameters") or [])
    ]
    for where, raw in listed:
        spec, where = _follow(doc, raw, where)
        if not isinstance(spec, dict) or "name" not in spec or "in" not in spec:
            raise OpenAPIError(f"parameter at #{where} needs 'name' and 'in'")
        validator = schemas.validator(f"{where}/schema") if "schema" in spec else None
        params[(spec["name"], spec["in"])] = Parameter(doc=doc, spec=spec, validator=validator)
    body: Body | None = None
    if "requestBody" in op:
        rb, rb_at = _follow(doc, op["requestBody"], f"{at}/requestBody")
        if isinstance(rb, dict):
            media: dict[str, Validator | None] = {}
            for name, entry in (rb.get("content") or {}).items():
                key = _media(name)
                has_schema = isinstance(entry, dict) and "schema" in entry
                media[key] = (
                    schemas.validator(f"{rb_at}/content/{escape(name)}/schema")
                    if has_schema and _is_json(key)
                    else None
                )
            if any(v is not None for v in media.values()):
                _use_orjson()
            body = Body(required=bool(rb.get("required")), media=media)
    responses: dict[str, frozenset[str]] = {}
    for code, raw in (op.get("responses") or {}).items():
        response, _ = _follow(doc, raw, f"{at}/responses/{escape(str(code))}")
        content = response.get("content") if isinstance(response, dict) else None
        responses[str(code).upper() if str(code) != "default" else "default"] = frozenset(
            _media(m) for m in (content or {})
        )
    operation_id = op.get("operationId")
    return Operation(
        method=method.upper(),
        template=template,
        operation_id=str(operation_id) if operation_id else None,
        parameters=list(params.values()),
        body=body,
        responses=responses,
    )
