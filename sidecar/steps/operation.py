"""What a protocol-aware step (graphql.py, mcp.py) learns about a call, and how it reads it.

The GraphQL and MCP steps read the request body to find the operation (a
GraphQL operation's type and name, an MCP method and tool). Telemetry and the
rate limiter need that operation later in the chain. `Call` has no slot for
it, so it travels two ways:

- `annotate(call, ...)` puts span/metric attributes into `call.exchange.attributes`
  when the exchange has such a dict (telemetry reads them when the call is over);
- `OPERATION` holds the operations' labels ("mutation:CreateIssue",
  "tools/call:search_web"; several for a batch) for the rest of the chain,
  which runs in the same task (or a copy of its context), so a later step
  (the rate limiter's `operations:`) can key on them.
"""

from __future__ import annotations

import json
import re
from contextvars import ContextVar
from typing import Any
from urllib.parse import unquote

from ..core.call import Call, make_replayable
from ..core.problems import ProblemError
from ..core.reasons import Reason

# The operations of the call this task is working on; () outside a GraphQL/MCP step.
OPERATION: ContextVar[tuple[str, ...]] = ContextVar("sidecar_operation", default=())


def annotate(call: Call, attributes: dict[str, str | int | bool]) -> None:
    """Hand attributes to telemetry, if this call is observed and its exchange takes them."""
    exchange = call.exchange
    if exchange is None:
        return
    if exchange.attributes is None:
        exchange.attributes = dict(attributes)
    else:
        exchange.attributes.update(attributes)


async def read_body(call: Call, *, service: str, what: str) -> bytes:
    """The request body as bytes (b"" when none), held so the call can still be sent.

    A body the sidecar cannot hold (no Content-Length, or larger than the
    replay limit) cannot be inspected, and an uninspected call must not pass
    the service's rules: it is refused.
    """
    if not await make_replayable(call) or not (call.body is None or isinstance(call.body, bytes)):
        raise ProblemError(
            Reason.request_too_large,
            f"Service '{service}' checks every {what} request's body, so the sidecar must hold "
            "it: send it with a Content-Length of at most 1 MiB.",
            service=service,
        )
    return call.body or b""


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # JSON parsers disagree on which of two equal keys wins: the upstream could run
    # another query, or call another tool, than the one the sidecar checked.
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _DuplicateKey(key)
            seen.add(key)
    return found


def parse_json(body: bytes, *, service: str, what: str, extra: Any = None) -> Any:
    """The JSON document of a body; a 400 problem naming the flaw when it is none."""
    try:
        return json.loads(body, object_pairs_hook=_unique_keys)
    except UnicodeDecodeError:
        flaw = "is not UTF-8 text"
    except json.JSONDecodeError as err:
        flaw = f"is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    except _DuplicateKey as err:
        flaw = f"holds the key {str(err)!r} twice in one object"
    except ValueError:
        flaw = "holds a number too long to read"
    except RecursionError:
        flaw = "is nested too deeply"
    raise ProblemError(
        Reason.bad_request,
        f"The {what} request body {flaw}; service '{service}' reads every {what} request.",
        service=service,
        extra=extra,
    )


_SLASHES = re.compile(r"/{2,}")


def endpoint(target: str) -> str:
    """The path of a call's target as an upstream is likely to route it: percent-decoded,
    repeated and trailing slashes dropped. `/%67raphql/` must not dodge a check of `/graphql`."""
    path = target.partition("?")[0]
    return _SLASHES.sub("/", unquote(path)).rstrip("/") or "/"


def bad_request(detail: str, *, service: str, extra: Any = None) -> ProblemError:
    return ProblemError(Reason.bad_request, detail, service=service, extra=extra)
