"""Default headers and query rules, with a fake next: what the upstream would get."""

from __future__ import annotations

from typing import Any

from multidict import CIMultiDict

from sidecar.core.call import Call
from sidecar.core.state import StateStore
from sidecar.policy.loader import ServicePolicy
from sidecar.policy.models import Service
from sidecar.policy.positions import Position
from sidecar.steps.access.request_rules import build


def step_for(**keys: Any) -> Any:
    spec = Service.model_validate({"upstream": "http://127.0.0.1:9", **keys})
    svc = ServicePolicy(name="s", prefix="/s", spec=spec, position=Position("p.yaml", 1, 1))
    return build(svc, state=StateStore().begin())


async def send(step: Any, target: str, headers: dict[str, str] | None = None) -> Call:
    seen: list[Call] = []

    async def upstream(call: Call) -> Any:
        seen.append(call)
        return None

    call = Call(
        service="s",
        method="GET",
        target=target,
        headers=CIMultiDict(headers or {}),
        body=None,
        agent=None,
    )
    await step(call, upstream)
    return seen[0]


def test_no_step_without_rules() -> None:
    assert step_for() is None


async def test_a_default_header_is_added_only_when_the_agent_sent_none() -> None:
    step = step_for(headers={"default": {"anthropic-version": "2023-06-01"}})
    assert (await send(step, "/v1/messages")).headers["anthropic-version"] == "2023-06-01"
    pinned = await send(step, "/v1/messages", {"Anthropic-Version": "2026-10-21"})
    assert pinned.headers.getall("anthropic-version") == ["2026-10-21"]


async def test_query_default_and_set() -> None:
    step = step_for(query={"default": {"api-version": "2024-10-21"}, "set": {"mode": "a b"}})
    assert (await send(step, "/x")).target == "/x?mode=a%20b&api-version=2024-10-21"
    # The agent's own api-version wins; its other parameters stay byte for byte; set replaces.
    call = await send(step, "/x?api-version=2025-01-01&flag&mode=z")
    assert call.target == "/x?api-version=2025-01-01&flag&mode=a%20b"
