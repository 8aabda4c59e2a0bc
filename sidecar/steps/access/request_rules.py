"""Query rules and default headers: the parts of a request a policy (often a
template) fills in that the route's own header rules do not cover.

- `query.set`: the parameter replaces any the agent sent under that name.
- `query.default` and `headers.default`: added only when the agent sent none
  of that name, so an SDK that pins its own API version (`anthropic-version`,
  `api-version`, `Notion-Version`) keeps it, and a plain HTTP client gets the
  template's.

Runs once per call, outside retries; nothing is computed per call that the
policy already fixed.
"""

from __future__ import annotations

from urllib.parse import quote, unquote_plus

from ...core.call import Call, Handler, Reply
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from .. import Step


class RequestRules:
    def __init__(
        self,
        *,
        headers: dict[str, str],
        query_set: dict[str, str],
        query_default: dict[str, str],
    ) -> None:
        self._headers = tuple(headers.items())
        self._set = {name: _pair(name, value) for name, value in query_set.items()}
        self._default = {name: _pair(name, value) for name, value in query_default.items()}

    async def __call__(self, call: Call, next: Handler) -> Reply:
        headers = call.headers
        for name, value in self._headers:
            if name not in headers:
                headers[name] = value
        if self._set or self._default:
            call.target = self._query(call.target)
        return await next(call)

    def _query(self, target: str) -> str:
        path, _, query = target.partition("?")
        # The agent's parameters stay byte for byte (`flag` is not `flag=`).
        pairs = [p for p in query.split("&") if p]
        names = {unquote_plus(p.partition("=")[0]) for p in pairs}
        if self._set:
            pairs = [p for p in pairs if unquote_plus(p.partition("=")[0]) not in self._set]
            pairs.extend(self._set.values())
        pairs.extend(pair for name, pair in self._default.items() if name not in names)
        return f"{path}?{'&'.join(pairs)}" if pairs else path


def _pair(name: str, value: str) -> str:
    return f"{quote(name, safe='')}={quote(value, safe='')}"


def build(service: ServicePolicy, *, state: StateBuild) -> Step | None:
    spec = service.spec
    if not (spec.headers.default or spec.query.set or spec.query.default):
        return None
    # A name in both lists is set: `set` is the stronger promise.
    default = {k: v for k, v in spec.query.default.items() if k not in spec.query.set}
    return RequestRules(
        headers=dict(spec.headers.default), query_set=dict(spec.query.set), query_default=default
    )
