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
from typing import Any

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...engines.breaker import CLOSED, Circuit
from ...policy.loaded import ServicePolicy
from ...policy.models import CircuitBreaker
from .outcomes import CountedFailure, Outcomes


class Breaker:
    """The HTTP step over one circuit (engines/breaker.py), which it holds rather than
    extends: mypyc-compiled code crashed calling a compiled subclass's `__call__`
    across modules. The circuit's state is read (and, by tests, set) through it."""

    def __init__(
        self,
        *,
        service: str,
        config: CircuitBreaker,
        clock: Callable[[], float] = time.monotonic,
        on_transition: list[Callable[[str, str, str], None]] | None = None,
    ) -> None:
        self.service = service
        self.circuit = Circuit(
            service=service, config=config, clock=clock, on_transition=on_transition
        )
        outcomes = Outcomes.of(config.on)
        self._causes = outcomes.causes
        self._statuses = outcomes.statuses

    async def __call__(self, call: Call, next: Handler) -> Reply:
        circuit = self.circuit
        if circuit.state != CLOSED:
            generation = circuit.admit()
            if generation < 0:
                raise self._refusal(circuit.wait, probing=circuit.probing)
        else:
            generation = circuit.generation
        try:
            reply = await next(call)
        except ProblemError as err:
            # A wire error not listed in `on` (or the sidecar's own refusal) is no answer
            # from the upstream: it counts neither way.
            circuit.settle(generation, True if err.cause in self._causes else None)
            raise
        except BaseException:
            # Cancelled by the agent or a sidecar bug: says nothing about the upstream.
            circuit.settle(generation, None)
            raise
        circuit.settle(
            generation, reply.status in self._statuses or isinstance(reply, CountedFailure)
        )
        return reply

    @property
    def state(self) -> str:
        return self.circuit.state

    @property
    def total(self) -> int:
        return self.circuit.total

    @property
    def failed(self) -> int:
        return self.circuit.failed

    @property
    def transitions(self) -> dict[str, int]:
        return self.circuit.transitions

    @property
    def on_transition(self) -> list[Callable[[str, str, str], None]]:
        return self.circuit.on_transition

    @property
    def clock(self) -> Callable[[], float]:
        return self.circuit.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.circuit.clock = clock

    @property
    def open_for(self) -> float:
        return self.circuit.open_for

    @open_for.setter
    def open_for(self, seconds: float) -> None:
        self.circuit.open_for = seconds

    def snapshot(self) -> dict[str, Any]:
        """The breaker as the admin /services page shows it."""
        return self.circuit.snapshot()

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
