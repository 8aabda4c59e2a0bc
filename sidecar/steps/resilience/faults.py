"""`faults:`: a live service that misbehaves on purpose, to see how an agent copes.

For a ratio of the calls (of some agents only, when `agents` says so):
- `delay`: wait before the call is sent (fixed, or uniform between min and max);
- `reset`: the call is not sent and the agent's connection is cut: the agent
  may read a 502 head, never a whole answer;
- `abort`: the call is not sent; the sidecar answers the configured status,
  problem+json with reason `fault_injected`;
- `bandwidth`: the upstream's answer reaches the agent at most this fast;
- `sse`: an SSE answer's connection is cut after N events.

The step sits where Envoy users have the fault filter, in front of
everything that talks to the upstream: after the refusals (identity, allow,
validate, GraphQL and MCP rules), before mocks, the rate limiter, retries, the
breaker, the timeout and the credential. So retries never repeat or hide a
fault and the breaker never counts one (the agent sees the ratio the policy
asks for), an added delay is not counted against `timeout.total`, an aborted
call spends no token, and a mock answer can be faulted like a live one.
Every faulted answer says so in `X-Sidecar-Fault` (the kinds that hit
it, comma-separated); every injection is counted (`sidecar_faults_injected`)
and named on the call's span (`sidecar.fault`). The step is also its state:
`enabled` is switched at runtime by the admin port's `POST /faults` and stays
as switched across reloads that leave the `faults:` block alone.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import AsyncIterable, AsyncIterator, Callable
from fnmatch import fnmatchcase
from typing import Any

from multidict import CIMultiDict, CIMultiDictProxy

from ...core.call import Call, Handler, Reply, ReplyView
from ...core.headers import SERVER
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ...policy.testing import FAULT_KINDS
from ...policy.testing import Faults as FaultsConfig
from ..operation import annotate

FAULT_HEADER = "X-Sidecar-Fault"
# The span attribute naming the faults a call got.
FAULT_ATTRIBUTE = "sidecar.fault"

Hook = list[Callable[[str, str], None]]

# The end of one SSE event: a blank line, in any of the three line endings.
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
# Paced slices are this share of a second's worth of bytes.
_SLICES_PER_SECOND = 20


class InjectedReset(ConnectionResetError):
    """Raised from an answer's body to cut the agent's connection on purpose."""


class Faults:
    def __init__(
        self,
        *,
        service: str,
        config: FaultsConfig,
        injected: Hook,
        rng: random.Random | None = None,
    ) -> None:
        self.service = service
        self.config = config
        self.enabled = config.enabled
        self.counts = dict.fromkeys(FAULT_KINDS, 0)
        self._hooks = injected
        self._random = rng or random.Random(config.seed)
        self._agents = None if config.agents == ["*"] else tuple(config.agents)
        self._delay = config.delay
        self._reset = config.reset
        self._abort = config.abort
        self._bandwidth = config.bandwidth
        self._sse = config.sse

    def switch(self, enabled: bool) -> None:
        self.enabled = enabled

    def snapshot(self) -> dict[str, Any]:
        out: dict[str, Any] = {"enabled": self.enabled}
        out.update(self.config.model_dump(mode="json", exclude_none=True, exclude={"enabled"}))
        out["injected"] = dict(self.counts)
        return out

    def _applies(self, agent: str | None) -> bool:
        if self._agents is None:
            return True
        name = agent or ""
        return any(fnmatchcase(name, glob) for glob in self._agents)

    def _hit(self, ratio: float) -> bool:
        # random() is in [0, 1): a ratio of 1.0 always hits, 0.0 never.
        return self._random.random() < ratio

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        for hook in self._hooks:
            hook(self.service, kind)

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if not self.enabled or not self._applies(call.agent):
            return await next(call)
        kinds: list[str] = []
        delay = self._delay
        if delay is not None and self._hit(delay.ratio):
            if delay.fixed is not None:
                seconds = delay.fixed
            else:
                assert delay.min is not None and delay.max is not None  # the model checks it
                seconds = self._random.uniform(delay.min, delay.max)
            self._injected(call, kinds, "delay")
            await asyncio.sleep(seconds)
        if self._reset is not None and self._hit(self._reset.ratio):
            self._injected(call, kinds, "reset")
            return _Cut(kinds)
        abort = self._abort
        if abort is not None and self._hit(abort.ratio):
            self._injected(call, kinds, "abort")
            raise ProblemError(
                Reason.fault_injected,
                f"The sidecar answered {abort.status} itself because service '{self.service}' "
                "has fault injection on (faults.abort); the upstream was not called. This is "
                "a test of how failures are handled.",
                service=self.service,
                status=abort.status,
                headers={FAULT_HEADER: ",".join(kinds)},
            )
        reply = await next(call)
        if reply.status == 101:
            return reply  # a WebSocket tunnel: the egress needs the upstream's reply itself
        body = reply.body
        bandwidth = self._bandwidth
        if body is not None and bandwidth is not None and self._hit(bandwidth.ratio):
            self._injected(call, kinds, "bandwidth")
            body = _paced(body, bandwidth.per_second)
        sse = self._sse
        if (
            body is not None
            and sse is not None
            and reply.headers.get("Content-Type", "").startswith("text/event-stream")
            and self._hit(sse.ratio)
        ):
            self._injected(call, kinds, "sse")
            body = _cut_events(body, sse.cut_after)
        if not kinds:
            return reply
        return _Faulted(reply, body, kinds)

    def _injected(self, call: Call, kinds: list[str], kind: str) -> None:
        kinds.append(kind)
        self._count(kind)
        annotate(call, {FAULT_ATTRIBUTE: ",".join(kinds)})


class _Faulted(ReplyView):
    """The upstream's answer with its body slowed or cut, and marked as faulted."""

    __slots__ = ()

    def __init__(self, reply: Reply, body: AsyncIterable[bytes] | None, kinds: list[str]):
        headers = CIMultiDict(reply.headers)
        headers[FAULT_HEADER] = ",".join(kinds)
        super().__init__(reply, body=body, headers=CIMultiDictProxy(headers))


class _Cut:
    """An answer whose body ends the agent's connection before its first byte."""

    __slots__ = ("headers",)

    status = 502
    reason = None
    content_length = None

    def __init__(self, kinds: list[str]) -> None:
        self.headers = CIMultiDictProxy(
            CIMultiDict({FAULT_HEADER: ",".join(kinds), "Server": SERVER})
        )

    @property
    def body(self) -> AsyncIterable[bytes]:
        return _reset()

    def release(self) -> None:
        return None


async def _reset() -> AsyncIterator[bytes]:
    raise InjectedReset("faults.reset: the connection is cut on purpose")
    yield b""  # pragma: no cover - makes this a generator


async def _paced(body: AsyncIterable[bytes], per_second: int) -> AsyncIterator[bytes]:
    # Each slice waits until the time the bytes before it would take at this rate,
    # so a slow upstream does not earn the answer a burst later.
    loop = asyncio.get_running_loop()
    piece = max(1, per_second // _SLICES_PER_SECOND)
    start = loop.time()
    sent = 0
    async for data in body:
        for i in range(0, len(data), piece):
            part = data[i : i + piece]
            wait = start + sent / per_second - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            sent += len(part)
            yield part


async def _cut_events(body: AsyncIterable[bytes], after: int) -> AsyncIterator[bytes]:
    if after == 0:
        raise InjectedReset("faults.sse: the stream is cut on purpose")
    seen = 0
    tail = b""  # the end of what was passed on: an event's blank line may span two chunks
    async for data in body:
        window = tail + data
        for found in _EVENT_END.finditer(window):
            end = found.end()
            if end <= len(tail):
                continue  # counted with the chunk before
            seen += 1
            if seen >= after:
                yield data[: end - len(tail)]
                raise InjectedReset("faults.sse: the stream is cut on purpose")
        yield data
        tail = window[-3:]


def build(service: ServicePolicy, *, state: StateBuild) -> Faults | None:
    config = service.spec.faults
    if config is None:
        return None
    return state.get(
        service.name,
        "faults",
        config,
        lambda: Faults(service=service.name, config=config, injected=state.hooks.fault_injected),
    )
