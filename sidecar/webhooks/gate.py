"""Who may use the sidecar's own webhook paths on egress: identity, then allow rules.

`/_webhooks/<name>` (publish an outbound event) and `/_events/<name>` (subscribe
to an inbound webhook's events) are calls like any service's: with `agents.keys`
or `agents.verify` set they need a credential (`401 unauthenticated`), and the
allow rules in force (the webhook's own `allow`, else the top-level `allow`)
judge them on their full path, e.g. `/_webhooks/events` (`403 forbidden`). The
same steps do the judging as for services (steps/access/identity.py, steps/access/allow.py),
and the same Credentials serve both, so a key set is fetched once.

A Gate is built with each policy (runtime.py) and swapped with the Router.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..core.call import Call, Reply, StaticReply
from ..engines import identity
from ..policy.access import AllowRule
from ..steps.access.allow import Allow
from ..steps.access.identity import Identify

if TYPE_CHECKING:
    from ..core.state import StateBuild
    from ..http.listener import Request
    from ..policy.loaded import Policy

OUTBOUND = "_webhooks"
EVENTS = "_events"
_PASSED = StaticReply(204)


async def _passed(call: Call) -> Reply:
    return _PASSED


def _allow(label: str, rules: Sequence[AllowRule], source: str) -> Allow | None:
    return Allow(service=label, rules=rules, source=source) if rules else None


class Gate:
    """Identity and allow rules per own path kind and webhook name."""

    def __init__(
        self,
        *,
        agent_header: str,
        credentials: identity.Credentials | None,
        rules: dict[tuple[str, str], tuple[Sequence[AllowRule], str]],
        default: tuple[Sequence[AllowRule], str] | None,
    ) -> None:
        self._agent_header = agent_header.encode("latin-1")
        self._credentials = credentials
        # Compiled once per load: each webhook's own rules, else the top-level ones.
        self._allow = {key: _allow(f"{key[0]}/{key[1]}", *found) for key, found in rules.items()}
        self._default = {
            kind: _allow(kind, *default) if default is not None else None
            for kind in (OUTBOUND, EVENTS)
        }

    async def admit(self, kind: str, name: str, request: Request) -> str | None:
        """The calling agent's name (None: unnamed), or ProblemError (401, 403)."""
        label = f"{kind}/{name}"
        call = Call(
            service=label,
            method=request.method,
            target=request.target,
            raw_headers=list(request.raw_headers),
            body=None,
            agent=request.header(self._agent_header),
        )
        if self._credentials is not None:
            # The service step itself: the same refusals, the credential removed the same way.
            await Identify(service=label, credentials=self._credentials)(call, _passed)
        key = (kind, name)
        allow = self._allow[key] if key in self._allow else self._default.get(kind)
        if allow is not None:
            await allow(call, _passed)
        return call.agent


def build_gate(policy: Policy, state: StateBuild) -> Gate:
    agents = policy.agents
    credentials: identity.Credentials | None = None
    if agents.verify is not None or agents.keys:
        # The key the identity step keeps its Credentials under: one for both.
        credentials = state.get("", "identity", agents, lambda: identity.new(agents))
    rules: dict[tuple[str, str], tuple[Sequence[AllowRule], str]] = {}
    webhooks = policy.webhooks
    if webhooks is not None:
        for name, group in webhooks.outbound.items():
            if group.allow is not None:
                rules[OUTBOUND, name] = (group.allow, f"webhooks.outbound.{name}.allow")
        for name, hook in webhooks.inbound.items():
            if hook.allow is not None:
                rules[EVENTS, name] = (hook.allow, f"webhooks.inbound.{name}.allow")
    default = (policy.allow, "allow") if policy.allow else None
    if webhooks is not None:
        # Named webhooks without rules of their own are judged by the top-level ones,
        # under their own name in the refusal.
        for kind, names in ((OUTBOUND, webhooks.outbound), (EVENTS, webhooks.inbound)):
            for name in names:
                if default is not None:
                    rules.setdefault((kind, name), default)
    return Gate(agent_header=agents.header, credentials=credentials, rules=rules, default=default)
