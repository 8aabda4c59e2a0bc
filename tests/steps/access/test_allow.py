"""Allow rules through the real sidecar: a table of agents x methods x paths, encoded
paths, trailing slashes and case, query and header conditions, the default rules,
hot reload, and /services."""

from __future__ import annotations

import hashlib

import pytest
from yarl import URL

from tests.conftest import Counting, echo_app

POLICY = """
    version: 1
    allow:
      - {{agents: [admin]}}
    services:
      gh:
        upstream: {base}
        allow:
          - agents: [research-*]
            methods: [GET]
            paths: [/repos/*/*, /repos/*/*/issues/**]
          - agents: triage-bot
            methods: [post, PATCH]
            paths: [/repos/*/*/issues/*]
          - methods: GET
            paths: /meta
          - agents: [search-bot]
            paths: [/search/*]
            query: {{per_page: "1*"}}
            headers: {{Accept: application/json}}
          - agents: [files-bot]
            paths: [/files/My%20Doc*, /a/**/z]
      other:
        upstream: {base}
      open:
        upstream: {base}
        allow: []
"""

TABLE = [
    # agent, method, path (as sent), status
    ("research-1", "GET", "/gh/repos/o/r", 200),
    ("research-1", "GET", "/gh/repos/o/r/issues", 200),
    ("research-1", "GET", "/gh/repos/o/r/issues/1/comments", 200),
    ("research-1", "GET", "/gh/repos/o/r?page=2", 200),
    ("research-1", "POST", "/gh/repos/o/r", 403),
    ("research-1", "DELETE", "/gh/repos/o/r/issues/1", 403),
    ("research-1", "GET", "/gh/repos/o", 403),
    ("research-1", "GET", "/gh/repos/o/r/extra", 403),
    # A trailing slash is another path; case matters in paths and agent names.
    ("research-1", "GET", "/gh/repos/o/r/", 403),
    ("research-1", "GET", "/gh/Repos/o/r", 403),
    ("RESEARCH-1", "GET", "/gh/repos/o/r", 403),
    ("research-", "GET", "/gh/repos/o/r", 200),
    # Percent-encoding: decoded once before matching...
    ("research-1", "GET", "/gh/rep%6Fs/o/r", 200),
    # ...but an encoded slash is refused: upstreams differ on whether it splits a segment.
    ("research-1", "GET", "/gh/repos/o%2Fr", 400),
    ("research-1", "GET", "/gh/repos/o/r%2Fx", 400),
    ("research-1", "GET", "/gh/repos/o%2fr/x%5Cy", 400),
    # Dot segments however spelled never get through (the listener refuses them).
    ("research-1", "GET", "/gh/repos/o/r/issues/%2e%2e/%2e%2e/x", 400),
    ("research-1", "GET", "/gh/repos/o/r/issues/%2E%2E%2Fx", 400),
    ("triage-bot", "PATCH", "/gh/repos/o/r/issues/5", 200),
    ("triage-bot", "POST", "/gh/repos/o/r/issues/5", 200),
    ("triage-bot", "GET", "/gh/repos/o/r/issues/5", 403),
    ("triage-bot", "PATCH", "/gh/repos/o/r/issues/5/lock", 403),
    # A rule without `agents` allows anyone, named or not.
    (None, "GET", "/gh/meta", 200),
    ("someone", "GET", "/gh/meta", 200),
    ("someone", "HEAD", "/gh/meta", 403),
    (None, "GET", "/gh/repos/o/r", 403),
    ("files-bot", "GET", "/gh/files/My%20Doc.txt", 200),
    ("files-bot", "GET", "/gh/files/My%20Doc/x", 403),
    ("files-bot", "GET", "/gh/a/z", 200),
    ("files-bot", "GET", "/gh/a/b/c/z", 200),
    ("files-bot", "GET", "/gh/a/bz", 403),
    # `other` has no rules of its own: the top-level ones apply.
    ("admin", "DELETE", "/other/anything/at/all", 200),
    ("research-1", "GET", "/other/x", 403),
    (None, "GET", "/other/x", 403),
    # `open` says `allow: []`: no rules, everyone.
    (None, "POST", "/open/x", 200),
]


@pytest.fixture
async def gh(upstream, start_sidecar):
    counting = Counting()
    base = await upstream(counting.app())
    sc = await start_sidecar(POLICY.format(base=base))
    return sc, counting


async def test_a_table_of_agents_methods_and_paths(gh, client):
    sc, counting = gh
    wrong = []
    for agent, method, path, status in TABLE:
        headers = {"X-Agent-Id": agent} if agent else {}
        # encoded=True: sent byte for byte, as a raw HTTP client would (no normalizing).
        async with client.request(method, URL(sc.url + path, encoded=True), headers=headers) as r:
            if r.status != status:
                wrong.append((agent, method, path, r.status, await r.text()))
    assert wrong == []
    assert counting.hits == sum(1 for *_, status in TABLE if status == 200)


@pytest.mark.parametrize(
    ("query", "accept", "status"),
    [
        ("per_page=10", "application/json", 200),
        ("per_page=1", "application/json", 200),
        ("per_page=5", "application/json", 403),
        ("", "application/json", 403),
        ("per_page=10&per_page=5", "application/json", 400),  # read differently: refused
        ("per_page=10", "text/html", 403),
        ("per_page=10", None, 403),
        ("q=x&per_page=1%30", "application/json", 200),  # values are decoded
    ],
)
async def test_query_and_header_conditions(gh, client, query, accept, status):
    sc, _ = gh
    headers = {"X-Agent-Id": "search-bot"}
    if accept is not None:
        headers["Accept"] = accept
    async with client.get(f"{sc.url}/gh/search/code?{query}", headers=headers) as r:
        assert r.status == status, await r.text()


async def test_the_refusal_names_the_service_and_the_rule_set(gh, client):
    sc, counting = gh
    async with client.post(
        f"{sc.url}/gh/repos/o/r?token=abc", headers={"X-Agent-Id": "research-1"}
    ) as r:
        assert r.status == 403
        assert r.headers["X-Sidecar-Error"] == "forbidden"
        assert r.headers["Content-Type"] == "application/problem+json"
        problem = await r.json()
    assert problem["reason"] == "forbidden"
    assert problem["service"] == "gh"
    assert "services.gh.allow" in problem["detail"]
    assert "agent 'research-1'" in problem["detail"]
    assert "POST /repos/o/r" in problem["detail"]
    assert "token=abc" not in problem["detail"]  # the query may hold anything
    async with client.get(f"{sc.url}/other/x") as r:
        detail = (await r.json())["detail"]
    assert "default allow rules" in detail and "unnamed agent" in detail
    assert counting.hits == 0


async def test_services_shows_the_rules_in_force(gh, client):
    sc, _ = gh
    async with client.get(f"{sc.admin}/services") as r:
        services = (await r.json())["services"]
    assert services["gh"]["allow"]["from"] == "services.gh.allow"
    assert services["gh"]["allow"]["rules"][0] == {
        "agents": ["research-*"],
        "methods": ["GET"],
        "paths": ["/repos/*/*", "/repos/*/*/issues/**"],
    }
    assert services["gh"]["allow"]["rules"][1]["methods"] == ["POST", "PATCH"]
    assert services["other"]["allow"] == {"from": "allow", "rules": [{"agents": ["admin"]}]}
    assert services["open"]["allow"] == {"from": None, "rules": []}
    async with client.get(f"{sc.admin}/config") as r:
        config = await r.json()
    assert config["allow"] == [{"agents": ["admin"]}]
    assert config["services"]["open"]["allow"] == []


async def test_rules_hot_reload(gh, client):
    sc, _ = gh
    headers = {"X-Agent-Id": "research-1"}
    async with client.get(f"{sc.url}/other/x", headers=headers) as r:
        assert r.status == 403
    text = (sc.policies / "policy.yaml").read_text()
    sc.write("policy.yaml", text.replace("agents: [admin]", "agents: [admin, research-*]"))
    assert (await sc.sidecar.reload("test")).ok
    async with client.get(f"{sc.url}/other/x", headers=headers) as r:
        assert r.status == 200


async def test_verified_agents_cannot_name_themselves(upstream, start_sidecar, client):
    """With agents.keys, the rules see the key's agent; X-Agent-Id counts for nothing."""
    key = "admin-key-canary"
    base = await upstream(echo_app())
    sc = await start_sidecar(
        f"""
        version: 1
        agents:
          keys:
            admin: sha256:{hashlib.sha256(key.encode()).hexdigest()}
            research-1: sha256:{hashlib.sha256(b"other-key").hexdigest()}
        services:
          api:
            upstream: {base}
            allow: [{{agents: [admin], methods: [DELETE]}}]
        """
    )
    spoof = {"X-Agent-Id": "admin", "X-Agent-Token": "other-key"}
    async with client.delete(f"{sc.url}/api/x", headers=spoof) as r:
        assert r.status == 403
        assert "agent 'research-1'" in (await r.json())["detail"]
    async with client.delete(f"{sc.url}/api/x", headers={"X-Agent-Token": key}) as r:
        assert r.status == 200
        assert key not in await r.text()
