"""Policy steps, one folder per concern. A step is `async (call, next) -> reply`.

- access/: who is calling and may they (identity, allow, request rules, validation,
  object-store rules);
- resilience/: rate limits, pauses, retries, the breaker, timeouts, faults, fallback;
- credentials/: what the sidecar injects or signs (auth kinds, OAuth2, JWTs, clouds);
- llm/: token metering and limits, budgets, translation between LLM APIs;
- protocols/: GraphQL, MCP, WebSocket;
- answers/: answers given without the upstream (cache, mock, cassette);
- operation.py: the operation a call is known by (GraphQL, MCP, OpenAPI), which every
  group reads (limits by operation, telemetry's names, the cache key).

Every step module has `build(service, *, state) -> Step | None`: it validates and
precomputes at load time, and returns None when the policy does not ask for it. The
order of a chain is fixed in one place: http/chain.py's steps(). Package
`__init__` files stay thin and uncompiled (mypyc gives a compiled package `__init__`
a wrong `__path__`).
"""

from ..core.call import Handler, Step

__all__ = ["Handler", "Step"]
