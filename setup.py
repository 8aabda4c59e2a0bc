"""The package, with its hot path compiled to C by mypyc when SIDECAR_MYPYC=1.

`make compiled` builds the modules below in place (next to their sources) for
`make run`, `make test` and `make bench`: the same typed code, about half the
CPU per proxied call. Without SIDECAR_MYPYC (a plain `pip install .`) the
package is pure Python and behaves the same.
"""

import os

from setuptools import setup

# What every proxied call runs through: the data plane, the steps of a common
# policy and the telemetry each call reports to; and each query's path through the
# database connector (wire codec, relay, pool, server connections). Modules with
# async generators stay interpreted (mypyc cannot compile those): sidecar/core/streams.py
# holds them.
COMPILED = [
    "sidecar/core/call.py",
    "sidecar/databases/channel.py",
    "sidecar/databases/client.py",
    "sidecar/databases/pool.py",
    "sidecar/databases/protocol.py",
    "sidecar/databases/server.py",
    "sidecar/core/headers.py",
    "sidecar/core/problems.py",
    # The engines under the rate-limit and breaker steps (moved out of their compiled
    # modules): a token bucket and the breaker's state run on every call.
    "sidecar/engines/breaker.py",
    "sidecar/engines/limits.py",
    # Identity and allow rules, first in every chain that has them: the verdicts of
    # credentials proven before and the compiled rules run on every call.
    "sidecar/engines/allow.py",
    "sidecar/engines/identity.py",
    "sidecar/engines/verdicts.py",
    "sidecar/http/egress.py",
    "sidecar/http/http1.py",
    "sidecar/http/listener.py",
    "sidecar/http/pool.py",
    "sidecar/http/redirects.py",
    "sidecar/http/router.py",
    "sidecar/http/upstream.py",
    # OpenAPI validation: a validated call's match, parameter and body checks.
    "sidecar/openapi/spec.py",
    "sidecar/steps/access/allow.py",
    "sidecar/steps/access/identity.py",
    "sidecar/steps/access/validate.py",
    # A cache hit is answered here, before the limiters and the upstream: it must cost
    # less than the call it saves (steps/answers/cache_stream.py keeps the miss's async generator).
    "sidecar/steps/answers/cache.py",
    "sidecar/steps/answers/cache_entry.py",
    "sidecar/steps/credentials/auth.py",
    "sidecar/steps/resilience/breaker.py",
    "sidecar/steps/resilience/outcomes.py",
    "sidecar/steps/resilience/pause.py",
    "sidecar/steps/resilience/ratelimit.py",
    "sidecar/steps/resilience/retry.py",
    "sidecar/steps/resilience/timeout.py",
    "sidecar/telemetry/access.py",
    "sidecar/telemetry/exchange.py",
    "sidecar/telemetry/metrics.py",
    "sidecar/telemetry/records.py",
    # Webhooks: each event's intake (verify, route, store) and its delivery (claim, the
    # attempt on the pool, its record), and the SQLite writer thread's batches. Inbound
    # at thousands of events a second is mostly this code between the sockets and SQLite.
    "sidecar/sqlite_writer.py",
    "sidecar/webhooks/answers.py",
    "sidecar/webhooks/delivery.py",
    "sidecar/webhooks/inbound.py",
    "sidecar/webhooks/listener.py",
    "sidecar/webhooks/observe.py",
    "sidecar/webhooks/queue.py",
    "sidecar/webhooks/redis_store.py",
    "sidecar/webhooks/signatures.py",
    "sidecar/webhooks/sqlite_store.py",
]

ext_modules = []
if os.environ.get("SIDECAR_MYPYC") == "1":
    from mypyc.build import mypycify

    # The webhook queue and delivery are a build of their own: its shared library is
    # mapped only by a sidecar whose policy declares webhooks (one library of both cost
    # every sidecar 1.5 MiB of idle RSS, its pages mapped whether run or not). The two
    # builds call each other as Python modules; the two webhook modules every sidecar
    # imports (its /_webhooks/ app) stay with the hot path.
    always = ("sidecar/webhooks/answers.py", "sidecar/webhooks/listener.py")
    webhooks = [
        m
        for m in COMPILED
        if (m.startswith("sidecar/webhooks/") or m == "sidecar/sqlite_writer.py")
        and m not in always
    ]
    ext_modules = mypycify(
        ["--config-file=pyproject.toml", *(m for m in COMPILED if m not in webhooks)],
        opt_level="3",
        # The shared library inside the package (sidecar/hot_path__mypyc...so), not at
        # the top level where only a checkout on sys.path would find it.
        group_name="sidecar.hot_path",
    ) + mypycify(
        ["--config-file=pyproject.toml", *webhooks],
        opt_level="3",
        group_name="sidecar.webhooks.compiled",
    )

setup(ext_modules=ext_modules)
