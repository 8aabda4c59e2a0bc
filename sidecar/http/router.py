"""Compiled routes: a Policy turned into ready-to-call chains, matched by longest prefix.

A Router is immutable once built. Reload builds a whole new one and swaps a
single reference; calls in flight keep the Router (and chain) they started on.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

from ..core import problems
from ..core.call import Body, Call, Field, Handler, Reply, Step
from ..core.headers import HOP_BY_HOP, FieldNames, drop_with_connection_raw
from ..core.state import StateBuild
from ..files import service as files
from ..policy.access import METHOD_OVERRIDE_HEADERS
from ..policy.loaded import Policy, ServicePolicy
from ..steps.credentials import auth
from .redirects import RedirectRewriter
from .upstream import Upstream

if TYPE_CHECKING:
    from .listener import Request

StepBuilder = Callable[..., Step | None]
# Proxy headers that tell the upstream about the agent's side. The agent's own values
# are never forwarded as they came: a service either gets none (the default, so a
# third-party API learns nothing of the pod's addresses) or the sidecar's (`forwarded`).
# RFC 7239 `Forwarded` is never sent: one convention, the one upstreams read most.
_FORWARDING_HEADERS: Final = (
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "via",
    "forwarded",
)
_VIA_11: Final = "1.1 agent-sidecar"
_VIA_10: Final = "1.0 agent-sidecar"


class Route:
    __slots__ = (
        "_set_fields",
        "agent_header",
        "agent_header_raw",
        "dialect",
        "drop",
        "drop_raw",
        "forwarded",
        "handler",
        "idle",
        "max_body",
        "name",
        "prefix",
        "redirects",
        "set_headers",
        "strip",
        "upstream",
    )

    def __init__(
        self,
        *,
        service: ServicePolicy,
        agent_header: str,
        upstream: Upstream,
        handler: Handler,
    ) -> None:
        spec = service.spec
        self.name = service.name
        self.prefix = service.prefix
        self.strip = 0 if service.prefix == "/" else len(service.prefix)
        self.upstream = upstream
        self.handler = handler
        self.agent_header = agent_header
        self.max_body = spec.max_body
        self.idle = spec.timeout.idle
        self.set_headers = tuple(spec.headers.set.items())
        self._set_fields = tuple(Field(name, value) for name, value in self.set_headers)
        self.forwarded = spec.forwarded
        # The error members its agents' SDKs read in the sidecar's refusals (core/problems.py).
        if spec.graphql is not None:
            self.dialect = problems.GRAPHQL
        elif spec.llm is not None or spec.translate is not None:
            self.dialect = problems.LLM
        else:
            self.dialect = problems.PLAIN
        self.redirects = (
            RedirectRewriter(upstream=spec.upstream, prefix=service.prefix)
            if spec.redirects == "rewrite"
            else None
        )
        drop = set(HOP_BY_HOP)
        drop.add("host")
        # The sidecar answers the agent's Expect itself (http/listener.py).
        drop.add("expect")
        drop.add(agent_header.lower())
        drop.update(_FORWARDING_HEADERS)
        drop.update(h.lower() for h in spec.headers.remove)
        drop.update(h.lower() for h in spec.headers.set)
        if not spec.method_override:
            # Frameworks run the method these name, not the one the rules judged.
            drop.update(METHOD_OVERRIDE_HEADERS)
        credential = auth.header_name(service)
        if credential:
            drop.add(credential.lower())
        self.drop = frozenset(drop)
        self.drop_raw = FieldNames(name.encode("latin-1") for name in drop)
        self.agent_header_raw = agent_header.lower().encode("latin-1")

    def prepare(self, request: Request, body: Body) -> Call:
        """The agent's request as the upstream will get it, before any step runs."""
        drop = drop_with_connection_raw(self.drop_raw, request.connection)
        agent_header = self.agent_header_raw
        agent: bytes | None = None
        kept: list[tuple[bytes, bytes]] = []
        for field in request.raw_headers:
            if not drop.has(field[0]):
                kept.append(field)
            elif (
                agent is None
                and len(field[0]) == len(agent_header)
                and field[0].lower() == agent_header
            ):
                agent = field[1]
        call = Call(
            service=self.name,
            method=request.method,
            target=self._target(request.target),
            raw_headers=kept,
            body=body,
            agent=agent.decode("latin-1") if agent is not None else None,
            content_length=request.content_length,
        )
        if self.forwarded:
            _add_forwarding(call.headers, request)
        for extra in self._set_fields:
            call.set_field(extra)
        return call

    def _target(self, raw: str) -> str:
        target = raw[self.strip :]
        if not target or target[0] != "/":
            target = "/" + target
        return target


def _add_forwarding(headers: CIMultiDict[str], request: Request) -> None:
    """X-Forwarded-For/-Proto/-Host and Via as a proxy adds them: the agent's chain
    (X-Forwarded-For, Via) extended by this hop, the rest describing this hop only."""
    incoming = request.headers
    peer = request.peer[0] if request.peer is not None else "unknown"
    chain = ", ".join(incoming.getall("X-Forwarded-For", ()))
    headers["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
    headers["X-Forwarded-Proto"] = "http"  # the egress listener speaks plain HTTP only
    host = incoming.get("Host")
    if host:
        headers["X-Forwarded-Host"] = host
    hop = _VIA_10 if request.version == "1.0" else _VIA_11
    via = ", ".join(incoming.getall("Via", ()))
    headers["Via"] = f"{via}, {hop}" if via else hop


class Router:
    """Longest-prefix match on whole path segments (/git never matches /github)."""

    def __init__(self, routes: Iterable[Route], *, version: str) -> None:
        self.version = version
        self.routes = {r.name: r for r in routes}
        self._by_segment: dict[str, list[Route]] = {}
        self._root: Route | None = None
        for route in sorted(self.routes.values(), key=lambda r: len(r.prefix), reverse=True):
            if route.prefix == "/":
                self._root = route
                continue
            first = route.prefix[1:].split("/", 1)[0]
            self._by_segment.setdefault(first, []).append(route)

    def match(self, path: str) -> Route | None:
        end = path.find("/", 1)
        first = path[1:] if end < 0 else path[1:end]
        q = first.find("?")
        if q >= 0:
            first = first[:q]
        for route in self._by_segment.get(first, ()):
            p = route.prefix
            if path.startswith(p) and (len(path) == len(p) or path[len(p)] in "/?"):
                return route
        return self._root


def _before(change: Callable[[Call], None], next: Handler) -> Handler:

    def handler(call: Call) -> Awaitable[Reply]:
        change(call)
        # The next step's awaitable itself: awaited by the step before this one.
        return next(call)

    return handler


def _link(step: Step, next: Handler) -> Handler:
    # A compiled closure, not functools.partial(step.__call__, next=...): a partial
    # is called through tp_call with a keyword dict, 4% of a call's instructions
    # for the six links of a realistic chain.
    def handler(call: Call) -> Awaitable[Reply]:
        return step(call, next)

    return handler


# The steps of a chain, outermost first, given the routes of the Router being built
# (filled once every route exists: see http/chain.py, which names them in order).
Chain = Callable[[Mapping[str, Route]], Sequence[tuple[str, StepBuilder]]]


def compile_policy(policy: Policy, state: StateBuild, chain: Chain) -> Router:
    """Every service's route, its steps built in the order `chain` gives them."""
    table: dict[str, Route] = {}
    builders = chain(table)
    routes = []
    for service in policy.services.values():
        spec = service.spec
        upstream = state.get(
            service.name,
            "upstream",
            (spec.upstream, spec.timeout.connect),
            lambda s=service: Upstream(  # type: ignore[misc]
                service=s.name,
                upstream=s.spec.upstream,
                connect_timeout=s.spec.timeout.connect,
            ),
        )
        # A files service answers from its directory where others call their upstream.
        handler: Handler = upstream if spec.files is None else files.build(service, state=state)
        for _, builder in reversed(builders):
            step = builder(service, state=state)
            # A `Before` step, found by its method: runtime Protocol checks do not
            # survive compilation (mypyc).
            change = getattr(step, "before", None)
            if change is not None:
                handler = _before(change, handler)
            elif step is not None:
                handler = _link(step, handler)
        routes.append(
            Route(
                service=service,
                agent_header=policy.agents.header,
                upstream=upstream,
                handler=handler,
            )
        )
    router = Router(routes, version=policy.version)
    # Steps that hand a call to another service (fallback) find its route here.
    table.update(router.routes)
    return router
