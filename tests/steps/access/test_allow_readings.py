"""Allow rules judge the call the upstream runs, through the real `sidecar run` process:
method-override headers, encoded separators and query parameters that servers
read another way than the rule's spelling."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.conftest import echo_app
from tests.helpers import sidecar_process

pytestmark = pytest.mark.process

POLICY = """\
version: 1
services:
  gh:
    upstream: {base}
    allow:
      - {{methods: [GET], paths: [/repos/*/*, /repos/*/*/issues]}}
      - {{agents: [triage-bot], methods: [PATCH], paths: [/repos/*/*/issues/*]}}
      - {{agents: [search-bot], paths: [/issues], query: {{state: open}}}}
      - {{agents: [admin]}}
  legacy:
    upstream: {base}
    method_override: [PATCH]
    allow:
      - {{methods: [GET, POST], paths: [/items/*]}}
      - {{agents: [triage-bot], methods: [PATCH], paths: [/items/*]}}
  lab:
    upstream: {base}
    escaped_slashes: keep
    allow:
      - {{methods: [GET], paths: [/projects/*/issues]}}
"""


@pytest.fixture
async def sidecar(upstream, tmp_path: Path) -> AsyncIterator[tuple[str, aiohttp.ClientSession]]:
    base = await upstream(echo_app())
    (tmp_path / "p.yaml").write_text(POLICY.format(base=base))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "SIDECAR_"))}
    async with (
        sidecar_process(tmp_path, env=env) as proc,
        aiohttp.ClientSession() as client,
    ):
        yield proc.url, client


async def _call(
    sidecar: tuple[str, aiohttp.ClientSession],
    method: str,
    path: str,
    *,
    agent: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], str | None]:
    url, client = sidecar
    sent = dict(headers or {})
    if agent is not None:
        sent["X-Agent-Id"] = agent
    # encoded=True: the target goes out byte for byte, as a raw client sends it.
    async with client.request(method, URL(url + path, encoded=True), headers=sent) as r:
        return r.status, json.loads(await r.text()), r.headers.get("X-Sidecar-Error")


async def test_override_headers_never_reach_an_upstream_that_did_not_opt_in(sidecar):
    """A GET-only rule passes the GET, but the upstream never sees a DELETE override."""
    for header in ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"):
        status, seen, _ = await _call(sidecar, "GET", "/gh/repos/o/r", headers={header: "DELETE"})
        assert status == 200
        assert header.lower() not in {k.lower() for k in seen["headers"]}


async def test_an_opted_in_service_judges_the_overridden_method(sidecar):
    # POST is allowed for anyone, PATCH only for triage-bot: the override is judged.
    status, body, reason = await _call(
        sidecar, "POST", "/legacy/items/1", headers={"X-HTTP-Method-Override": "PATCH"}
    )
    assert (status, reason) == (403, "forbidden")
    assert "PATCH /items/1" in body["detail"]
    status, seen, _ = await _call(
        sidecar,
        "POST",
        "/legacy/items/1",
        agent="triage-bot",
        headers={"X-HTTP-Method-Override": "patch"},
    )
    assert status == 200
    assert seen["headers"]["X-HTTP-Method-Override"] == "patch"


async def test_an_override_is_judged_after_the_same_call_was_allowed(sidecar):
    """The decision kept for a plain POST is not the one for a POST overridden to PATCH,
    whichever comes first; and a refused call never reaches the upstream."""
    override = {"X-HTTP-Method-Override": "PATCH"}
    for _ in range(2):
        status, seen, _ = await _call(sidecar, "POST", "/legacy/items/7")
        assert status == 200
        assert seen["method"] == "POST"
        status, body, reason = await _call(sidecar, "POST", "/legacy/items/7", headers=override)
        assert (status, reason) == (403, "forbidden")
        assert "method" not in body  # the sidecar's refusal, not the echo of a call
    status, seen, _ = await _call(
        sidecar, "POST", "/legacy/items/7", agent="triage-bot", headers=override
    )
    assert status == 200
    status, _, reason = await _call(sidecar, "POST", "/legacy/items/7", headers=override)
    assert (status, reason) == (403, "forbidden")


async def test_an_override_the_service_does_not_take_is_refused(sidecar):
    for headers in (
        {"X-HTTP-Method-Override": "DELETE"},  # not among the service's methods
        {"X-HTTP-Method-Override": "PATCH", "X-Method-Override": "DELETE"},  # two readings
    ):
        status, body, reason = await _call(
            sidecar, "POST", "/legacy/items/1", agent="triage-bot", headers=headers
        )
        assert (status, reason) == (400, "bad_request")
        assert "method overrides name" in body["detail"]


async def test_a_method_in_the_query_is_refused_where_no_override_is_taken(sidecar):
    """Express's method-override (with a query getter) and Laravel read `_method`."""
    for query in ("_method=DELETE", "_METHOD=delete", "%5Fmethod=DELETE"):
        status, body, reason = await _call(sidecar, "GET", f"/gh/repos/o/r?{query}")
        assert (status, reason) == (400, "bad_request"), query
        assert "`_method`" in body["detail"]


async def test_a_method_in_the_query_is_judged_where_overrides_are_taken(sidecar):
    status, _, reason = await _call(sidecar, "POST", "/legacy/items/1?_method=PATCH")
    assert (status, reason) == (403, "forbidden")
    status, seen, _ = await _call(
        sidecar, "POST", "/legacy/items/1?_method=PATCH", agent="triage-bot"
    )
    assert (status, seen["query"]) == (200, "_method=PATCH")


async def test_encoded_separators_are_refused_on_a_service_with_rules(sidecar):
    for path in ("/gh/repos/o%2Fr", "/gh/repos/o%2fr", "/gh/repos/o%5Cr", "/gh/repos/o%5cr/issues"):
        status, body, reason = await _call(sidecar, "GET", path)
        assert (status, reason) == (400, "bad_request"), path
        assert "encoded '/'" in body["detail"]


async def test_escaped_slashes_keep_judges_one_segment(sidecar):
    status, seen, _ = await _call(sidecar, "GET", "/lab/projects/group%2Fproject/issues")
    assert status == 200
    assert seen["raw_path"] == "/projects/group%2Fproject/issues"


async def test_a_query_rule_refuses_what_servers_read_differently(sidecar):
    for query in (
        "state=open&State=closed",  # a case-insensitive server
        "state=open&state[]=closed",  # PHP, Rails: an array
        "state=open&state%5B%5D=closed",
        "state=open;state=closed",  # a server that splits on ';'
        "state=open&state=closed",  # first, last or both
        "state=open&state=open",
        "STATE=open",
    ):
        status, body, reason = await _call(
            sidecar, "GET", f"/gh/issues?{query}", agent="search-bot"
        )
        assert (status, reason) == (400, "bad_request"), (query, body)
        assert "query parameter" in body["detail"]


async def test_a_query_rule_holds_for_the_one_plain_reading(sidecar):
    status, seen, _ = await _call(
        sidecar, "GET", "/gh/issues?state=open&page=2", agent="search-bot"
    )
    assert status == 200
    assert seen["query"] == "state=open&page=2"
    status, _, reason = await _call(sidecar, "GET", "/gh/issues?state=closed", agent="search-bot")
    assert (status, reason) == (403, "forbidden")
    # `open;x` to a server that splits on '&' only: the rule must hold that way too.
    status, _, reason = await _call(sidecar, "GET", "/gh/issues?state=open;x", agent="search-bot")
    assert (status, reason) == (403, "forbidden")
    # Another rule that asks nothing of the query still allows the call.
    status, _, _ = await _call(sidecar, "GET", "/gh/issues?state=open&State=x", agent="admin")
    assert status == 200
