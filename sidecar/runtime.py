"""The running sidecar: the current policy and Router, reloads, and the state they keep.

Reload = load + validate + compile a whole new Router off the request path,
then swap one reference. A failed reload changes nothing. The listeners that
serve it are opened by the composition root (app.py), which this module never
imports: it knows neither the admin nor the listeners. What monitors it from above
(the alert rules) app.py adds too, as a `Monitor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .core.state import StateStore
from .databases.http import DatabaseHttp
from .databases.hub import DatabaseHub
from .databases.telemetry import DatabaseTelemetry
from .http import chain
from .http.egress import Egress
from .http.router import Router, compile_policy
from .policy.child import LoaderFailed
from .policy.loaded import Policy, PolicyError
from .policy.testing import CassetteOverride
from .policy.watcher import watch
from .steps.answers.cache import CacheStore
from .steps.resilience.faults import Faults
from .telemetry import Telemetry
from .telemetry.figures import Samples
from .webhooks.gate import build_gate
from .webhooks.hub import StoreChanged, WebhookHub
from .webhooks.listener import OWN_PREFIXES, egress_app

if TYPE_CHECKING:
    # Loaded when a policy first declares webhooks (sqlite3, cryptography): webhooks/hub.py.
    from .webhooks.delivery import DeliverySettings, SettingsKey

log = logging.getLogger("sidecar")


class PolicyLoad(Protocol):
    """load_policy's signature, awaited: in a worker thread, or in a child process."""

    def __call__(
        self,
        directory: str,
        *,
        env: Mapping[str, str] | None,
        mode: str | None,
        cassettes: CassetteOverride | None,
        listeners: tuple[tuple[str, int], ...],
    ) -> Awaitable[Policy]: ...


async def _load_in_thread(
    directory: str,
    *,
    env: Mapping[str, str] | None,
    mode: str | None,
    cassettes: CassetteOverride | None,
    listeners: tuple[tuple[str, int], ...],
) -> Policy:
    # Imported here: a sidecar that loads in a child never needs the loader (nor PyYAML).
    from .policy.loader import load_policy

    # File reads happen in a worker thread: the loop keeps serving meanwhile.
    return await asyncio.to_thread(
        load_policy, directory, env=env, mode=mode, cassettes=cassettes, listeners=listeners
    )


# Default --data-dir: durable state (the webhook queue, budgets), relative to the working
# directory.
DATA_DIR = "sidecar-data"


@dataclass(frozen=True, slots=True)
class ReloadResult:
    ok: bool
    trigger: str
    at: float
    version: str | None
    changed: bool = False
    errors: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "trigger": self.trigger,
            "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at)),
            "version": self.version,
            "changed": self.changed,
            "errors": list(self.errors),
        }


@dataclass(slots=True)
class ReloadCounts:
    succeeded: int = 0
    failed: int = 0


class Monitor(Protocol):
    """What judges the running sidecar on its timer, off the request path: the alert
    rules (alerts/engine.py). They sit above the runtime (they read its policy, state
    and queues), so the composition root adds them (app.py's `compose`) and the runtime
    knows them by this much only.
    """

    @property
    def every(self) -> float:
        """Seconds between two evaluations."""
        ...

    def webhook_settings(self, policy: Policy) -> Mapping[SettingsKey, DeliverySettings]:
        """How the webhook queue delivers what this monitor queues under `policy` (the alert
        receivers): asked while a reload is applied, before it commits."""
        ...

    def policy_changed(self, policy: Policy) -> None:
        """A reload put `policy` in force."""
        ...

    async def evaluate(self) -> None: ...


class Sidecar:
    def __init__(
        self,
        policies: str,
        *,
        env: Mapping[str, str] | None = None,
        telemetry: Telemetry | None = None,
        data_dir: str | None = None,
        mode: str | None = None,
        cassettes: CassetteOverride | None = None,
        listeners: Iterable[tuple[str, int]] = (),
        load: PolicyLoad | None = None,
    ) -> None:
        self.policies = policies
        # How a policy is loaded: in a worker thread of this process unless told
        # otherwise (`sidecar run` loads in a child: policy/child.py).
        self._load = load or _load_in_thread
        # The sidecar's own listeners (egress, admin, ingress), the bound ones once
        # serving: no webhook is delivered to one of them. Port 0: not known yet.
        self.listeners: tuple[tuple[str, int], ...] = tuple(a for a in listeners if a[1])
        self.env = env
        # --mode / SIDECAR_MODE: every service's mode, over its policy's (not mock's).
        self.mode = mode
        # `sidecar record|replay` --cassettes, --fast, --passthrough.
        self.cassettes = cassettes
        self.policy: Policy | None = None
        self.router: Router | None = None
        data_dir = data_dir or os.environ.get("SIDECAR_DATA_DIR", DATA_DIR)
        self.state = StateStore(data_dir=data_dir)
        self.last_reload: ReloadResult | None = None
        self.counts = ReloadCounts()
        # Set once on SIGTERM/SIGINT: /readyz answers 503 while calls in flight finish.
        self.draining = False
        # Called after every reload attempt (metrics, tests); never on the request path.
        self.on_reload: list[Callable[[ReloadResult], None]] = []
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._watch_task: asyncio.Task[None] | None = None
        self.watching = asyncio.Event()
        # Metrics always; traces and the access log as OTEL_* / SIDECAR_ACCESS_LOG in env say.
        self.telemetry = telemetry if telemetry is not None else Telemetry.from_env(env)
        self.telemetry.attach(self)
        hooks = self.state.hooks
        hooks.request_violation.append(self.telemetry.metrics.on_request_violation)
        hooks.response_drift.append(self.telemetry.metrics.on_response_drift)
        hooks.fault_injected.append(self.telemetry.metrics.on_fault)
        hooks.cache_lookup.append(self.telemetry.metrics.on_cache)
        hooks.cache_evicted.append(self.telemetry.metrics.on_cache_evicted)
        hooks.cache_backend_error.append(self.telemetry.metrics.on_cache_backend_error)
        self.telemetry.metrics.cache.source = self.cache_sizes
        hooks.graphql_errors.append(self.telemetry.metrics.on_graphql_errors)
        self.telemetry.metrics.faults.source = self.fault_switches
        # Durable state (the webhook queue) lives here; opened only once a policy needs it.
        self.webhooks = WebhookHub(
            data_dir,
            metrics=self.telemetry.metrics.webhooks,
            tracer=self.telemetry.tracer,
        )
        self.handler = Egress(self.telemetry)
        self.handler.webhooks = egress_app(self.webhooks)
        self.handler.webhook_prefixes = OWN_PREFIXES
        # 30 minutes of per-service readings (the console shows them), and what monitors
        # the sidecar (the alert rules, which app.py adds); both run on one timer
        # (start_background), never on the request path.
        self.samples = Samples(self.telemetry.metrics)
        self.monitors: list[Monitor] = []
        self.telemetry.metrics.breakers.source = self.breaker_states
        # The admin token in force: the policy's admin.token, else SIDECAR_ADMIN_TOKEN(_FILE).
        self.admin_token: str | None = None
        self._background: asyncio.Task[None] | None = None
        # One listener and pool per `databases:` entry, opened by serve().
        self.databases = DatabaseHub(
            DatabaseTelemetry(
                self.telemetry.metrics.registry,
                self.telemetry.tracer,
                access_log=self.telemetry.access_log,
            )
        )
        self.database_http = DatabaseHttp(self.databases)
        self.handler.databases = self.database_http
        self.telemetry.pools.register(self.databases.snapshots)

    async def reload(self, trigger: str) -> ReloadResult:
        async with self._lock:
            result = await self._reload(trigger)
        self.last_reload = result
        if result.ok:
            self.counts.succeeded += 1
        else:
            self.counts.failed += 1
        for listener in self.on_reload:
            listener(result)
        return result

    async def _reload(self, trigger: str) -> ReloadResult:
        now = time.time()

        def failed(*errors: str) -> ReloadResult:
            # Nothing changes: the version reported is the one still serving.
            version = self.policy.version if self.policy else None
            return ReloadResult(ok=False, trigger=trigger, at=now, version=version, errors=errors)

        try:
            policy = await self._load(
                self.policies,
                env=self.env,
                mode=self.mode,
                cassettes=self.cassettes,
                listeners=self.listeners,
            )
        except PolicyError as exc:
            errors = tuple(str(p) for p in exc.problems)
            for line in errors:
                log.error("%s: %s", self._failure("policy rejected"), line)
            return failed(*errors)
        except Exception as exc:
            # A loader bug must not end hot reload (the watcher would die with it).
            log.exception(self._failure("policy could not be loaded"))
            cause = exc.cause if isinstance(exc, LoaderFailed) else type(exc).__name__
            return failed(f"{self.policies}: cannot load: {cause}")
        if self.policy is not None and policy.version == self.policy.version:
            return ReloadResult(ok=True, trigger=trigger, at=now, version=policy.version)
        build = self.state.begin()
        try:
            router = compile_policy(policy, build, chain.for_policy(policy.services))
            gate = build_gate(policy, build)
        except Exception as exc:
            build.abort()
            log.exception(self._failure("policy could not be compiled"))
            # The type only: an exception's text may quote a policy value.
            return failed(f"{self.policies}: cannot compile: {type(exc).__name__}")
        try:
            token = await asyncio.to_thread(self._admin_token, policy)
        except OSError as exc:
            build.abort()
            log.error("%s: %s", self._failure("policy rejected"), exc)
            return failed(f"SIDECAR_ADMIN_TOKEN_FILE: cannot read: {exc.strerror}")
        try:
            settings: dict[SettingsKey, DeliverySettings] = {}
            for monitor in self.monitors:
                settings.update(monitor.webhook_settings(policy))
            await self.webhooks.apply(policy.webhooks, settings, gate=gate)
        except StoreChanged as exc:
            build.abort()
            log.error("%s: %s", self._failure("policy rejected"), exc)
            return failed(str(exc))
        except Exception as exc:
            build.abort()
            log.exception(self._failure("the webhook store could not be opened"))
            return failed(f"{self.webhooks.data_dir}: cannot open the webhook store: {exc}")
        credentials = None
        if policy.databases and (policy.agents.keys or policy.agents.verify):
            from .engines import identity

            agents = policy.agents
            # The same key set (and JWKS cache) as the HTTP identity step: same state key.
            credentials = build.get("", "identity", agents, lambda: identity.new(agents))
        build.commit()
        await self.databases.apply(policy.databases, policy.agents, credentials)
        self.database_http.agent_header = policy.agents.header
        self.policy, self.router = policy, router
        self.admin_token = token
        for monitor in self.monitors:
            monitor.policy_changed(policy)
        self.handler.router = router
        log.info(
            "policy %s loaded (%s): %d services from %d files",
            policy.version,
            trigger,
            len(policy.services),
            len(policy.files),
        )
        if trigger != "startup":
            from .core import memory

            # What the replaced policy and this load left behind goes back to the system
            # (at startup the command line does it, once its listeners are open).
            memory.release()
        return ReloadResult(ok=True, trigger=trigger, at=now, version=policy.version, changed=True)

    def _admin_token(self, policy: Policy) -> str | None:
        if policy.admin is not None and policy.admin.token is not None:
            return policy.admin.token.reveal() or None
        env = os.environ if self.env is None else self.env
        if env.get("SIDECAR_ADMIN_TOKEN"):
            return env["SIDECAR_ADMIN_TOKEN"]
        path = env.get("SIDECAR_ADMIN_TOKEN_FILE")
        if path:
            with open(path, encoding="utf-8") as f:
                return f.read().strip() or None
        return None

    def start_background(self) -> None:
        """The readings every 10 s and the monitors (the alert rules), on one timer."""
        if self._background is None:
            self._background = asyncio.get_running_loop().create_task(
                self._tick(), name="console-and-alerts"
            )

    async def _tick(self) -> None:
        samples = self.samples
        next_sample = 0.0
        while True:
            now = time.monotonic()
            if now >= next_sample:
                samples.take()
                next_sample = now + samples.every
            for monitor in self.monitors:
                try:
                    await monitor.evaluate()
                except Exception:
                    log.exception("alert evaluation failed")
            await asyncio.sleep(min([samples.every, *(m.every for m in self.monitors)]))

    def _failure(self, what: str) -> str:
        # Before the first good policy there is nothing to fall back on: nothing serves.
        if self.policy is None:
            return f"cannot start, {what}"
        return f"{what}, the last good policy keeps serving"

    def begin_drain(self) -> None:
        """Stop being ready (so load balancers send no new calls); calls in flight go on."""
        self.draining = True
        # Subscribers' streams end (they reconnect elsewhere, or after the restart).
        self.webhooks.subscriptions.close()

    def faults(self) -> dict[str, Faults]:
        """Each service's fault injection (its step and switch), as the current policy has it."""
        policy = self.policy
        out: dict[str, Faults] = {}
        for name in policy.services if policy is not None else ():
            found = self.state.find(name, "faults")
            if found:
                out[name] = found[0]
        return out

    def fault_switches(self) -> list[tuple[str, bool]]:
        return [(name, faults.enabled) for name, faults in self.faults().items()]

    def breaker_states(self) -> list[tuple[str, str]]:
        """(service, state) of each breaker the current policy has.

        Also called from the OTLP exporter's thread: it reads the state field only
        (snapshot() would advance the breaker's window from that thread).
        """
        policy = self.policy
        out: list[tuple[str, str]] = []
        for name in policy.services if policy is not None else ():
            for breaker in self.state.find(name, "breaker"):
                out.append((name, str(breaker.state)))
        return out

    def cache_sizes(self) -> list[tuple[str, int, int]]:
        """(service, entries, bytes) of each in-memory cache the current policy uses."""
        policy = self.policy
        out: list[tuple[str, int, int]] = []
        for name in policy.services if policy is not None else ():
            for store in self.state.find(name, "cache"):
                if isinstance(store, CacheStore):
                    out.append((name, store.count, store.bytes))
        return out

    def secret_files(self) -> frozenset[str]:
        return self.policy.secret_files if self.policy else frozenset()

    def start_watching(self, *, debounce_ms: int = 300) -> None:
        async def on_change() -> None:
            await self.reload("watch")

        self._watch_task = asyncio.get_running_loop().create_task(
            watch(
                self.policies,
                self.secret_files,
                on_change,
                debounce_ms=debounce_ms,
                stop=self._stop,
                ready=self.watching,
            )
        )

    async def close(self) -> None:
        self._stop.set()
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            self._background = None
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._watch_task
        self.state.close()
        await self.databases.close()
        await self.webhooks.close()
        await self.telemetry.close()
