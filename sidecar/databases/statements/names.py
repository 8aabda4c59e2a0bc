"""Table names and table globs as PostgreSQL reads identifiers (no SQL parsing here:
a rule's table is one or two identifiers). Imports nothing of the sidecar, so the
policy models can check a rule's tables with `table_glob` at load time."""

from __future__ import annotations

from typing import Final

_PLAIN_FIRST: Final = frozenset("abcdefghijklmnopqrstuvwxyz_")
_PLAIN: Final = _PLAIN_FIRST | frozenset("0123456789$")


def identifier(name: str) -> str:
    """A name as PostgreSQL prints it: double-quoted unless it would read back the same."""
    if name and name[0] in _PLAIN_FIRST and all(c in _PLAIN for c in name):
        return name
    return '"' + name.replace('"', '""') + '"'


def glob_shown(part: str) -> str:
    """A glob part as a rule would write it."""
    if "*" not in part:
        return identifier(part)
    if identifier(part.replace("*", "x")) == part.replace("*", "x"):
        return part
    return '"' + part.replace('"', '""') + '"'


def table_glob(text: str) -> tuple[str, str]:
    """A rule's table as (schema glob, table glob); ValueError saying what is wrong."""
    if text.strip() == "*":
        return "*", "*"
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    was_quoted = False
    i = 0
    while i < len(text):
        c = text[i]
        if quoted:
            if c == '"' and text[i + 1 : i + 2] == '"':
                current.append('"')
                i += 1
            elif c == '"':
                quoted = False
            else:
                current.append(c)
        elif c == '"':
            quoted = was_quoted = True
        elif c == ".":
            parts.append(_part(text, current, was_quoted))
            current, was_quoted = [], False
        elif c.isspace():
            raise ValueError(f"table {text!r}: spaces belong inside double quotes")
        else:
            current.append(c.lower())
        i += 1
    if quoted:
        raise ValueError(f"table {text!r}: a double quote is not closed")
    parts.append(_part(text, current, was_quoted))
    if len(parts) == 1:
        return "public", parts[0]
    if len(parts) == 2:
        return parts[0], parts[1]
    raise ValueError(f"table {text!r}: write schema.table, table (schema public) or *")


def _part(text: str, chars: list[str], quoted: bool) -> str:
    if not chars and not quoted:
        raise ValueError(f"table {text!r}: an empty name (write schema.table)")
    return "".join(chars)
