"""A pydantic ValidationError turned into FILE:LINE:COL problems an editor can jump to,
with a did-you-mean for an unknown key and the key path the format knows."""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .base import _did_you_mean, closest
from .models import (
    AUTH_TYPES,
    PolicyFile,
)
from .positions import Problem
from .yamlpos import Document, Path


def validation_problems(
    doc: Document, exc: ValidationError, *, unexpanded: frozenset[Path] | set[Path] = frozenset()
) -> list[Problem]:
    errors = exc.errors(include_url=False)
    # A misspelt required key (`upstrem:`) is one mistake: its unknown-key error
    # names the key it should be, so "'upstream' is required" would only repeat it.
    misspelt = {
        (*err["loc"][:-1], closest(str(err["loc"][-1]), _keys_at(tuple(err["loc"][:-1]))))
        for err in errors
        if err["type"] == "extra_forbidden"
    }
    out = []
    for err in errors:
        loc: Path = tuple(err["loc"])
        kind = err["type"]
        if kind == "missing" and (loc in misspelt or loc[:2] in unexpanded):
            # Also a service whose template is unknown: that error says it all.
            continue
        ctx: dict[str, Any] = err.get("ctx") or {}
        message = err["msg"]
        if kind == "extra_forbidden":
            key = loc[-1]
            message = f"unknown key '{key}'"
            known_keys = _keys_at(loc[:-1])
            if known_keys:
                message += _did_you_mean(str(key), known_keys)
            # Point at the offending key itself, not at the mapping around it.
            loc = (*_known(doc, loc[:-1]), key)
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            loc = (*_known(doc, loc), "type")
            tag = ctx.get("tag")
            message = (
                f"unknown auth type '{tag}'{_did_you_mean(str(tag), list(AUTH_TYPES))}"
                if kind == "union_tag_invalid"
                else f"'type' is required, one of: {', '.join(AUTH_TYPES)}"
            )
        elif kind == "missing":
            message = f"'{loc[-1]}' is required"
        elif message.startswith("Value error, "):
            message = message.removeprefix("Value error, ")
        known = _known(doc, loc)
        if kind in ("missing", "extra_forbidden") or known != loc:
            position = doc.position(known if kind != "extra_forbidden" else loc)
        else:
            position = doc.value_position(known)
        note = _note(doc, loc, known)
        if note:
            message = f"{message} ({note})"
        out.append(Problem(position, message))
    return out


def _note(doc: Document, loc: Path, known: Path) -> str | None:
    """Where the value in error came from when the file does not hold it (a template)."""
    if not doc.notes:
        return None
    note = doc.notes.get(loc)
    if note is not None:
        return note
    for i in range(len(known), 0, -1):
        note = doc.notes.get(known[:i])
        if note is not None:
            return note
    return None


def _known(doc: Document, loc: Path) -> Path:
    """The part of an error location that exists in the file.

    pydantic puts names in a location that are not keys of the document (the
    tag of a discriminated union, a function-validator name); drop those.
    """
    path: Path = ()
    for part in loc:
        candidate = (*path, part)
        if candidate in doc.values:
            path = candidate
    return path


def _keys_at(loc: Path) -> list[str]:
    """The keys accepted by the mapping at `loc` of a policy file, to hint at a misspelling.

    `loc` is a pydantic error location: dict keys and list indexes step into
    values, a union's tag picks the member (`auth: {type: bearer}` is at
    (..., "auth", "bearer")). Empty when `loc` does not lead to a model.
    """
    tp: Any = PolicyFile
    for part in loc:
        tp = _step(_unwrap(tp), part)
        if tp is None:
            return []
    tp = _unwrap(tp)
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return []
    return sorted(f.alias or name for name, f in tp.model_fields.items())


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional, which add no level to an error location."""
    while True:
        if get_origin(tp) is Annotated:
            tp = get_args(tp)[0]
            continue
        if get_origin(tp) in (Union, UnionType):
            members = [a for a in get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
                continue
        return tp


def _step(tp: Any, part: str | int) -> Any:
    origin = get_origin(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        for name, f in tp.model_fields.items():
            if part in (name, f.alias):
                return f.annotation
        return None
    if origin is dict:
        return get_args(tp)[1]
    if origin is list:
        return get_args(tp)[0]
    if origin in (Union, UnionType):
        for member in map(_unwrap, get_args(tp)):
            tag = getattr(member, "model_fields", {}).get("type")
            if tag is not None and get_args(tag.annotation) == (part,):
                return member
    return None
