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
