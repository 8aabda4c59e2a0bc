"""Per-attempt deadline: the upstream must start answering within `timeout.total`."""

from __future__ import annotations

import asyncio

from ..call import Call, Handler, Reply
from ..policy.loader import ServicePolicy
from ..problems import ProblemError
from ..state import StateBuild

# The message of the cancel that ends an attempt at `timeout.total`: code inside the
# attempt (telemetry's attempt span) tells it from an agent hanging up by this.
TIMEOUT_CANCEL = "sidecar: timeout.total"


class Timeout:
    def __init__(self, *, service: str, total: float) -> None:
        self.service = service
        self.total = total
        self._detail = (
            f"The upstream of service '{service}' did not answer within {total:g}s; "
            "try again later or with a smaller request."
        )

    async def __call__(self, call: Call, next: Handler) -> Reply:
        # One timer and one tiny object per call: asyncio.timeout() costs several
        # times that on a path every request takes.
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - steps always run inside a task
            return await next(call)
        loop = task.get_loop()
        expiry = _Expiry(task)
        handle = loop.call_at(loop.time() + self.total, expiry)
        try:
            return await next(call)
        except asyncio.CancelledError:
            # Ours only if the timer fired and nobody else asked for a cancel too
            # (an agent that hung up must still cancel the whole call).
            if expiry.fired and task.uncancel() == 0:
                raise ProblemError(
                    "upstream_timeout", self._detail, service=self.service, cause="timeout"
                ) from None
            raise
        finally:
            handle.cancel()


class _Expiry:
    __slots__ = ("fired", "task")

    def __init__(self, task: asyncio.Task[object]) -> None:
        self.task = task
        self.fired = False

    def __call__(self) -> None:
        self.fired = True
        self.task.cancel(TIMEOUT_CANCEL)


def build(service: ServicePolicy, *, state: StateBuild) -> Timeout:
    return Timeout(service=service.name, total=service.spec.timeout.total)
