"""Fallbacks (`fallback: [service, ...]`): a call the service cannot serve goes to the next.

The outermost service step after the refusals: a call the agent may not make, or
that is malformed, is told so and never fails over. Everything the service does
to serve a call (cache, pause, limits, retries, breaker, credential) is inside,
so a fallback hop runs only once the service has given up, and runs the other
service's own whole chain: its identity/allow rules, credential, limits, breaker.

A hop happens on the sidecar's own refusals that say "this upstream, not this
call" (breaker open, unreachable, timed out, limited) and on a 429/5xx answer
the retries could not better. A Reply with any other status is final: it goes
to the agent as is, so no hop ever happens after answer bytes reached it.

MCP sessions stick to the upstream that made them: a session lives in one
server's memory, and another server answers its id with 404. A call carrying
`Mcp-Session-Id` never hops. If a fallback service issued that id (its answer
to an `initialize` that hopped to it carried the header), the call goes
straight to that service, whatever the state of this one; otherwise it is
this service's session, and the call gets this service's answer or refusal
(a `503 circuit_open`, say), so the agent starts a new session rather than
carrying its id to a server that never saw it. The ids fallbacks issued are
remembered per service (the newest MAX_SESSIONS; a reload that keeps the
fallback list keeps them) and forgotten after their DELETE.
"""

from __future__ import annotations

import contextvars
import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from ...core.call import Body, Call, Handler, Reply, ReplyView, make_replayable
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ..operation import annotate


class Route(Protocol):
    """What a hop needs of another service's route (the HTTP router's Route is one)."""

    @property
    def name(self) -> str: ...

    @property
    def handler(self) -> Handler: ...

    @property
    def set_headers(self) -> tuple[tuple[str, str], ...]: ...

    @property
    def drop(self) -> frozenset[str]: ...


SERVED_BY = "X-Sidecar-Served-By"
SESSION_HEADER = "Mcp-Session-Id"
# MCP session ids issued by fallback services, remembered per service.
MAX_SESSIONS = 10_000

# The sidecar's refusals that blame the upstream (or its limit), not the call.
FALLBACK_REASONS = frozenset(
    {
        Reason.circuit_open,
        Reason.upstream_unreachable,
        Reason.upstream_timeout,
        Reason.rate_limited,
        Reason.budget_exhausted,
    }
)

# Set while a hop runs: the other service's own fallback step passes it through,
# so the list written on the first service alone decides where a call goes.
_hopping: contextvars.ContextVar[bool] = contextvars.ContextVar("fallback_hop", default=False)


def _failed(reply: Reply) -> bool:
    return reply.status == 429 or reply.status >= 500


class ServedBy(ReplyView):
    """A fallback's reply with the header that tells the agent who answered."""

    __slots__ = ()

    def __init__(self, reply: Reply, service: str) -> None:
        headers = CIMultiDict(reply.headers)
        headers[SERVED_BY] = service
        super().__init__(reply, headers=CIMultiDictProxy(headers))


class Sessions:
    """Which fallback service issued an MCP session id; the oldest forgotten first."""

    def __init__(self, limit: int = MAX_SESSIONS) -> None:
        self.limit = limit
        self._owners: OrderedDict[str, str] = OrderedDict()

    def remember(self, session: str, service: str) -> None:
        self._owners[session] = service
        self._owners.move_to_end(session)
        if len(self._owners) > self.limit:
            self._owners.popitem(last=False)

    def owner(self, session: str) -> str | None:
        return self._owners.get(session)

    def forget(self, session: str) -> None:
        self._owners.pop(session, None)


class Fallback:
    def __init__(
        self,
        *,
        service: str,
        chain: tuple[str, ...],
        routes: Mapping[str, Route],
        models: Mapping[str, Mapping[str, str]],
        sessions: Sessions | None = None,
    ):
        self.service = service
        self.chain = chain
        self._routes = routes
        self._models = models
        self.sessions = sessions if sessions is not None else Sessions()

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if _hopping.get():
            return await next(call)
        session = call.headers.get(SESSION_HEADER)
        if session is not None:
            owner = self.sessions.owner(session)
            route = self._routes.get(owner) if owner is not None else None
            if route is None:
                # This service's own session (or one of a service a reload removed, which
                # this upstream answers 404: the agent starts a new session).
                return await next(call)
            return await self._to_owner(call, route, session)
        if not await make_replayable(call):
            # A body read only once cannot be sent to a second service.
            return await next(call)
        # As the call stands before this service's credential is added: a hop must
        # never carry one service's secret to another's upstream.
        headers = call.headers.copy()
        method, target, body = call.method, call.target, call.body
        try:
            reply = await next(call)
        except ProblemError as err:
            if err.reason not in FALLBACK_REASONS:
                raise
            failure: ProblemError | Reply = err
        else:
            if not _failed(reply):
                return reply
            failure = reply
        primary = self._routes.get(self.service)
        for i, name in enumerate(self.chain):
            last = i == len(self.chain) - 1
            route = self._routes.get(name)
            if route is None:
                break
            if not isinstance(failure, ProblemError):
                await _release(failure)
            hop = Call(
                service=name,
                method=method,
                target=target,
                headers=_rehead(headers, primary, route),
                body=_remodel(body, self._models.get(name)),
                agent=call.agent,
            )
            hop.exchange = call.exchange
            annotate(call, {"sidecar.fallback.from": self.service, "sidecar.fallback.to": name})
            token = _hopping.set(True)
            try:
                reply = await route.handler(hop)
            except ProblemError as err:
                if last or err.reason not in FALLBACK_REASONS:
                    raise
                failure = err
                continue
            finally:
                _hopping.reset(token)
            if last or not _failed(reply):
                annotate(call, {"sidecar.served_by": name})
                issued = reply.headers.get(SESSION_HEADER)
                if issued is not None:
                    self.sessions.remember(issued, name)
                return ServedBy(reply, name)
            failure = reply
        if isinstance(failure, ProblemError):
            raise failure
        return failure

    async def _to_owner(self, call: Call, route: Route, session: str) -> Reply:
        """A call of a session a fallback service issued: to that service, and no other."""
        owner = route.name
        hop = Call(
            service=owner,
            method=call.method,
            target=call.target,
            headers=_rehead(call.headers, self._routes.get(self.service), route),
            body=_remodel(call.body, self._models.get(owner)),
            agent=call.agent,
            content_length=call.content_length,
        )
        hop.exchange = call.exchange
        annotate(call, {"sidecar.fallback.from": self.service, "sidecar.served_by": owner})
        token = _hopping.set(True)
        try:
            reply = await route.handler(hop)
        finally:
            _hopping.reset(token)
        if call.method == "DELETE" and reply.status < 300:
            self.sessions.forget(session)
        return ServedBy(reply, owner)


def _rehead(headers: CIMultiDict[str], primary: Route | None, route: Route) -> CIMultiDict[str]:
    """The headers as the other service's route would have prepared them."""
    own = {n.lower() for n, _ in primary.set_headers} if primary is not None else set()
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        lower = name.lower()
        if lower not in route.drop and lower not in own:
            out.add(name, value)
    for name, value in route.set_headers:
        out[name] = value
    return out


def _remodel(body: Body, models: Mapping[str, str] | None) -> Body:
    """The body with its JSON "model" renamed by the other service's model_map.

    Only the name: both APIs must speak the same wire format. A body that is not
    a JSON object naming a mapped model goes as it came.
    """
    if not models or not isinstance(body, bytes):
        return body
    try:
        document = json.loads(body)
    except ValueError:
        return body
    if not isinstance(document, dict):
        return body
    model = document.get("model")
    if not isinstance(model, str) or model not in models:
        return body
    document["model"] = models[model]
    return json.dumps(document).encode()


async def _release(reply: Reply) -> None:
    result = reply.release()
    if hasattr(result, "__await__"):
        await result


def build(
    service: ServicePolicy,
    *,
    state: StateBuild,
    routes: Mapping[str, Route],
    services: Mapping[str, ServicePolicy],
) -> Fallback | None:
    """`routes`: the routes of the Router being built, by service, filled by the router
    once every route exists (a hop needs the handlers of services compiled after its
    own); `services`: the policy's, for the model_map of each service a hop goes to."""
    if not service.spec.fallback:
        return None
    chain = tuple(service.spec.fallback)
    models = {
        name: dict(other.spec.model_map) for name, other in services.items() if other.spec.model_map
    }
    return Fallback(
        service=service.name,
        chain=chain,
        routes=routes,
        models=models,
        sessions=state.get(service.name, "mcp-sessions", chain, Sessions),
    )
