"""Statements cached by shape: texts that differ only in integer literals share one parse,
and never get another verdict than their own parse would give them."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.databases.statements import StatementError, StatementRules, parse
from sidecar.databases.statements.parse import _parse
from sidecar.databases.statements.shape import MASK, shape

from .test_statements import RULES

PGBENCH = "SELECT abalance FROM pgbench_accounts WHERE aid = {};"


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        (PGBENCH.format(4711), PGBENCH.format(MASK)),
        ("SELECT * FROM t WHERE a IN (1, 22) LIMIT 5", "SELECT * FROM t WHERE a IN (#, #) LIMIT #"),
        ("SELECT a-1, -2, 3+4", "SELECT a-#, -#, #+#"),
        ("SELECT 1;\nSELECT 2", "SELECT #;\nSELECT #"),
    ],
)
def test_integer_literals_are_masked(text: str, masked: str) -> None:
    assert shape(text) == masked.replace("#", MASK)


@pytest.mark.parametrize(
    "text",
    [
        "SELECT '1', 'it''s 2'",  # strings
        "SELECT E'\\'1', e'2\\\\'",  # escape strings: \' does not end them
        "SELECT $$1$$, $q$ 2 $$ 3 $q$",  # dollar quotes
        'SELECT "1", "a""2"',  # quoted identifiers
        "SELECT -- 1\n x",  # comments
        "SELECT /* 1 /* 2 */ 3 */ x",  # nested comments
        "SELECT t1, a$2, _3 FROM s4.t5",  # identifiers
        "SELECT $1, $22",  # parameters
        "SELECT 1.5, .5, 6., 1e5, 1e+5, 2E-3, 0x1F, 0o17, 0b1, 1_000",  # other numbers
        "SELECT 1234567890",  # past 9 digits
        "SELECT \u0663, x.\u0663",  # digits, but not ASCII ones: not a number to PostgreSQL
        "SELECT 1::float(30)",  # FLOAT(p): the grammar reads p's value
        "SELECT 1 /* unterminated",
        "SELECT '1",
        "SELECT $q$ 1",
    ],
)
def test_what_is_not_an_integer_literal_is_left_alone(text: str) -> None:
    # Unterminated texts are not shaped at all (PostgreSQL rejects them).
    assert shape(text) is None


def test_texts_differing_in_integers_share_one_parse() -> None:
    first = parse(PGBENCH.format(1))
    again = parse(PGBENCH.format(99_999))
    assert again is first
    # The cached statement holds no text of either call: telemetry shows only this.
    assert not hasattr(again, "text")
    assert again.normalized == PGBENCH.format("?")


@pytest.mark.parametrize(
    "template",
    [
        "SET lock_timeout = {}",
        "SELECT set_config('lock_timeout', '100', false), {}",
        "BEGIN READ ONLY; SELECT {}",
        "SELECT pg_read_file('/etc/passwd', {}, 10)",
        "PREPARE p AS SELECT {}",
    ],
)
def test_set_set_config_transactions_and_refusals_are_parsed_by_text(template: str) -> None:
    first = parse(template.format(7))
    assert parse(template.format(8)) is not first


def test_a_number_the_grammar_reads_is_not_masked() -> None:
    parse("SELECT 1::float(30)")
    with pytest.raises(StatementError, match="precision for type float"):
        parse("SELECT 1::float(0)")
    parse("SELECT 1::int[5]")
    # Past 2^31 an integer is a float to PostgreSQL, which an array bound cannot be.
    with pytest.raises(StatementError, match="syntax error"):
        parse("SELECT 1::int[12345678901]")


TEMPLATES = [
    PGBENCH,
    "SELECT * FROM orders WHERE id IN ({}, {}) ORDER BY {} LIMIT {} OFFSET {}",
    "UPDATE staging.t SET a = {} WHERE b = -{}",
    "INSERT INTO staging.t VALUES ({}, 'x{}', $${}$$) ON CONFLICT DO NOTHING",
    "DELETE FROM orders WHERE id = {} RETURNING {}",
    "SELECT {}::float({})",
    "SELECT {}::int[{}], ARRAY[{}][{}]",
    "SELECT {}::numeric({}, {}), {}::bit({})",
    "SET lock_timeout = {}",
    "SELECT set_config('statement_timeout', '{}', false), {}",
    "SELECT set_config('statement_timeout', {}, false)",
    "BEGIN ISOLATION LEVEL SERIALIZABLE; SELECT {}; COMMIT",
    "SELECT * FROM t{} WHERE x = {}",
    "SELECT /* {} /* {} */ */ {} -- {}\n FROM orders",
    "SELECT E'\\'{}', {} FROM orders WHERE id = {}",
    "SELECT * FROM orders FETCH FIRST {} ROWS ONLY",
    "SELECT {} FROM orders; DROP TABLE t{}",
    "SELECT pg_sleep({}), pg_read_file('x', {}, {})",
    "SELECT {}e{}, {}.{}, 0x{}",
    "SELECT * FROM generate_series({}, {}) g(i) JOIN customers c ON c.id = g.i + {}",
    "WITH w AS (SELECT {} AS n) SELECT * FROM w, orders LIMIT {}",
    "PREPARE q AS SELECT * FROM orders WHERE id = {}",
    "SELECT $1 + {}",
]
ENGINES = [
    StatementRules.build(RULES, read_only=False, database="analytics"),
    StatementRules.build(RULES, read_only=True, database="analytics"),
    StatementRules.build(None, read_only=False, database="analytics"),
]
AGENTS = ["research-bot", "etl-bot", "admin", "stranger"]


def _outcome(text: str, parsed: object) -> object:
    try:
        statement = parse(text) if parsed is parse else _parse(text)
    except StatementError as exc:
        return ("error", exc.message, exc.sqlstate)
    return statement, [e.judge(a, statement) for e in ENGINES for a in AGENTS]


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(TEMPLATES),
    st.lists(st.integers(0, 10**12), min_size=5, max_size=5),
    st.lists(st.integers(0, 10**12), min_size=5, max_size=5),
)
def test_texts_of_one_shape_get_the_verdict_of_their_own_parse(
    template: str, warm: list[int], numbers: list[int]
) -> None:
    """Whatever text of the same shape filled the cache, a text's statement (kinds,
    tables, functions, normalized text) and every verdict on it are those of its own
    uncached parse."""
    _outcome(template.format(*warm), parse)
    text = template.format(*numbers)
    assert _outcome(text, parse) == _outcome(text, _parse)
