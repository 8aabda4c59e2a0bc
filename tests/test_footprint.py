"""What a sidecar with the example policies loads: nothing it does not use.

Each library here costs megabytes of resident memory per pod (redis 7, the
cryptography backend of pyjwt and authlib 8, sqlite3 and the webhook code,
aiohttp 11);
they are imported only when a policy or the environment asks for them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.helpers import ROOT, probe, sidecar_process

ONLY_WHEN_USED = (
    "redis",
    "jwt",
    "authlib",
    "cryptography",
    "sqlite3",
    "opentelemetry.sdk",
    # The OpenTelemetry API too: with tracing off no span code runs.
    "opentelemetry.trace",
    "jsonschema_rs",
    "orjson",
    # The egress, admin and ingress listeners are the sidecar's own: no HTTP framework
    # until an OAuth2 token is fetched or a JWKS is read (webhooks deliver on the own pool).
    "aiohttp",
    # The access log's queue handler, only with --access-log.
    "logging.handlers",
    # The did-you-mean of a policy error.
    "difflib",
    # pydantic's plugin lookup, made when a validator is built, and the YAML parser
    # with the loader: the loading child's (policy/child.py).
    "importlib.metadata",
    "yaml",
    "sidecar.policy.loader",
    # Cloud credentials (steps/credentials/): only policies with those auth kinds.
    "google.auth",
    "configparser",
    "xml.etree",
    # databases: the PostgreSQL wire protocol, pool, sessions and SQL rules (with the
    # parser), imported by the first database a policy declares (databases/entry.py).
    "pglast",
    "sidecar.databases.entry",
    "sidecar.databases.protocol",
    "sidecar.databases.pool",
    "sidecar.databases.server",
    "sidecar.databases.client",
    "sidecar.databases.guard",
    "sidecar.databases.statements",
    # The steps of features no example service uses (http/chain.py's _when): GraphQL
    # (and graphql-core), MCP and its WebSocket tunnel, mock, record/replay, observe,
    # translation between LLM APIs, object-store rules.
    "graphql",
    "sidecar.steps.protocols.graphql",
    "sidecar.steps.protocols.graphql_errors",
    "sidecar.steps.protocols.mcp",
    "sidecar.steps.protocols.websocket",
    "sidecar.steps.answers.mock",
    "sidecar.steps.answers.cassette",
    "sidecar.learn.observe",
    "sidecar.steps.llm.translate",
    "sidecar.steps.access.objects",
)

PROBE = f"""
import asyncio, json, sys
from sidecar.cli import build_parser
from sidecar.runtime import Sidecar
from sidecar.policy.child import load_in_child
from sidecar.admin import effective_config

# `sidecar run` builds every subcommand's parser (inject's too) before it serves.
build_parser()

async def main():
    # Loaded as `sidecar run` loads: in a child process (policy/child.py).
    sidecar = Sidecar(
        "policies", env={{"OPENAI_API_KEY": "k", "GITHUB_TOKEN": "t"}}, load=load_in_child
    )
    assert (await sidecar.reload("startup")).ok
    # What /config and /services show was dumped by the loader: no serializer here.
    assert effective_config(sidecar)["services"]
    await sidecar.close()

asyncio.run(main())
# Validating builds a core schema and validator per model (megabytes): the child's work.
from pydantic import BaseModel
def models(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from models(sub)
built = sorted(m.__name__ for m in models(BaseModel) if m.__pydantic_complete__)
if built:
    print(f"validators built in the serving process: {{built}}", file=sys.stderr)
    sys.exit(1)
# The TLS context loads the system's CA store (megabytes): made at the first
# connection to an https upstream, not when a policy names one.
from sidecar.http.pool import _default_tls
if _default_tls.cache_info().currsize:
    print("a TLS context was made at load", file=sys.stderr)
    sys.exit(1)
print(json.dumps([m for m in {ONLY_WHEN_USED!r} if m in sys.modules]))
"""


def test_the_example_policies_load_no_library_they_do_not_use() -> None:
    assert probe(PROBE) == []


def test_the_free_heap_is_handed_back_where_glibc_can() -> None:
    # After start-up and each reload (core/memory.py): a glibc without malloc_trim
    # found would silently keep what loading a policy left behind.
    import platform

    from sidecar.core import memory

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert memory._trim is not None
    memory.release()


@pytest.mark.process
async def test_sidecar_run_serves_without_the_yaml_parser_or_a_validator() -> None:
    """`sidecar run` loads its policy in a child (policy/child.py): the serving process
    never maps PyYAML's C parser (nor pydantic's validators, which the probe above checks
    in-process); /config answers from what the loader dumped."""
    env = {**os.environ, "OPENAI_API_KEY": "k", "GITHUB_TOKEN": "t"}
    async with sidecar_process(ROOT / "policies", env=env) as proc:
        assert proc.proc.pid is not None
        assert "_yaml" not in _maps(proc.proc.pid)
        async with aiohttp.ClientSession() as client, client.get(f"{proc.admin}/config") as r:
            config = await r.json()
        assert set(config["services"]) and config["agents"]["header"] == "X-Agent-Id"
        assert "_yaml" not in _maps(proc.proc.pid)


def _maps(pid: int) -> str:
    """The files mapped into a process: each shared library it loaded."""
    return Path(f"/proc/{pid}/maps").read_text()
