"""What the admin API shows of a policy, as JSON-ready data, made by the loader.

Dumping a model builds its serializer (pydantic's schema machinery, megabytes): done
where the policy is validated (the loading child, policy/child.py), so the serving
process only hands the result out. Secrets dump as their mask, as everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .access import AllowRule
from .loaded import ServicePolicy
from .models import Agents


def describe(
    agents: Agents, allow: Sequence[AllowRule] | None, services: Mapping[str, ServicePolicy]
) -> dict[str, Any]:
    return {
        "agents": agents.model_dump(mode="json"),
        "allow": None if allow is None else [_rule(r) for r in allow],
        "services": {
            name: {
                "spec": {"prefix": s.prefix, **s.spec.model_dump(mode="json", exclude_none=True)},
                "rate_limit": [r.model_dump(mode="json") for r in s.spec.rate_limit],
                "allow": [_rule(r) for r in s.allow],
            }
            for name, s in services.items()
        },
    }


def _rule(rule: AllowRule) -> Any:
    return rule.model_dump(mode="json", exclude_defaults=True)
