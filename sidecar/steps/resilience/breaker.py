"""Circuit breaker, one per service: stop calling an upstream that keeps failing.

The state machine is the engine's (engines/breaker.py); this step says what a
failure is over HTTP and how a refusal reads. A failure is a wire error
(`connect-error`, `timeout`, `reset`), an upstream status listed in `on`, or an
answer a step inside marked as failed (`CountedFailure`: a GraphQL 200 with errors,
`graphql.count_errors`); a 4xx is the caller's fault and never counts.

The breaker object is also its own state: it lives in the state store keyed by
its CircuitBreaker parameters, so a reload that leaves them alone keeps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...engines.breaker import CLOSED, Circuit, CircuitOpen
from ...policy.loader import ServicePolicy
from ...policy.models import CircuitBreaker
from .outcomes import CountedFailure, Outcomes


class Breaker(Circuit):
    def __init__(
        self,
        *,
        service: str,
        config: CircuitBreaker,
        clock: Callable[[], float] = time.monotonic,
        on_transition: list[Callable[[str, str, str], None]] | None = None,
    ) -> None:
        super().__init__(service=service, config=config, clock=clock, on_transition=on_transition)
        outcomes = Outcomes.of(config.on)
        self._causes = outcomes.causes
        self._statuses = outcomes.statuses

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if self.state != CLOSED:
            try:
                generation = self._admit()
            except CircuitOpen as exc:
                raise self._refusal(exc.wait, probing=exc.probing) from None
        else:
            generation = self._generation
        try:
            reply = await next(call)
        except ProblemError as err:
            # A wire error not listed in `on` (or the sidecar's own refusal) is no answer
            # from the upstream: it counts neither way.
            self._settle(generation, True if err.cause in self._causes else None)
            raise
        except BaseException:
            # Cancelled by the agent or a sidecar bug: says nothing about the upstream.
            self._settle(generation, None)
            raise
        self._settle(
            generation, reply.status in self._statuses or isinstance(reply, CountedFailure)
        )
        return reply

    def _refusal(self, wait: float, *, probing: bool) -> ProblemError:
        if probing:
            detail = (
                f"Service '{self.service}' has been failing and the sidecar is testing whether "
                f"it recovered; retry in about {wait:.0f} second(s)."
            )
        else:
            detail = (
                f"Service '{self.service}' has been failing, so the sidecar stopped calling it "
                f"for now; retry in {max(1, int(wait + 0.999))} second(s)."
            )
        return ProblemError(Reason.circuit_open, detail, service=self.service, retry_after=wait)


def build(service: ServicePolicy, *, state: StateBuild) -> Breaker | None:
    config = service.spec.circuit_breaker
    if config is None:
        return None
    return state.get(
        service.name,
        "breaker",
        config,
        lambda: Breaker(
            service=service.name,
            config=config,
            on_transition=state.hooks.breaker_transition,
        ),
    )
