"""The document `GET /api/console` answers: what the console page shows, for scripts too.

Built when asked (the page polls every few seconds) from the figures telemetry
keeps and the live state objects; docs/console.md describes every field. It
never holds a body, a header value, a query string or a secret: webhook URLs
show their origin only, the policy as its version and files.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ..alerts.engine import budget_rows, engine_of
from ..telemetry.figures import RATE_WINDOW, SLOW_WINDOW, ServiceCounts

if TYPE_CHECKING:
    from ..runtime import Sidecar


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _ints(counts: dict[str, float]) -> dict[str, int]:
    return {k: int(v) for k, v in sorted(counts.items()) if v}


def _children(counter: Any) -> dict[tuple[str, ...], float]:
    # The bound children only: `labels()` would mint new (zero) series in /metrics.
    return {tuple(k): float(c._value.get()) for k, c in list(counter._metrics.items())}


def services(sidecar: Sidecar) -> list[dict[str, Any]]:
    samples = sidecar.samples
    now, current = samples.now()
    minute = samples.before(now - RATE_WINDOW)
    slow = samples.before(now - SLOW_WINDOW)
    metrics = sidecar.telemetry.metrics
    cache = _children(metrics.cache_requests)
    policy = sidecar.policy
    out: list[dict[str, Any]] = []
    names = list(policy.services) if policy is not None else []
    if "" in current and current[""].calls:
        names.append("")  # calls no service matched
    for name in names:
        counts = current.get(name) or ServiceCounts()
        entry: dict[str, Any] = {"name": name or None}
        if name:
            spec = policy.services[name] if policy is not None else None
            entry["prefix"] = spec.prefix if spec else None
            entry["mode"] = spec.spec.mode if spec else None
        entry["calls"] = int(counts.calls)
        entry["ok"] = int(counts.ok)
        entry["refusals"] = _ints(counts.refusals)
        entry["upstream_errors"] = _ints(counts.upstream_errors)
        per_minute = None
        if minute is not None and now - minute[0] >= 1.0:
            older = minute[1].get(name)
            per_minute = (counts.calls - (older.calls if older else 0.0)) * 60 / (now - minute[0])
        entry["calls_per_min"] = _round(per_minute, 2)
        window = counts.minus(slow[1].get(name) if slow is not None else None)
        entry["window_seconds"] = round(now - slow[0], 1) if slow is not None else None
        entry["window_calls"] = int(window.calls)
        entry["success_rate"] = _round(window.ok / window.calls) if window.calls else None
        entry["p50_ms"] = _ms(window.quantile(0.5))
        entry["p95_ms"] = _ms(window.quantile(0.95))
        entry["p99_ms"] = _ms(window.quantile(0.99))
        entry["breaker"] = None
        entry["paused"] = None
        entry["cache"] = None
        if name:
            for breaker in sidecar.state.find(name, "breaker"):
                snap = breaker.snapshot()
                entry["breaker"] = {
                    "state": snap["state"],
                    "half_open_in_seconds": snap["half_open_in_seconds"],
                    "failures": snap["failures"],
                    "requests": snap["requests"],
                }
            for pause in sidecar.state.find(name, "pause"):
                refusal = pause.paused()
                if refusal is not None:
                    entry["paused"] = {
                        "reason": refusal.reason,
                        "seconds_left": round(refusal.retry_after or 0.0, 1),
                    }
            hits = {r: v for (s, r), v in cache.items() if s == name}
            if hits:
                looked = sum(v for r, v in hits.items() if r != "bypass")
                entry["cache"] = {
                    "hits": int(hits.get("hit", 0.0)),
                    "lookups": int(looked),
                    "hit_ratio": _round(hits.get("hit", 0.0) / looked) if looked else None,
                }
        entry["spark"] = samples.series(name)
        out.append(entry)
    return out


def agents(sidecar: Sidecar) -> list[dict[str, Any]]:
    metrics = sidecar.telemetry.metrics
    tally = dict(metrics.agents.counts)
    tokens = _children(metrics.llm_tokens)  # (service, agent, model, kind) -> tokens
    policy = sidecar.policy
    pricing: dict[str, Any] = {}
    if policy is not None:
        from ..steps.llm.budget import Pricing

        pricing = {n: Pricing(s.spec.prices) for n, s in policy.services.items() if s.spec.prices}
    models: dict[str, dict[tuple[str, str], dict[str, float]]] = {}
    for (service, agent, model, kind), value in tokens.items():
        row = models.setdefault(agent, {}).setdefault(
            (service, model), {"input": 0.0, "output": 0.0}
        )
        row[kind] = row.get(kind, 0.0) + value
    budgets: dict[str, list[dict[str, Any]]] = {}
    shared: list[dict[str, Any]] = []
    for budget in budget_rows(sidecar):
        agent_of = budget["agent"]
        (budgets.setdefault(agent_of, []) if agent_of else shared).append(budget)
    out: list[dict[str, Any]] = []
    for agent in sorted(set(tally) | set(models) | set(budgets)):
        calls, refusals = tally.get(agent, [0, 0])
        by_model = []
        for (service, model), kinds in sorted(models.get(agent, {}).items()):
            price = pricing.get(service)
            cost = price.cost(model, int(kinds["input"]), int(kinds["output"])) if price else None
            by_model.append(
                {
                    "service": service,
                    "model": model,
                    "input_tokens": int(kinds["input"]),
                    "output_tokens": int(kinds["output"]),
                    "cost": _round(cost, 6),
                }
            )
        out.append(
            {
                "agent": agent,
                "calls": calls,
                "refusals": refusals,
                "models": by_model,
                "budgets": [_budget(b) for b in budgets.get(agent, [])],
            }
        )
    if shared:
        out.append(
            {
                "agent": None,  # budgets of all agents together
                "calls": None,
                "refusals": None,
                "models": [],
                "budgets": [_budget(b) for b in shared],
            }
        )
    return out


def _budget(row: dict[str, Any]) -> dict[str, Any]:
    return {
        k: row[k]
        for k in ("service", "budget", "unit", "limit", "spent", "used_percent", "resets_at")
    }


async def webhooks(sidecar: Sidecar) -> dict[str, Any] | None:
    store = sidecar.webhooks.store
    if store is None:
        return None
    overview = await store.overview()
    endpoints = [
        {
            "direction": str(e.direction),
            "webhook": e.source,
            "endpoint": e.endpoint,
            "depth": e.depth,
            "oldest_pending_seconds": _round(e.oldest_pending_age, 1),
            "delivered": e.successes,
            "failed_attempts": e.failures,
            "dead": e.dead,
            "disabled": e.disabled,
        }
        for e in overview.endpoints
    ]
    letters = await store.dead_letters()  # None: the Redis queue keeps no index of them
    dead = (
        None
        if letters is None
        else [
            {
                "message_id": d.message_id,
                "direction": str(d.direction),
                "webhook": d.source,
                "endpoint": d.endpoint,
                "event_type": d.event_type,
                "created": d.created,
                "last_error": d.last_error,
            }
            for d in letters
        ]
    )
    return {"endpoints": endpoints, "unrouted": dict(overview.unrouted), "dead_letters": dead}


def policy_view(sidecar: Sidecar) -> dict[str, Any]:
    policy = sidecar.policy
    last = sidecar.last_reload
    return {
        "version": policy.version if policy is not None else None,
        "files": list(policy.files) if policy is not None else [],
        "reloads": {"succeeded": sidecar.counts.succeeded, "failed": sidecar.counts.failed},
        # Its errors are FILE:LINE:COL: message, as `sidecar validate` prints them.
        "last_reload": last.as_dict() if last is not None else None,
    }


async def document(sidecar: Sidecar) -> dict[str, Any]:
    telemetry = sidecar.telemetry
    engine = engine_of(sidecar)
    return {
        "generated_at": time.time(),
        "sample_every_seconds": sidecar.samples.every,
        "policy": policy_view(sidecar),
        "services": services(sidecar),
        "agents": agents(sidecar),
        "webhooks": await webhooks(sidecar),
        "pools": [p.as_dict() for p in telemetry.pools.snapshot()],
        "alerts": [a.as_dict() for a in engine.active()] if engine is not None else [],
        "problems": {"total": telemetry.problems.total, "recent": telemetry.problems.rows()},
    }
