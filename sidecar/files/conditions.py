"""Validators and ranges of the files service (RFC 9110 sections 8.8, 13 and 14).

Pure functions over a file's stat: no I/O, so the order of the checks can be read
and tested in one place.
"""

from __future__ import annotations

import os
from email.utils import formatdate
from typing import Final

from ..core.problems import ProblemError
from ..core.reasons import Reason

RANGE_UNIT: Final = "bytes"


def etag(st: os.stat_result) -> str:
    """A strong validator: an upload is a new inode (rename), so any change changes it."""
    return f'"{st.st_ino:x}-{st.st_size:x}-{st.st_mtime_ns:x}"'


def last_modified(st: os.stat_result) -> str:
    return formatdate(st.st_mtime, usegmt=True)


def _tags(header: str) -> list[str]:
    return [tag.strip() for tag in header.split(",") if tag.strip()]


def _weak(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def matches_strong(header: str, current: str | None) -> bool:
    """If-Match: `*` or a listed tag equal to the current one (strong comparison)."""
    if current is None:
        return False
    tags = _tags(header)
    return "*" in tags or current in tags


def matches_weak(header: str, current: str | None) -> bool:
    """If-None-Match: `*` or a listed tag equal to the current one, weakness ignored."""
    if current is None:
        return False
    tags = _tags(header)
    return "*" in tags or _weak(current) in (_weak(t) for t in tags)


def precondition_failed(detail: str) -> ProblemError:
    return ProblemError(Reason.precondition_failed, detail)


def check_write(
    shown: str, current: str | None, if_match: str | None, if_none_match: str | None
) -> None:
    """The preconditions of a PUT or DELETE against the file as it is now (None: absent)."""
    if if_match is not None and not matches_strong(if_match, current):
        raise precondition_failed(
            f"{shown!r} does not exist (If-Match)."
            if current is None
            else f"{shown!r} has changed (If-Match): read it again before writing."
        )
    if if_none_match is not None and matches_weak(if_none_match, current):
        raise precondition_failed(
            f"{shown!r} already exists (If-None-Match: *)."
            if "*" in _tags(if_none_match)
            else f"{shown!r} is unchanged since that version (If-None-Match)."
        )


def byte_range(header: str, size: int) -> tuple[int, int] | None:
    """The one range a Range field asks for, as (first, last) inclusive; None to send the
    whole file (a field this server ignores: another unit, several ranges, bad syntax).
    An unsatisfiable range raises the 416 problem."""
    unit, eq, spec = header.partition("=")
    if not eq or unit.strip().lower() != RANGE_UNIT:
        return None
    spec = spec.strip()
    if "," in spec:
        return None  # several ranges: RFC 9110 lets a server send the whole file instead
    first, dash, last = spec.partition("-")
    first, last = first.strip(), last.strip()
    if not dash or not _digits(first) or not _digits(last):
        return None
    if not first:
        if not last:
            return None
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise unsatisfiable(size)
        return max(0, size - suffix), size - 1
    start = int(first)
    if last and int(last) < start:
        return None  # invalid: ignored, as the RFC says
    if start >= size:
        raise unsatisfiable(size)
    end = int(last) if last else size - 1
    return start, min(end, size - 1)


def _digits(text: str) -> bool:
    """Empty, or ASCII digits only: str.isdigit() also takes '²' (RFC 9110's DIGIT
    is ASCII), and int() then fails on some of them."""
    return text == "" or (text.isascii() and text.isdigit())


def unsatisfiable(size: int) -> ProblemError:
    return ProblemError(
        Reason.range_not_satisfiable,
        f"The range asked for starts beyond the file's {size} bytes.",
        headers={"Content-Range": f"{RANGE_UNIT} */{size}"},
    )
