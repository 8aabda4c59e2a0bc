"""The queue's contract as its callers see it, whichever store implements it."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from sidecar.webhooks.inbound import Ingress
from sidecar.webhooks.outbound import Outbox
from sidecar.webhooks.queue import Direction, StoreUnavailable, Target
from sidecar.webhooks.sqlite_store import DB_NAME, SqliteStore

from .conftest import github_headers, webhooks
from .test_delivery import OUTBOUND, SECRET, WHSEC, inbound_policy


async def test_a_failing_database_is_a_503_to_senders_and_agents(
    store: SqliteStore, tmp_path: Path
) -> None:
    """Intake knows the queue, not SQLite: a database error is StoreUnavailable, so the
    sender hears 503 store_unavailable (and sends again) as with Redis down."""
    body = b'{"n": 1}'
    ingress = Ingress(inbound_policy("http://127.0.0.1:1/"), store=store)
    outbox = Outbox(
        webhooks(OUTBOUND.format(secret=WHSEC, gone="http://127.0.0.1:1/", fine="http://x/")),
        store=store,
    )
    ok = await ingress.handle("/hooks/github", github_headers(body, SECRET, "d-1"), body)
    assert ok.status == 200
    # Another hand breaks the file under the running store.
    with sqlite3.connect(tmp_path / "data" / DB_NAME) as other:
        other.execute("DROP TABLE deliveries")
    with pytest.raises(StoreUnavailable):
        await store.accept(
            direction=Direction.inbound,
            source="github",
            event_type=None,
            headers=[],
            body=body,
            targets=[Target("t", "http://127.0.0.1:1/")],
        )
    refused = await ingress.handle("/hooks/github", github_headers(body, SECRET, "d-2"), body)
    published = await outbox.handle("events", {"X-Event-Type": "invoice.paid"}, body)
    for result in (refused, published):
        assert result.status == 503
        assert result.headers["X-Sidecar-Error"] == "store_unavailable"
