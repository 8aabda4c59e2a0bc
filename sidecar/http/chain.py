"""The HTTP connector's chain of steps, in order: the one place that order is written.

The router compiles whatever chain it is given (Starlette's build_middleware_stack
fixes the outer and inner layers the same way); this module names the steps. Each
step's module has `build(service, *, state) -> Step | None`.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .. import telemetry
from ..core.state import StateBuild
from ..policy.loaded import ServicePolicy
from ..policy.models import Service
from ..steps.access import allow, identity, request_rules, validate
from ..steps.answers import cache
from ..steps.credentials import auth
from ..steps.llm import llm
from ..steps.resilience import breaker, fallback, faults, pause, ratelimit, retry, timeout
from .router import Chain, Route, StepBuilder


def _when(uses: Callable[[Service], bool], module: str) -> StepBuilder:
    """The build of a step only some services use, its module imported by the first that does.

    A sidecar whose services use no GraphQL, MCP, mode other than live, translation or
    object rules never imports those steps (and what they import): `uses` is the first
    test of the module's own build(), which still decides.
    """

    def build(service: ServicePolicy, *, state: StateBuild) -> Any:
        if not uses(service.spec):
            return None
        built: Any = importlib.import_module(module, __package__).build(service, state=state)
        return built

    return build


_objects = _when(lambda spec: spec.objects is not None, "..steps.access.objects")
_graphql = _when(lambda spec: spec.graphql is not None, "..steps.protocols.graphql")
_mcp = _when(lambda spec: spec.mcp is not None, "..steps.protocols.mcp")
_translate = _when(lambda spec: spec.translate is not None, "..steps.llm.translate")
_mock = _when(lambda spec: spec.mode == "mock", "..steps.answers.mock")
_cassette = _when(lambda spec: spec.mode in ("record", "replay"), "..steps.answers.cassette")
_observe = _when(lambda spec: spec.mode == "observe", "..learn.observe")
_graphql_errors = _when(lambda spec: spec.graphql is not None, "..steps.protocols.graphql_errors")


def for_policy(services: Mapping[str, ServicePolicy]) -> Chain:
    """The chain for one policy's services (fallback reads the others' model maps)."""
    return functools.partial(steps, services=services)


# The order of a chain, outermost first: retry(breaker(timeout(auth(forward)))).
# A new step takes its place in this list; the reason for each place is beside it.
def steps(
    routes: Mapping[str, Route], *, services: Mapping[str, ServicePolicy]
) -> list[tuple[str, StepBuilder]]:
    """The HTTP chain for one Router: `routes` is its service table (filled by the router
    once every route exists), for the steps that hand a call to another service."""
    return [
        # Who is calling, then may they: a refused call spends no token, trips no breaker.
        ("identity", identity.build),
        ("allow", allow.build),
        ("request_rules", request_rules.build),
        # Object-store rules: which agent may touch which bucket and key (steps/access/objects.py).
        ("objects", _objects),
        # Then the OpenAPI document: a malformed call is told so whatever the limits say.
        ("validate", validate.build),
        # A call the policy refuses for what it asks (its operation, its tool) is told
        # so, not to wait for a pause or a token.
        ("graphql", _graphql),
        ("mcp", _mcp),
        # Outermost of what serves the call, after every refusal: a call the agent may not
        # make never fails over, and everything the service does to serve it (faults,
        # cache, limits, retries, breaker, credential) is inside, so another service is
        # tried only once this one has given up (steps/resilience/fallback.py).
        (
            "fallback",
            functools.partial(fallback.build, routes=routes, services=services),
        ),
        # Each service translates the calls written for another LLM API, its own agents'
        # and other services' fallback hops alike; outside mock, cassette and cache, which
        # hold the upstream's API, and outside llm, which counts the upstream's own answer.
        ("translate", _translate),
        # Where Envoy has its fault filter, before the router: retries, the breaker and the
        # timeout never hide, repeat or count a fault, so the agent sees the ratio asked
        # for; and a mock answer can be faulted too.
        ("faults", faults.build),
        # mode: mock answers here, after every refusal and before anything that would
        # spend a token or reach the upstream (or its credential).
        ("mock", _mock),
        # mode: replay answers here for the same reasons as mock. mode: record is here too:
        # outside retry, breaker, timeout and auth, it saves the one final answer the agent
        # gets, and sees the call before the credential is injected (steps/answers/cassette.py).
        ("cassette", _cassette),
        # mode: observe writes down the shape of the call and of the one answer the agent
        # gets, as record does, for `sidecar learn` (learn/observe.py).
        ("observe", _observe),
        # A hit is answered before anything that would spend a token, wait for a pause
        # or reach the upstream (or its credential): a hit is free.
        ("cache", cache.build),
        # Before the limiter: a call refused during an upstream's pause spends no token.
        ("pause", pause.build),
        ("ratelimit", ratelimit.build),
        # Outside retry: reads an LLM call's model once and meters the one reply the agent
        # gets; after the limiters, so a refused call costs no body parse (steps/llm/llm.py).
        ("llm", llm.build),
        ("retry", retry.build),
        ("breaker", breaker.build),
        ("timeout", timeout.build),
        # Inside the breaker, which counts the GraphQL errors it finds in a 200 as a failure,
        # and the timeout, which bounds reading that answer; once per attempt.
        ("graphql_errors", _graphql_errors),
        ("auth", auth.build),
        ("telemetry", telemetry.build),
    ]
