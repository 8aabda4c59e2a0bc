"""`sidecar learn` on traffic recorded through the real sidecar from three real-shaped APIs.

What a platform team does: record an agent's calls (`mode: record`, or `mode:
observe`, or the access log), run `sidecar learn`, review, enforce. The learned
documents must be valid OpenAPI 3.1 with the templated paths a person would write,
the learned policy must pass `sidecar validate`, and enforcing its allow rules must
let the same traffic through and refuse a call outside it; no credential or value
an agent sent may end up in what was learned.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from openapi_spec_validator import validate
from yarl import URL

from tests.helpers import ROOT, eventually, sidecar_process
from tests.learn.apis import AGENT_SECRET, APIS, TOKEN, Call

pytestmark = pytest.mark.process


def sidecar_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def policy(upstreams: dict[str, str], mode: str, cassettes: Path | None = None) -> str:
    lines = ["version: 1", "services:"]
    for name, url in upstreams.items():
        lines += [f"  {name}:", f"    upstream: {url}", f"    mode: {mode}"]
        if cassettes is not None:
            lines.append(f"    cassettes: {cassettes / name}")
        if name == "github":
            lines.append('    auth: {type: bearer, token: "${env:LEARN_GH_TOKEN}"}')
    return "\n".join(lines) + "\n"


async def send(
    client: aiohttp.ClientSession, base: str, service: str, calls: list[Call]
) -> list[int]:
    statuses = []
    for agent, method, path, body in calls:
        async with client.request(
            method, f"{base}/{service}{path}", json=body, headers={"X-Agent-Id": agent}
        ) as resp:
            await resp.read()
            statuses.append(resp.status)
    return statuses


def distinct(calls: list[Call]) -> int:
    return len({(m, p, json.dumps(b, sort_keys=True)) for _, m, p, b in calls})


async def record_all(
    upstream, start_sidecar, client, tmp_path: Path
) -> tuple[Path, dict[str, str]]:
    upstreams = {name: await upstream(app()) for name, (app, _, _) in APIS.items()}
    cassettes = tmp_path / "cassettes"
    sc = await start_sidecar(policy(upstreams, "record", cassettes), env={"LEARN_GH_TOKEN": TOKEN})
    for name, (_, traffic, _) in APIS.items():
        statuses = await send(client, sc.url, name, traffic)
        assert all(s < 400 for s in statuses), (name, statuses)
    for name, (_, traffic, _) in APIS.items():
        folder, n = cassettes / name, distinct(traffic)
        await eventually(
            lambda folder=folder, n=n: len(list(folder.glob("*.json"))) == n,
            f"the cassettes of {name}",
        )
    return cassettes, upstreams


def learned_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {(m.upper(), p) for p, item in document["paths"].items() for m in item}


async def test_learned_documents_rules_and_enforcement(upstream, start_sidecar, client, tmp_path):
    cassettes, upstreams = await record_all(upstream, start_sidecar, client, tmp_path)
    out = tmp_path / "learned"
    recorded_policy = tmp_path / "recorded"
    recorded_policy.mkdir()
    (recorded_policy / "policy.yaml").write_text(policy(upstreams, "live"))
    done = sidecar_cli(
        "learn",
        "--cassettes",
        str(cassettes),
        "--policies",
        str(recorded_policy),
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    assert "github: 11 calls" in done.stderr  # 12 sent, one exchange recorded twice

    for name, (_, _, expected) in APIS.items():
        document = json.loads((out / f"{name}.openapi.json").read_text())
        validate(document)  # OpenAPI 3.1, by openapi-spec-validator
        assert document["openapi"] == "3.1.0"
        assert learned_operations(document) == expected, name

    github = json.loads((out / "github.openapi.json").read_text())
    issues = github["paths"]["/repos/{owner}/{repo}/issues"]
    listed = {p["name"]: p for p in issues["get"]["parameters"]}
    assert listed["state"]["required"] is True and listed["per_page"]["required"] is False
    created = issues["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert created["required"] == ["body", "labels", "title"]
    repo = github["paths"]["/repos/{owner}/{repo}"]["get"]["responses"]["200"]
    shape = repo["content"]["application/json"]["schema"]["properties"]
    assert shape["created_at"] == {"type": "string", "format": "date-time"}
    assert shape["homepage"] == {"type": "null"}
    ledger = json.loads((out / "ledger.openapi.json").read_text())
    item = ledger["paths"]["/items/{item_id}"]["get"]["parameters"][0]
    assert item["schema"] == {"type": "string", "format": "uuid"}

    # Nothing secret: not the service's token, not what an agent sent, not the name of a
    # query parameter that carries a credential.
    for file in out.iterdir():
        text = file.read_text()
        assert TOKEN not in text and AGENT_SECRET not in text, file
        assert "api_key" not in text, file

    valid = sidecar_cli("validate", str(out))
    assert valid.returncode == 0, valid.stderr

    # Enforce what was learned (the platform team adds the credential).
    text = (out / "github.yaml").read_text()
    (out / "github.yaml").write_text(
        text.replace(
            "    openapi:", '    auth: {type: bearer, token: "${env:LEARN_GH_TOKEN}"}\n    openapi:'
        )
    )
    sc = await start_sidecar(
        {f.name: f.read_text() for f in out.iterdir()}, env={"LEARN_GH_TOKEN": TOKEN}
    )
    for name, (_, traffic, _) in APIS.items():
        statuses = await send(client, sc.url, name, traffic)
        assert all(s < 400 for s in statuses), (name, statuses)
    outside = [
        (
            "research-bot",
            "POST",
            "/repos/psf/black/issues",
            {"title": "x", "body": "y", "labels": []},
        ),
        ("research-bot", "GET", "/repos/psf/black/pulls", None),
        ("billing-bot", "GET", "/users/octocat", None),
    ]
    assert await send(client, sc.url, "github", outside) == [403, 403, 403]
    assert await send(
        client, sc.url, "ledger", [("billing-bot", "PUT", f"/items/{'0' * 8}", {})]
    ) == [403]


async def test_diff_names_what_the_policy_does_not_cover(upstream, start_sidecar, client, tmp_path):
    cassettes, _ = await record_all(upstream, start_sidecar, client, tmp_path)
    out = tmp_path / "learned"
    assert sidecar_cli("learn", "--cassettes", str(cassettes), "--out", str(out)).returncode == 0
    same = sidecar_cli("learn", "--diff", "--policies", str(out), "--cassettes", str(cassettes))
    assert same.returncode == 0, same.stdout + same.stderr
    assert "no drift" in same.stderr

    # A week later the agent does more than it did.
    app, _, _ = APIS["github"]
    newer = tmp_path / "newer"
    sc = await start_sidecar(
        policy({"github": await upstream(app())}, "record", newer), env={"LEARN_GH_TOKEN": TOKEN}
    )
    more = [
        ("research-bot", "GET", "/repos/python/cpython", None),
        ("research-bot", "GET", "/repos/python/cpython/pulls", None),
        ("research-bot", "GET", "/repos/psf/black/pulls", None),
    ]
    await send(client, sc.url, "github", more)
    await eventually(lambda: len(list((newer / "github").glob("*.json"))) == 3, "new cassettes")
    drift = sidecar_cli("learn", "--diff", "--policies", str(out), "--cassettes", str(newer))
    assert drift.returncode == 1, drift.stdout + drift.stderr
    lines = drift.stdout.splitlines()
    assert any(
        "research-bot GET /repos/{owner}/{repo}/pulls" in line and "no allow rule" in line
        for line in lines
    ), lines
    assert any("not in the OpenAPI document" in line for line in lines), lines
    assert not any(
        line.endswith("/repos/{owner}/{repo}: no allow rule lets it (1 calls)") for line in lines
    )


async def test_observe_mode_writes_shapes_only(upstream, tmp_path):
    app, traffic, expected = APIS["github"]
    base = await upstream(app())
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(policy({"github": base}, "observe"))
    data = tmp_path / "data"
    env = {**os.environ, "LEARN_GH_TOKEN": TOKEN}
    async with sidecar_process(policies, "--data-dir", str(data), env=env) as sc:
        async with aiohttp.ClientSession() as client:
            statuses = await send(client, sc.url, "github", traffic)
        assert all(s < 400 for s in statuses), statuses
        observed = data / "observe" / "github.jsonl"
        await eventually(
            lambda: observed.exists() and len(observed.read_text().splitlines()) == len(traffic),
            "the observed lines",
        )
    text = observed.read_text()
    assert TOKEN not in text and AGENT_SECRET not in text and "crash" not in text
    assert "python" in text  # paths are kept (as the access log keeps them): they are the shape
    out = tmp_path / "learned"
    done = sidecar_cli("learn", "--observed", str(data), "--out", str(out))
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "github.openapi.json").read_text())
    validate(document)
    assert learned_operations(document) == expected
    rules = (out / "github.yaml").read_text()
    assert "agents: [triage-bot]" in rules and "methods: [POST]" in rules
    assert "crash" not in json.dumps(document)


async def test_access_log_gives_rules_per_agent(upstream, tmp_path):
    app, traffic, expected = APIS["github"]
    base = await upstream(app())
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(policy({"github": base}, "live"))
    env = {**os.environ, "LEARN_GH_TOKEN": TOKEN}
    async with sidecar_process(policies, "--access-log", env=env) as sc:
        async with aiohttp.ClientSession() as client:
            await send(client, sc.url, "github", traffic)
        await eventually(
            lambda: sum(1 for x in sc.stdout if '"agent"' in x) >= len(traffic), "log lines"
        )
        log = tmp_path / "access.log"
        log.write_text("".join(sc.stdout))
    out = tmp_path / "learned"
    done = sidecar_cli("learn", "--access-log", str(log), "--since", "1h", "--out", str(out))
    assert done.returncode == 0, done.stderr
    document = json.loads((out / "github.openapi.json").read_text())
    validate(document)
    assert learned_operations(document) == expected
    rules = (out / "github.yaml").read_text()
    assert "# research-bot: 9 calls" in rules
    assert (
        "paths: [/orgs/*/repos, /repos/*/*, /repos/*/*/issues, /repos/*/*/issues/*, /users/*]"
        in rules
    )
    # Nothing from long ago is learned.
    old = sidecar_cli("learn", "--access-log", str(log), "--since", "2000-01-01", "--out", str(out))
    assert old.returncode == 0
    future = sidecar_cli(
        "learn", "--access-log", str(log), "--since", "2100-01-01", "--out", str(out)
    )
    assert future.returncode == 1 and "no calls" in future.stderr


async def test_a_secret_made_of_letters_is_never_learned_as_an_enum(
    upstream, start_sidecar, client, tmp_path
):
    # A pass phrase of plain words, sent again and again, looks like an enum to the schema
    # merger; neither a field named like one (passphrase, pwd, pin, otp) nor anything
    # beneath a field named like a credential may be written down.
    phrase, nested = "correct-horse-battery", "swordfish"

    async def login(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/login", login)
    base = await upstream(app)
    cassettes = tmp_path / "cassettes"
    sc = await start_sidecar(policy({"accounts": base}, "record", cassettes))
    bodies = [
        {
            "user": f"user{i}",
            "kind": "human",
            "passphrase": phrase,
            "pwd": nested,
            "credentials": {"value": nested, "scheme": phrase},
        }
        for i in range(4)
    ]
    for body in bodies:
        async with client.post(f"{sc.url}/accounts/login", json=body) as resp:
            assert resp.status == 200
    folder = cassettes / "accounts"
    await eventually(lambda: len(list(folder.glob("*.json"))) == 4, "the cassettes")
    out = tmp_path / "learned"
    done = sidecar_cli("learn", "--cassettes", str(cassettes), "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = (out / "accounts.openapi.json").read_text() + (out / "accounts.yaml").read_text()
    assert phrase not in text and nested not in text
    # An enum is still learned where a value is a word of the API.
    document = json.loads((out / "accounts.openapi.json").read_text())
    body = document["paths"]["/login"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"]["properties"]["kind"]["enum"] == ["human"]


async def test_diff_judges_paths_as_the_allow_step_does(upstream, start_sidecar, client, tmp_path):
    # The allow step compares paths percent-decoded (`/search/read%20me` is `/search/read me`),
    # so the learned rule lets this call through; --diff must not call it drift.
    async def search(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_get("/search/{q}", search)
    base = await upstream(app)
    cassettes = tmp_path / "cassettes"
    sc = await start_sidecar(policy({"notes": base}, "record", cassettes))
    target = URL(f"{sc.url}/notes/search/caf%C3%A9", encoded=True)
    async with client.get(target, headers={"X-Agent-Id": "reader"}) as resp:
        assert resp.status == 200
    await eventually(lambda: len(list((cassettes / "notes").glob("*.json"))) == 1, "cassette")
    out = tmp_path / "learned"
    assert sidecar_cli("learn", "--cassettes", str(cassettes), "--out", str(out)).returncode == 0
    same = sidecar_cli("learn", "--diff", "--policies", str(out), "--cassettes", str(cassettes))
    assert same.returncode == 0, same.stdout + same.stderr
    # The allow step, enforcing the same rules, agrees.
    sc = await start_sidecar({f.name: f.read_text() for f in out.iterdir()})
    async with client.get(target, headers={"X-Agent-Id": "reader"}) as resp:
        assert resp.status == 200, await resp.text()


async def test_keys_that_are_values_are_never_learned_as_property_names(
    upstream, start_sidecar, client, tmp_path
):
    # A JSON object used as a map, keyed by API keys, e-mail addresses or ids: its keys are
    # data, as secret or personal as any value, and must not become property names.
    key, email = "sk-live-4f9a8b7c6d5e", "alice@example.com"

    async def keys(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(
            {"by_key": {key: {"scopes": ["read"]}}, "owners": {email: {"admin": True}}}
        )

    app = web.Application()
    app.router.add_post("/keys", keys)
    base = await upstream(app)
    cassettes = tmp_path / "cassettes"
    sc = await start_sidecar(policy({"keys": base}, "record", cassettes))
    async with client.post(f"{sc.url}/keys/keys", json={"grants": {key: "read"}}) as resp:
        assert resp.status == 200
    await eventually(lambda: len(list((cassettes / "keys").glob("*.json"))) == 1, "cassette")
    out = tmp_path / "learned"
    done = sidecar_cli("learn", "--cassettes", str(cassettes), "--out", str(out))
    assert done.returncode == 0, done.stderr
    text = (out / "keys.openapi.json").read_text()
    assert key not in text and email not in text
    document = json.loads(text)
    validate(document)
    answer = document["paths"]["/keys"]["post"]["responses"]["200"]["content"]["application/json"]
    # The map's values are still described, under additionalProperties.
    by_key = answer["schema"]["properties"]["by_key"]
    assert by_key["additionalProperties"]["properties"]["scopes"]["type"] == "array"


async def test_observe_mode_writes_no_key_that_is_data(upstream, tmp_path):
    key = "sk-live-4f9a8b7c6d5e"

    async def keys(request: web.Request) -> web.Response:
        return web.json_response({"issued": {key: {"scopes": ["read"]}}})

    app = web.Application()
    app.router.add_get("/keys", keys)
    policies = tmp_path / "policies"
    policies.mkdir()
    (policies / "policy.yaml").write_text(policy({"keys": await upstream(app)}, "observe"))
    data = tmp_path / "data"
    async with sidecar_process(policies, "--data-dir", str(data)) as sc:
        async with aiohttp.ClientSession() as client, client.get(f"{sc.url}/keys/keys") as r:
            assert r.status == 200
        observed = data / "observe" / "keys.jsonl"
        await eventually(lambda: observed.exists() and observed.read_text(), "the observed line")
    text = observed.read_text()
    assert key not in text
    assert '"scopes"' in text  # the shape beneath it is kept
