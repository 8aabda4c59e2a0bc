"""Routes: header, event type and JSON pointer tests with equals, glob and one_of."""

from __future__ import annotations

from pathlib import Path

from sidecar.webhooks.inbound import MISSING, InboundHook, resolve_pointer
from sidecar.webhooks.sqlite_store import SqliteStore

from .conftest import webhooks

POLICY = """
inbound:
  hook:
    path: /h
    verify: {type: hmac, header: X-Sig, secrets: [k]}
    routes:
      - name: issues
        match: {event: {glob: "issues.*"}}
        deliver_to: http://127.0.0.1:1/issues
      - name: big-orders
        match:
          header: {X-Shop: eu}
          pointer: {"/order/total": {one_of: [100, 200]}, "/order/lines/0/sku": ABC}
        deliver_to: [http://127.0.0.1:1/orders, http://127.0.0.1:1/audit]
      - name: flagged
        match: {pointer: {"/a~1b": true}}
        deliver_to: http://127.0.0.1:1/audit
"""


def test_pointer() -> None:
    doc = {"a/b": {"~x": [1, {"y": 2}]}}
    assert resolve_pointer(doc, "/a~1b/~0x/1/y") == 2
    assert resolve_pointer(doc, "") == doc
    for missing in ("/nope", "/a~1b/~0x/5", "/a~1b/~0x/y"):
        assert resolve_pointer(doc, missing) is MISSING


async def test_routes_match_on_header_event_and_pointer(tmp_path: Path) -> None:
    store = await SqliteStore.open(tmp_path)
    try:
        hook = InboundHook("hook", webhooks(POLICY).inbound["hook"], store=store, clock=lambda: 0)

        def urls(headers: dict[str, str], event: str | None, body: bytes) -> list[str]:
            return [t.url.rsplit("/", 1)[1] for t in hook.route(headers, event, body)]

        order = b'{"order": {"total": 200, "lines": [{"sku": "ABC"}]}}'
        assert urls({"x-shop": "eu"}, None, order) == ["orders", "audit"]
        assert urls({"x-shop": "us"}, None, order) == []
        # JSON types must agree: the string "200" is not the number 200.
        text_total = b'{"order": {"total": "200", "lines": [{"sku": "ABC"}]}}'
        assert urls({"x-shop": "eu"}, None, text_total) == []
        assert urls({}, "issues.opened", b"not json") == ["issues"]
        assert urls({}, "pull_request", b"{}") == []
        # A target named by two matching routes gets one copy.
        flagged_order = order[:-1] + b', "a/b": true}'
        assert urls({"x-shop": "eu"}, None, flagged_order) == ["orders", "audit"]
        assert urls({}, None, b'{"a/b": 1}') == []  # 1 is not true in JSON
    finally:
        await store.close()
