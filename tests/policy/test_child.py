"""A policy loaded in a child process (`sidecar run`'s way) is the one load_policy makes."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import serve
from sidecar.policy import child
from sidecar.policy.child import LoaderFailed, load_in_child
from sidecar.policy.loader import PolicyError, load_policy
from sidecar.policy.testing import CassetteOverride
from sidecar.runtime import Sidecar
from tests.conftest import echo_app

AGENT_KEY = "pk-canary-1"
KEY_HASH = "sha256:" + hashlib.sha256(AGENT_KEY.encode()).hexdigest()
DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "pets", "version": "1"},
    "paths": {
        "/pets": {
            "post": {
                "operationId": "addPet",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["name"],
                                "properties": {"name": {"type": "string"}},
                            }
                        }
                    },
                },
                "responses": {"200": {"description": "ok"}},
            }
        }
    },
}


def policies(directory: Path, upstream: str = "http://127.0.0.1:9") -> Path:
    (directory / "policy.yaml").write_text(
        textwrap.dedent(
            f"""
            version: 1
            agents:
              keys: {{planner: "{KEY_HASH}"}}
            services:
              api:
                upstream: {upstream}
                auth: {{type: bearer, token: "${{env:API_TOKEN}}"}}
                rate_limit: {{rate: 10/s}}
                openapi: openapi.json
                validate: {{requests: enforce}}
              plain:
                upstream: http://127.0.0.1:9/v1/
                timeout: {{total: 2s}}
            allow:
              - {{agents: [planner], methods: [POST], paths: ["/pets"]}}
            """
        )
    )
    (directory / "openapi.json").write_text(json.dumps(DOCUMENT))
    return directory


ENV = {"API_TOKEN": "tok-canary-2"}


def rewrite(directory: str, text: str) -> None:
    Path(directory, "policy.yaml").write_text(text)


async def test_the_child_answers_what_load_policy_answers(tmp_path: Path) -> None:
    policies(tmp_path)
    here = load_policy(str(tmp_path), env=ENV)
    there = await load_in_child(str(tmp_path), env=ENV)
    assert there.version == here.version
    assert there.files == here.files
    assert there.agents == here.agents
    assert there.allow == here.allow
    assert set(there.services) == {"api", "plain"}
    for name, service in here.services.items():
        got = there.services[name]
        assert (got.prefix, got.spec, got.position, got.allow) == (
            service.prefix,
            service.spec,
            service.position,
            service.allow,
        )
    # The secrets were resolved from `env`, not from the child's own environment.
    auth = there.services["api"].spec.auth
    assert auth is not None and auth.token.reveal() == "tok-canary-2"  # type: ignore[union-attr]
    # The OpenAPI document arrives compiled: it matches and validates calls.
    spec = there.services["api"].openapi
    assert spec is not None and spec.digest == here.services["api"].openapi.digest  # type: ignore[union-attr]
    match = spec.match("POST", "/pets")
    assert match is not None and match.operation is not None
    assert match.operation.operation_id == "addPet"


async def test_every_argument_reaches_the_child(tmp_path: Path) -> None:
    """mode and cassettes change the services, listeners are refused as webhook
    targets, and a `${file:}` secret is read and watched: each as load_policy does."""
    policies(tmp_path)
    secret = tmp_path / "secret"
    secret.write_text("file-canary-3")
    (tmp_path / "more.yaml").write_text(
        "version: 1\nservices:\n  filed:\n    upstream: http://127.0.0.1:9\n"
        f"    auth: {{type: bearer, token: '${{file:{secret}}}'}}\n"
    )
    kwargs: dict[str, Any] = {
        "env": ENV,
        "mode": "replay",
        "cassettes": CassetteOverride(root=str(tmp_path / "tapes"), pacing="fast"),
        "listeners": (("127.0.0.1", 15000),),
    }
    here = load_policy(str(tmp_path), **kwargs)
    there = await load_in_child(str(tmp_path), **kwargs)
    assert there.version == here.version
    assert there.secret_files == here.secret_files == frozenset({str(secret)})
    assert there.described == here.described
    plain = there.services["plain"].spec
    assert plain.mode == "replay" and plain == here.services["plain"].spec
    assert plain.cassettes is not None and plain.cassettes.dir == str(tmp_path / "tapes" / "plain")
    assert "file-canary-3" not in json.dumps(there.described)


async def test_a_document_held_compiled_is_neither_sent_nor_compiled_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child is told which OpenAPI documents this process holds compiled: it stands
    in for them, and its answer names them, so both reloads serve the same Spec."""
    answers: list[bytes] = []
    unpickled = child._unpickled

    def recorded(data: bytes, held: Any) -> Any:
        answers.append(data)
        return unpickled(data, held)

    monkeypatch.setattr(child, "_unpickled", recorded)
    policies(tmp_path)
    first = await load_in_child(str(tmp_path), env=ENV)
    (tmp_path / "policy.yaml").write_text(
        (tmp_path / "policy.yaml").read_text().replace("rate: 10/s", "rate: 20/s")
    )
    second = await load_in_child(str(tmp_path), env=ENV)
    assert second.version != first.version
    assert second.services["api"].openapi is first.services["api"].openapi
    # The first answer carried the document, the second only named it.
    assert b"addPet" in answers[0] and b"addPet" not in answers[1]
    # A changed document is sent and compiled anew, and its checks run on it.
    changed = json.loads((tmp_path / "openapi.json").read_text())
    changed["paths"]["/pets"]["post"]["operationId"] = "createPet"
    (tmp_path / "openapi.json").write_text(json.dumps(changed))
    third = await load_in_child(str(tmp_path), env=ENV)
    spec = third.services["api"].openapi
    assert spec is not None and spec is not first.services["api"].openapi
    assert set(spec.operations) == {"createPet"}


async def test_the_child_imports_nothing_from_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    policies(tmp_path)
    trap = tmp_path / "cwd"
    trap.mkdir()
    (trap / "yaml.py").write_text("raise SystemExit('yaml.py imported from the cwd')\n")
    monkeypatch.chdir(trap)
    policy = await load_in_child(str(tmp_path), env=ENV)
    assert set(policy.services) == {"api", "plain"}


async def test_a_load_that_hangs_is_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `${file:}` naming a FIFO nobody writes blocks the read for ever: the child is
    killed after TIMEOUT and the reload says why."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "policy.yaml").write_text(
        "version: 1\nservices:\n  a:\n    upstream: http://127.0.0.1:9\n"
        f"    auth: {{type: bearer, token: '${{file:{fifo}}}'}}\n"
    )
    monkeypatch.setattr(child, "TIMEOUT", 1.0)
    with pytest.raises(LoaderFailed) as failed:
        await load_in_child(str(tmp_path))
    assert failed.value.cause == "TimeoutError"


async def test_a_broken_policy_is_refused_with_the_same_positions(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(
        "version: 1\nservices:\n  api:\n    upstream: http://127.0.0.1:9\n    timout: 5s\n"
        "    rate_limit: {rate: 10 per second}\n"
    )
    with pytest.raises(PolicyError) as here:
        load_policy(str(tmp_path))
    with pytest.raises(PolicyError) as there:
        await load_in_child(str(tmp_path))
    problems = [str(p) for p in there.value.problems]
    assert problems == [str(p) for p in here.value.problems]
    assert any(p.startswith(f"{tmp_path / 'policy.yaml'}:5:5: ") for p in problems), problems


@pytest.fixture
async def child_loaded(tmp_path: Path, upstream: Any) -> AsyncIterator[Sidecar]:
    """A sidecar that loaded the policy above in a child, before an echoing upstream."""
    directory = tmp_path / "policies"
    directory.mkdir()
    policies(directory, upstream=await upstream(echo_app()))
    sidecar = Sidecar(str(directory), env=ENV, data_dir=str(tmp_path / "data"), load=load_in_child)
    first = await sidecar.reload("startup")
    assert first.ok, first.errors
    yield sidecar
    await sidecar.close()


async def test_a_loader_that_dies_leaves_the_last_good_policy_serving(
    child_loaded: Sidecar, monkeypatch: pytest.MonkeyPatch
) -> None:
    sidecar = child_loaded
    assert sidecar.policy is not None
    version = sidecar.policy.version
    # The child cannot start: no answer comes back, and the reload says so.
    monkeypatch.setattr(sys, "executable", "/bin/false")
    rewrite(sidecar.policies, "version: 1\n")
    failed = await sidecar.reload("test")
    assert not failed.ok
    assert failed.errors == (f"{sidecar.policies}: cannot load: LoaderFailed",)
    assert sidecar.policy.version == version
    assert set(sidecar.policy.services) == {"api", "plain"}


async def test_calls_through_a_policy_loaded_in_the_child_are_validated(
    child_loaded: Sidecar,
) -> None:
    runners = await serve(child_loaded, listen=("127.0.0.1", 0), admin=("127.0.0.1", 0))
    try:
        port = runners[0].addresses[0][1]
        headers = {"X-Agent-Token": AGENT_KEY}
        async with aiohttp.ClientSession() as client:
            url = f"http://127.0.0.1:{port}/api/pets"
            async with client.post(url, json={"name": "rex"}, headers=headers) as ok:
                assert ok.status == 200
                seen = await ok.json()
                assert seen["headers"]["Authorization"] == "Bearer tok-canary-2"
            async with client.post(url, json={"kind": "cat"}, headers=headers) as bad:
                assert bad.status == 422
                assert bad.content_type == "application/problem+json"
    finally:
        for runner in runners:
            await runner.cleanup()
