"""What a load makes of a policy directory: the Policy, its ServicePolicy entries, and
the PolicyError that says where and why it could not (policy/loader.py reads them)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import openapi
from .access import AllowRule
from .alerts import Admin, Alerts
from .databases import Database
from .models import Agents, Service
from .positions import Position, Problem
from .webhooks import Webhooks


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """A service as the router needs it: its name, resolved prefix and where it was written."""

    name: str
    prefix: str
    spec: Service
    position: Position
    agents: Agents = field(default_factory=Agents)
    # The allow rules in force: the service's own, else the top-level ones; none = everyone.
    allow: tuple[AllowRule, ...] = ()
    allow_from: str = ""  # where those rules are written: "services.<name>.allow" or "allow"
    # The compiled `openapi:` document, when the service names one (and it could be read).
    openapi: openapi.Spec | None = None


@dataclass(frozen=True, slots=True)
class Policy:
    agents: Agents
    services: Mapping[str, ServicePolicy]
    files: tuple[str, ...]
    version: str  # hash of the files' text and resolved secrets: equal means nothing changed
    secret_files: frozenset[str] = field(default_factory=frozenset)
    webhooks: Webhooks | None = None  # every file's `webhooks:` merged; None when none has one
    allow: tuple[AllowRule, ...] | None = None  # the top-level rules; None when no file has any
    admin: Admin | None = None  # `admin:`, from the one file that has it
    alerts: Alerts | None = None  # `alerts:`, from the one file that has it
    # Every file's `databases:` merged; empty when none has one.
    databases: Mapping[str, Database] = field(default_factory=dict)
    # The agents, allow rules and services as the admin API shows them (described.py).
    described: Mapping[str, Any] = field(default_factory=dict)


class PolicyError(Exception):
    """The policy directory cannot be used; `problems` says exactly where and why."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))
