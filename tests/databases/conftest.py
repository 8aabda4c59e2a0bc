from __future__ import annotations

from collections.abc import Iterator

import pytest

from .pg_server import PostgresServer


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """One PostgreSQL for the whole folder: starting one costs about a second."""
    server = PostgresServer()
    try:
        server.init()
        yield server
    finally:
        server.close()
