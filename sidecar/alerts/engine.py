"""Alert rules evaluated on a timer, with Alertmanager's semantics.

Each (rule, subject) is an alert: inactive, pending (the condition holds, for
less than `for:`), or firing. Firing sends one notification, then another
every `repeat:` while it holds; the first evaluation where it no longer holds
sends one `resolved` and forgets the alert. A flapping condition therefore
sends at most one firing and one resolved per `for:` period, never a storm.

Notifications are stored in the durable webhook queue (one source per
receiver, `_alerts.<receiver>`, a name no policy webhook can have) before the
engine moves on, so a crash between firing and delivery loses nothing: the
delivery worker sends them after the restart.
"""

from __future__ import annotations

import fnmatch
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..policy.alerts import Alerts, Receiver, Rule
from ..telemetry.figures import ServiceCounts, read_services
from .formats import Notification, body

if TYPE_CHECKING:
    from ..policy.loaded import Policy
    from ..runtime import Sidecar
    from ..webhooks.delivery import DeliverySettings, SettingsKey

log = logging.getLogger("sidecar.alerts")

SOURCE_PREFIX = "_alerts."
Clock = Callable[[], float]


def source_of(receiver: str) -> str:
    return SOURCE_PREFIX + receiver


def delivery_settings(alerts: Alerts | None) -> dict[SettingsKey, DeliverySettings]:
    """The webhook worker's settings for each receiver: its URL, retries, signer."""
    if alerts is None or not alerts.receivers:
        return {}
    from ..webhooks.delivery import DeliverySettings
    from ..webhooks.queue import Direction
    from ..webhooks.signatures import Signer

    out: dict[SettingsKey, DeliverySettings] = {}
    for name, receiver in alerts.receivers.items():
        out[Direction.outbound, source_of(name)] = DeliverySettings(
            tuple(receiver.retry.schedule),
            receiver.retry.jitter,
            receiver.timeout,
            signer=Signer(receiver.signing) if receiver.signing is not None else None,
            urls={name: receiver.url.reveal()},
            public_only=frozenset() if receiver.allow_private else frozenset({name}),
        )
    return out


@dataclass(slots=True)
class Alert:
    rule: Rule
    subject: str
    since: float  # when the condition started to hold
    summary: str
    firing: bool = False
    fired_at: float = 0.0
    last_sent: float = 0.0
    seen: bool = True  # held at the current evaluation

    @property
    def state(self) -> str:
        return "firing" if self.firing else "pending"

    def as_dict(self) -> dict[str, Any]:
        return {
            "alertname": self.rule.name,
            "kind": self.rule.kind,
            "state": self.state,
            "severity": self.rule.severity,
            "subject": self.subject,
            "summary": self.summary,
            "since": self.since,
            "fired_at": self.fired_at if self.firing else None,
        }


# What a rule sees this evaluation: subject -> summary of each one where it holds.
Holding = dict[str, str]


def _wanted(rule: Rule, subject: str) -> bool:
    return any(fnmatch.fnmatchcase(subject, glob) for glob in rule.services)


class AlertEngine:
    """The alert rules of one sidecar: a `Monitor` (runtime.py) that app.py's `compose`
    adds to it; `engine_of(sidecar)` finds it again."""

    def __init__(self, sidecar: Sidecar, *, clock: Clock = time.time) -> None:
        self._sidecar = sidecar
        self._clock = clock
        self.alerts: Alerts | None = None
        self._active: dict[tuple[str, str], Alert] = {}
        # Readings of the services' totals for the windowed rules (error ratio, p99).
        self._history: deque[tuple[float, dict[str, ServiceCounts]]] = deque()
        self.sent = 0  # notifications stored, since start
        self.evaluations = 0

    @property
    def every(self) -> float:
        return self.alerts.evaluate_every if self.alerts is not None else 10.0

    def webhook_settings(self, policy: Policy) -> dict[SettingsKey, DeliverySettings]:
        return delivery_settings(policy.alerts)

    def policy_changed(self, policy: Policy) -> None:
        self.configure(policy.alerts)

    def configure(self, alerts: Alerts | None) -> None:
        """A reload's rules; alerts of a rule whose definition is unchanged keep their state."""
        self.alerts = alerts
        rules = {r.name: r for r in alerts.rules} if alerts is not None else {}
        for key, alert in list(self._active.items()):
            if rules.get(alert.rule.name) != alert.rule:
                del self._active[key]

    def active(self) -> list[Alert]:
        # list() first: one step under the GIL, as the OTLP exporter's thread reads this too.
        return sorted(list(self._active.values()), key=lambda a: (a.rule.name, a.subject))

    def gauge_rows(self) -> Iterable[tuple[str, str, str, str]]:
        return [(a.rule.name, a.state, a.subject, a.rule.severity) for a in self.active()]

    async def evaluate(self) -> None:
        alerts = self.alerts
        if alerts is None or not alerts.rules:
            return
        now = self._clock()
        self._remember(now, alerts.rules)
        queue = await self._queue_rows(alerts.rules)
        for rule in alerts.rules:
            try:
                holding = self._holding(rule, now, queue)
            except Exception:
                log.exception("alert rule %s could not be evaluated", rule.name)
                continue
            await self._step(rule, holding, now)
        self.evaluations += 1

    # -- conditions -------------------------------------------------------------------

    def _remember(self, now: float, rules: list[Rule]) -> None:
        windows = [r.window for r in rules if r.kind in ("error_ratio", "p99")]
        if not windows:
            self._history.clear()
            return
        self._history.append((now, read_services(self._sidecar.telemetry.metrics)))
        keep = max(windows) + 2 * self.every
        while self._history and self._history[0][0] < now - keep:
            self._history.popleft()

    def _window(self, window: float, now: float) -> dict[str, ServiceCounts]:
        latest = self._history[-1][1]
        base: dict[str, ServiceCounts] | None = None
        for at, reading in self._history:
            if at <= now - window:
                base = reading
        if base is None:
            # Younger than the window: since the first reading, as Prometheus does.
            base = self._history[0][1] if len(self._history) > 1 else None
        return {name: c.minus(base.get(name) if base else None) for name, c in latest.items()}

    async def _queue_rows(self, rules: list[Rule]) -> list[Any]:
        if not any(r.kind in ("dead_letters", "queue_age") for r in rules):
            return []
        store = self._sidecar.webhooks.store
        if store is None:
            return []
        try:
            overview = await store.overview()
        except Exception as exc:
            log.warning("alerts: cannot read the webhook queue: %s", type(exc).__name__)
            return []
        # The alerts' own queues are left out: an alert about them could not be sent anyway.
        return [e for e in overview.endpoints if not e.source.startswith(SOURCE_PREFIX)]

    def _holding(self, rule: Rule, now: float, queue: list[Any]) -> Holding:
        sidecar = self._sidecar
        policy = sidecar.policy
        services = list(policy.services) if policy is not None else []
        out: Holding = {}
        kind = rule.kind
        if kind == "breaker_open":
            for name in services:
                for breaker in sidecar.state.find(name, "breaker"):
                    state = breaker.snapshot()["state"]
                    if state != "closed" and _wanted(rule, name):
                        out[name] = f"the circuit breaker of service {name} is {state}"
        elif kind in ("error_ratio", "p99"):
            if not self._history:
                return out
            for name, delta in self._window(rule.window, now).items():
                if name not in services or not _wanted(rule, name) or delta.calls < rule.min_calls:
                    continue
                if kind == "error_ratio" and rule.ratio is not None:
                    ratio = delta.errors / delta.calls
                    if ratio > rule.ratio:
                        out[name] = (
                            f"{ratio:.0%} of the calls to service {name} failed over the last "
                            f"{rule.window:g}s (over {rule.ratio:.0%})"
                        )
                elif kind == "p99" and rule.latency is not None:
                    p99 = delta.quantile(0.99)
                    if p99 is not None and p99 > rule.latency:
                        out[name] = (
                            f"p99 latency of service {name} is {p99 * 1000:.0f} ms over the "
                            f"last {rule.window:g}s (over {rule.latency * 1000:.0f} ms)"
                        )
        elif kind == "budget_used" and rule.percent is not None:
            for row in budget_rows(sidecar):
                subject = f"{row['service']}/{row['budget']}"
                if row.get("agent"):
                    subject += f"/{row['agent']}"
                used = row.get("used_percent")
                if used is not None and used >= rule.percent and _wanted(rule, row["service"]):
                    out[subject] = (
                        f"budget '{row['budget']}' of service {row['service']}"
                        + (f" for agent {row['agent']}" if row.get("agent") else "")
                        + f" is {used:.0f}% used; it resets at {row['resets_at']}"
                    )
        elif kind == "dead_letters":
            for e in queue:
                subject = f"{e.source}/{e.endpoint}"
                if e.dead > 0 and _wanted(rule, subject):
                    out[subject] = f"{e.dead} dead deliveries to webhook endpoint {subject}"
        elif kind == "queue_age" and rule.age is not None:
            for e in queue:
                subject = f"{e.source}/{e.endpoint}"
                age = e.oldest_pending_age
                if age is not None and age > rule.age and _wanted(rule, subject):
                    out[subject] = (
                        f"the oldest pending delivery to {subject} is {age:.0f}s old "
                        f"({e.depth} waiting)"
                    )
        elif kind == "reload_failed":
            last = sidecar.last_reload
            if last is not None and not last.ok:
                first = last.errors[0] if last.errors else "no detail"
                out[""] = f"the last policy reload failed: {first}"
        elif kind == "pool_saturated" and rule.percent is not None:
            for pool in sidecar.telemetry.pools.snapshot():
                used = pool.saturation * 100
                if used >= rule.percent and _wanted(rule, pool.name):
                    out[pool.name] = (
                        f"{pool.kind} pool {pool.name} has {pool.in_use} of {pool.max} "
                        f"connections in use, {pool.waiting} callers waiting"
                    )
        return out

    # -- state ------------------------------------------------------------------------

    async def _step(self, rule: Rule, holding: Holding, now: float) -> None:
        for subject, summary in holding.items():
            key = (rule.name, subject)
            alert = self._active.get(key)
            if alert is None:
                alert = self._active[key] = Alert(rule, subject, now, summary)
            alert.summary = summary
            if not alert.firing and now - alert.since >= rule.for_:
                alert.firing, alert.fired_at = True, now
                await self._send(alert, "firing", now)
            elif alert.firing and now - alert.last_sent >= rule.repeat:
                await self._send(alert, "firing", now)
        for key, alert in list(self._active.items()):
            if alert.rule.name != rule.name or alert.subject in holding:
                continue
            del self._active[key]
            if alert.firing:
                await self._send(alert, "resolved", now)

    async def _send(self, alert: Alert, status: str, now: float) -> None:
        alerts = self.alerts
        hub = self._sidecar.webhooks
        if alerts is None or hub.store is None:
            return
        from ..webhooks.queue import Direction, Target

        note = Notification(
            alertname=alert.rule.name,
            status=status,
            severity=alert.rule.severity,
            subject=alert.subject,
            summary=alert.summary,
            starts_at=alert.fired_at or alert.since,
            ends_at=now if status == "resolved" else None,
        )
        for name in alert.rule.send_to:
            receiver: Receiver = alerts.receivers[name]
            try:
                await hub.store.accept(
                    direction=Direction.outbound,
                    source=source_of(name),
                    event_type=f"alert.{status}",
                    headers=[],
                    body=body(receiver, note),
                    # The origin only is stored: a Slack URL's path is its credential.
                    targets=[Target(name, _origin(receiver.url.reveal()))],
                )
            except Exception as exc:
                # Tried again at the next repeat; the state says it was sent.
                log.error(
                    "alert %s (%s) could not be queued for %s: %s",
                    alert.rule.name,
                    status,
                    name,
                    type(exc).__name__,
                )
                continue
            self.sent += 1
        alert.last_sent = now
        log.warning("alert %s %s: %s", alert.rule.name, status, alert.summary)


def engine_of(sidecar: Sidecar) -> AlertEngine | None:
    """The alert rules app.py's `compose` added to `sidecar`; None for a sidecar built
    without them (`sidecar check`, which serves nothing)."""
    for monitor in sidecar.monitors:
        if isinstance(monitor, AlertEngine):
            return monitor
    return None


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def budget_rows(sidecar: Sidecar) -> list[dict[str, Any]]:
    """Every budget of the policy: per service, or per agent the sidecar has seen."""
    from ..steps.llm.budget import window_bounds

    policy = sidecar.policy
    agents: list[str | None] = list(sidecar.telemetry.metrics.agents.counts)
    out: list[dict[str, Any]] = []
    for name in policy.services if policy is not None else ():
        for limit in sidecar.state.find(name, "llm-budget"):
            snap = limit.snapshot()
            start, _ = window_bounds(limit.window, time.time())
            who: list[str | None] = list(agents) if limit.per_agent else [None]
            for agent in who:
                spent = limit.ledger.cached(limit.key(agent), start)
                row: dict[str, Any] = {
                    "service": name,
                    "budget": limit.name,
                    "unit": limit.unit,
                    "agent": agent,
                    "limit": snap["limit"],
                    "spent": spent,
                    "used_percent": None if spent is None else round(100 * spent / limit.amount, 2),
                    "resets_at": snap["resets_at"],
                }
                if agent is not None and spent is None:
                    continue  # this agent has not called the service in this window
                out.append(row)
    return out
