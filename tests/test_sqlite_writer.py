"""The single SQLite writer: jobs committed together still succeed or fail one by one."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from sidecar.sqlite_writer import SqliteWriter


def make_table(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE TABLE IF NOT EXISTS t (v INTEGER PRIMARY KEY)")


async def test_a_failing_job_in_a_batch_loses_nothing_of_the_others(tmp_path: Path) -> None:
    writer = SqliteWriter(tmp_path / "t.db", thread_name="test-db", what="test", setup=make_table)
    release = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        release.wait()

    def insert(v: int) -> Callable[[sqlite3.Connection], int]:
        def work(conn: sqlite3.Connection) -> int:
            conn.execute("INSERT INTO t VALUES (?)", (v,))
            return v

        return work

    def insert_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t VALUES (99)")
        raise ValueError("this job fails")

    # The writer is busy with `hold` while the next three queue up: they commit as one batch.
    held = writer.submit(hold)
    first, failing, last = (
        writer.submit(insert(1)),
        writer.submit(insert_then_fail),
        writer.submit(insert(2)),
    )
    release.set()
    await held
    assert await first == 1
    with pytest.raises(ValueError, match="this job fails"):
        await failing
    assert await last == 2
    writer.stop()
    await asyncio.to_thread(writer.join)
    # Committed: another connection sees both, and nothing of the failed job.
    with contextlib.closing(sqlite3.connect(tmp_path / "t.db")) as conn:
        assert conn.execute("SELECT v FROM t ORDER BY v").fetchall() == [(1,), (2,)]


async def test_a_multi_row_statement_that_fails_halfway_is_undone_alone(tmp_path: Path) -> None:
    # Statement journals are kept in memory (temp_store=MEMORY, no temp file per
    # batch): a multi-row INSERT that fails on its last row must still be undone
    # whole, inside the batch, without touching the other jobs' rows.
    writer = SqliteWriter(tmp_path / "t.db", thread_name="test-db", what="test", setup=make_table)
    release = threading.Event()

    def hold(conn: sqlite3.Connection) -> str:
        release.wait()
        return str(conn.execute("PRAGMA temp_store").fetchone()[0])

    def insert(values: list[int]) -> Callable[[sqlite3.Connection], int]:
        def work(conn: sqlite3.Connection) -> int:
            marks = ", ".join(["(?)"] * len(values))
            conn.execute(f"INSERT INTO t VALUES {marks}", values)
            return len(values)

        return work

    held = writer.submit(hold)
    many = list(range(1, 301))
    first = writer.submit(insert(many))
    # Rows 400 and 401 go in before row 1 collides: the statement takes them back.
    failing = writer.submit(insert([400, 401, 1]))
    last = writer.submit(insert([500]))
    release.set()
    assert await held == "2"  # MEMORY
    assert await first == 300
    with pytest.raises(sqlite3.IntegrityError):
        await failing
    assert await last == 1
    writer.stop()
    await asyncio.to_thread(writer.join)
    with contextlib.closing(sqlite3.connect(tmp_path / "t.db")) as conn:
        rows = [v for (v,) in conn.execute("SELECT v FROM t ORDER BY v")]
    assert rows == [*many, 500]
