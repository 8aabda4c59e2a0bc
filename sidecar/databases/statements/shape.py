"""A statement's shape: its text with each small integer literal masked, so that texts
differing only in those numbers (pgbench's `WHERE aid = 4711`, an ORM's `LIMIT 20`)
share one parse.

This is a key for a cache, not a parser: `shape()` finds integer literals with a
small lexer that knows where digits are not literals (inside '...', E'...',
$tag$...$tag$, "...", -- and nested /* */ comments, identifiers like t1, parameters
like $1, and numbers such as 1.5, 1e5 or 0x1F, which are never masked). It need not
be perfect: `parse` keeps a shape only after PostgreSQL's own scanner agreed that
every masked span of the text it parsed is an integer literal (ICONST), so a text
with that shape is, to PostgreSQL's lexer, the same tokens with other integers.

Why that is safe for the rules, and where it is not (see `parse.shape_safe`):
- only string literals carry what a verdict reads (setting names and values,
  set_config's arguments): strings are never masked;
- integers longer than 9 digits are not masked: past 2^31 PostgreSQL reads them as
  FCONST, which some grammar positions reject;
- the grammar reads an integer's value in one place, FLOAT(p) (p picks float4 or
  float8, or is an error): texts holding "float" are not masked;
- only statements that are plain DML (SELECT, INSERT, UPDATE, DELETE, MERGE), not
  refused and calling no set_config are kept by shape: SET, RESET, BEGIN (whose
  READ WRITE option is an integer in the tree) and everything else are parsed by text.
"""

from __future__ import annotations

import re
from typing import Final

# The placeholder of a masked integer: a text holding a NUL is refused by `parse`
# (and never shaped), so a shape cannot be confused with another text's.
MASK: Final = "\x00"
# Longer integers are not masked (see the module's docstring).
MAX_DIGITS: Final = 9

_WORD_START = r"A-Za-z_\x80-\U0010ffff"
_WORD = r"\w$\x80-\U0010ffff"

_TOKEN: Final = re.compile(
    rf"""
    (?P<plain>(?:
        (?![eE]')[{_WORD_START}][{_WORD}]*   # a keyword or identifier, digits and all
      | [^{_WORD}'"\-/.]                      # whitespace, operators, punctuation
      | -(?!-) | /(?!\*) | \.(?![0-9])
    )+)
  | (?P<int>[0-9]{{1,{MAX_DIGITS}}})(?![{_WORD}.])
  | (?P<number>\.?[0-9][{_WORD}.]*(?:(?<=[eE])[+-][0-9]*)?)   # 1.5, .5, 1e-5, 0x1F, 1_000
  | [eE]'(?:[^'\\]|\\.|'')*'                  # an escape string: \' does not end it
  | '(?:[^']|'')*'                            # a string (standard_conforming_strings on)
  | "(?:[^"]|"")*"                            # a quoted identifier
  | --[^\n\r]*
  | (?P<comment>/\*)
  | (?P<dollar>\$(?:[{_WORD_START}][\w\x80-\U0010ffff]*)?\$)
  | \$[0-9]+                                  # a parameter
  | \$                                        # PostgreSQL rejects it: left as it is
    """,
    re.VERBOSE | re.DOTALL,
)
_COMMENT: Final = re.compile(r"/\*|\*/")
_FLOAT: Final = re.compile("float", re.IGNORECASE)


def integer_spans(text: str) -> list[tuple[int, int]] | None:
    """Where `shape` masks integers, as [start, end) spans; None when the text is not
    shaped (a NUL, "float", an unterminated string, quote or comment)."""
    if MASK in text or _FLOAT.search(text) is not None:
        return None
    spans: list[tuple[int, int]] = []
    pos = 0
    end = len(text)
    while pos < end:
        m = _TOKEN.match(text, pos)
        if m is None:
            return None  # an unterminated quote: PostgreSQL rejects it anyway
        kind = m.lastgroup
        pos = m.end()
        if kind == "int":
            spans.append((m.start(), pos))
        elif kind == "comment":
            pos = _comment_end(text, pos)
            if pos < 0:
                return None
        elif kind == "dollar":
            close = text.find(m.group(), pos)
            if close < 0:
                return None
            pos = close + len(m.group())
    return spans


def shape(text: str) -> str | None:
    """`text` with its integer literals masked; None when nothing is masked or the text
    is not shaped (then it is cached by its own text only)."""
    spans = integer_spans(text)
    if not spans:
        return None
    out: list[str] = []
    at = 0
    for start, stop in spans:
        out.append(text[at:start])
        out.append(MASK)
        at = stop
    out.append(text[at:])
    return "".join(out)


def _comment_end(text: str, pos: int) -> int:
    """The end of a /* comment opened just before `pos` (they nest); -1 if it never ends."""
    depth = 1
    while depth:
        m = _COMMENT.search(text, pos)
        if m is None:
            return -1
        depth += 1 if m.group() == "/*" else -1
        pos = m.end()
    return pos
