"""Per-attempt deadline: the upstream must start answering within `timeout.total`."""

from __future__ import annotations

import asyncio

from ..call import Call, Handler, Reply
from ..policy.loader import ServicePolicy
from ..problems import ProblemError
from ..state import StateBuild


class Timeout:
    def __init__(self, *, service: str, total: float) -> None:
        self.service = service
        self.total = total
        self._detail = (
            f"The upstream of service '{service}' did not answer within {total:g}s; "
            "try again later or with a smaller request."
        )

    async def __call__(self, call: Call, next: Handler) -> Reply:
        try:
            async with asyncio.timeout(self.total):
                return await next(call)
        except TimeoutError:
            raise ProblemError(
                "upstream_timeout", self._detail, service=self.service, cause="timeout"
            ) from None


def build(service: ServicePolicy, *, state: StateBuild) -> Timeout:
    return Timeout(service=service.name, total=service.spec.timeout.total)
