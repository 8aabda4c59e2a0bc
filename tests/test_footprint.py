"""What a sidecar with the example policies loads: nothing it does not use.

Each library here costs megabytes of resident memory per pod (redis 7, the
cryptography backend of pyjwt and authlib 8, sqlite3 and the webhook code,
aiohttp 11);
they are imported only when a policy or the environment asks for them.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import ROOT

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
import sidecar.admin

# `sidecar run` builds every subcommand's parser (inject's too) before it serves.
build_parser()

async def main():
    sidecar = Sidecar("policies", env={{"OPENAI_API_KEY": "k", "GITHUB_TOKEN": "t"}})
    assert (await sidecar.reload("startup")).ok
    await sidecar.close()

asyncio.run(main())
# The TLS context loads the system's CA store (megabytes): made at the first
# connection to an https upstream, not when a policy names one.
from sidecar.http.pool import _default_tls
if _default_tls.cache_info().currsize:
    print("a TLS context was made at load", file=sys.stderr)
    sys.exit(1)
print(json.dumps([m for m in {ONLY_WHEN_USED!r} if m in sys.modules]))
"""


def test_the_example_policies_load_no_library_they_do_not_use() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_the_free_heap_is_handed_back_where_glibc_can() -> None:
    # After start-up and each reload (core/memory.py): a glibc without malloc_trim
    # found would silently keep what loading a policy left behind.
    import platform

    from sidecar.core import memory

    if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
        assert memory._trim is not None
    memory.release()
