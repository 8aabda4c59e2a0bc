"""The `databases:` section: what `sidecar validate` accepts and how it reports mistakes."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from sidecar.policy.loader import PolicyError, load_policy

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
version: 1
databases:
  analytics:
    listen: 127.0.0.1:15432
    upstream: postgres://db.internal:5432/analytics
    tls: {mode: verify-full, ca: "${file:/var/run/secrets/pg/ca.crt}"}
    auth: {username: agent_ro, password: "${file:/var/run/secrets/pg/password}"}
    pool: {mode: transaction, size: 20, min_idle: 2, idle_timeout: 5m, max_lifetime: 1h}
    statement_timeout: 30s
    read_only: true
    max_rows: 10000
    rate_limit: [{rate: 20/s, per: agent}]
    allow:
      - {agents: [research-*], tables: [public.orders, public.customers], statements: [select]}
      - {agents: [etl-bot], tables: ["staging.*"], statements: [select, insert, update]}
"""


def write(tmp_path: Path, text: str, name: str = "p.yaml") -> Path:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return tmp_path / name


def test_the_issue_example_validates(tmp_path: Path) -> None:
    write(tmp_path, GOOD)
    policy = load_policy(str(tmp_path), resolve_secrets=False)
    db = policy.databases["analytics"]
    assert db.address == ("127.0.0.1", 15432)
    assert (db.target.host, db.target.port, db.target.database) == (
        "db.internal",
        5432,
        "analytics",
    )
    assert db.pool.idle_timeout == 300 and db.statement_timeout == 30


def test_mistakes_are_reported_at_their_place(tmp_path: Path) -> None:
    f = write(
        tmp_path,
        """
        version: 1
        databases:
          bad:
            listen: 0.0.0.0:5432
            upstream: postgres://u:pw@db/x
            auth: {username: u, pasword: x}
            pool: {size: 2, min_idle: 3}
            allow: [{statements: [selct], tables: ["a.b.c"]}]
        """,
    )
    with pytest.raises(PolicyError) as err:
        load_policy(str(tmp_path), resolve_secrets=False)
    text = str(err.value)
    assert f"{f}:5:13: listen must be a loopback address" in text
    assert f"{f}:6:15: the upstream URL must not hold a password" in text
    assert f"{f}:7:25: unknown key 'pasword' (did you mean 'password'?)" in text
    assert "min_idle (3) is more than size (2)" in text
    assert "Input should be 'select'" in text
    assert "table 'a.b.c': write schema.table" in text


def test_a_database_defined_in_two_files_is_an_error(tmp_path: Path) -> None:
    write(tmp_path, GOOD, "a.yaml")
    write(tmp_path, GOOD.replace("15432", "15433"), "b.yaml")
    with pytest.raises(PolicyError, match="database 'analytics' is defined twice"):
        load_policy(str(tmp_path), resolve_secrets=False)


@pytest.mark.process
def test_schema_and_validate_know_the_section(tmp_path: Path) -> None:
    schema = subprocess.run(
        [sys.executable, "-m", "sidecar", "schema"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    defs = json.loads(schema.stdout)["$defs"]
    assert {"Database", "DatabasePool", "DatabaseTls", "StatementRule"} <= set(defs)
    assert "read_only" in defs["Database"]["properties"]
    write(tmp_path, GOOD.replace("size: 20", "size: 0"))
    validate = subprocess.run(
        [sys.executable, "-m", "sidecar", "validate", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert validate.returncode == 1
    assert f"{tmp_path / 'p.yaml'}:9:37: Input should be greater than or equal to 1" in (
        validate.stdout + validate.stderr
    )
