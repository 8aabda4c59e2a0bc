"""Per-attempt deadline: the upstream must start answering within `timeout.total`."""

from __future__ import annotations

import asyncio
import sys
from typing import Final

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy

# What asyncio.current_task(loop) reads on CPython 3.11, where that function is
# Python (a frame on every call); from 3.12 it is C, and used as it is.
_CURRENT_TASKS: Final[dict[asyncio.AbstractEventLoop, asyncio.Task[object]] | None] = (
    getattr(asyncio.tasks, "_current_tasks", None) if sys.version_info < (3, 12) else None
)


def _current_task(loop: asyncio.AbstractEventLoop) -> asyncio.Task[object] | None:
    tasks = _CURRENT_TASKS
    if tasks is not None:
        return tasks.get(loop)
    return asyncio.current_task(loop)


# The message of the cancel that ends an attempt at `timeout.total`: code inside the
# attempt (telemetry's attempt span) tells it from an agent hanging up by this.
TIMEOUT_CANCEL: Final = "sidecar: timeout.total"


class Timeout:
    def __init__(self, *, service: str, total: float) -> None:
        self.service = service
        self.total = total
        self._detail = (
            f"The upstream of service '{service}' did not answer within {total:g}s; "
            "try again later or with a smaller request."
        )
        # The attempts in flight, oldest first. Every deadline is its start plus the
        # same `total`, so the first one is always the next to expire: one timer serves
        # them all, instead of a timer made and cancelled on every call.
        self._pending: dict[_Expiry, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        # The loop of the last call: asking asyncio for the running loop costs a getpid()
        # system call on every call (its fork check), a lookup with the loop does not.
        self._loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, call: Call, next: Handler) -> Reply:
        loop = self._loop
        task = _current_task(loop) if loop is not None else None
        if loop is None or task is None:
            # The first call, or a call on another loop than the last one's.
            loop = self._loop = asyncio.get_running_loop()
            task = _current_task(loop)
            if task is None:  # pragma: no cover - steps always run inside a task
                return await next(call)
        expiry = _Expiry(task, loop.time() + self.total)
        pending = self._pending
        pending[expiry] = None
        if self._timer is None:
            self._timer = loop.call_at(expiry.deadline, self._expire, loop)
        try:
            return await next(call)
        except asyncio.CancelledError:
            # Ours only if the deadline passed and nobody else asked for a cancel too
            # (an agent that hung up must still cancel the whole call).
            if expiry.fired and task.uncancel() == 0:
                raise ProblemError(
                    Reason.upstream_timeout, self._detail, service=self.service, cause="timeout"
                ) from None
            raise
        finally:
            if not expiry.fired:  # a fired one was taken out by _expire
                del pending[expiry]

    def _expire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        expired: list[_Expiry] = []
        for expiry in self._pending:
            if expiry.deadline > now:
                self._timer = loop.call_at(expiry.deadline, self._expire, loop)
                break
            expired.append(expiry)
        for expiry in expired:
            del self._pending[expiry]
            expiry.fire()


class _Expiry:
    __slots__ = ("deadline", "fired", "task")

    def __init__(self, task: asyncio.Task[object], deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.fired = False

    def fire(self) -> None:
        self.fired = True
        self.task.cancel(TIMEOUT_CANCEL)


def build(service: ServicePolicy, *, state: StateBuild) -> Timeout:
    return Timeout(service=service.name, total=service.spec.timeout.total)
