"""The admin listener: health, readiness, the effective config, reloads.

Nothing here ever shows a secret: secrets serialize as their reference
(`${file:/path}`, `${env:NAME}`) or `<redacted>`.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import hdrs, web

from .problems import ProblemError, problem_response
from .runtime import Sidecar
from .telemetry.metrics import CONTENT_TYPE

SIDECAR_KEY = web.AppKey("sidecar", Sidecar)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _sidecar(request: web.Request) -> Sidecar:
    return request.app[SIDECAR_KEY]


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    sidecar = _sidecar(request)
    if sidecar.draining:
        return web.json_response({"status": "draining"}, status=503)
    if sidecar.router is None:
        return web.json_response({"status": "no policy loaded"}, status=503)
    return web.json_response({"status": "ready", "version": sidecar.router.version})


def effective_config(sidecar: Sidecar) -> dict[str, Any]:
    policy = sidecar.policy
    last = sidecar.last_reload.as_dict() if sidecar.last_reload else None
    if policy is None:
        return {"version": None, "last_reload": last}
    return {
        "version": policy.version,
        "files": list(policy.files),
        "last_reload": last,
        "reloads": {"succeeded": sidecar.counts.succeeded, "failed": sidecar.counts.failed},
        "agents": policy.agents.model_dump(mode="json"),
        "allow": None
        if policy.allow is None
        else [r.model_dump(mode="json", exclude_defaults=True) for r in policy.allow],
        "services": {
            name: {"prefix": s.prefix, **s.spec.model_dump(mode="json", exclude_none=True)}
            for name, s in policy.services.items()
        },
    }


async def config(request: web.Request) -> web.Response:
    return web.json_response(effective_config(_sidecar(request)))


async def reload(request: web.Request) -> web.Response:
    result = await _sidecar(request).reload("admin")
    return web.json_response(result.as_dict(), status=200 if result.ok else 422)


async def services(request: web.Request) -> web.Response:
    """Each service's route and the live state of its breaker and retry budget."""
    sidecar = _sidecar(request)
    policy = sidecar.policy
    out: dict[str, Any] = {}
    for name, s in policy.services.items() if policy else ():
        # The upstream URL holds no user:password: the policy model refuses one.
        entry: dict[str, Any] = {"prefix": s.prefix, "upstream": s.spec.upstream}
        for step, key in (("breaker", "circuit_breaker"), ("retry", "retry")):
            found = sidecar.state.find(name, step)
            entry[key] = found[0].snapshot() if found else None
        entry["rate_limit"] = [r.model_dump(mode="json") for r in s.spec.rate_limit]
        # The rules in force and where they are written; none means every agent may call.
        entry["allow"] = {
            "from": s.allow_from or None,
            "rules": [r.model_dump(mode="json", exclude_defaults=True) for r in s.allow],
        }
        out[name] = entry
    return web.json_response({"services": out})


async def metrics(request: web.Request) -> web.Response:
    sidecar = _sidecar(request)
    telemetry = sidecar.telemetry
    # The queue gauges as of this scrape, not of the last periodic read.
    await sidecar.webhooks.refresh_gauges()
    return web.Response(body=telemetry.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@web.middleware
async def same_origin_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    # A web page can POST text/plain anywhere without a CORS preflight, so any site
    # a browser on this host visits could trigger reloads; browsers always name
    # the page's origin on such a request, while curl, probes and scripts send none.
    origin = request.headers.get(hdrs.ORIGIN)
    if origin is not None and request.method not in SAFE_METHODS:
        own = f"{request.scheme}://{request.host}".lower()
        if origin.lower() != own:
            refused = ProblemError(
                "forbidden_origin",
                f"the admin port accepts {request.method} only from its own origin {own}",
            )
            return problem_response(refused)
    return await handler(request)


def _origin(url: str) -> str:
    # A webhook URL's path or query can be its credential (Slack's are): show the origin only.
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _no_webhooks() -> web.Response:
    return web.json_response({"error": "no webhooks are configured"}, status=404)


async def webhooks(request: web.Request) -> web.Response:
    """Per endpoint: queue depth, oldest pending age, successes, failures, dead, disabled."""
    store = _sidecar(request).webhooks.store
    if store is None:
        return _no_webhooks()
    return web.json_response(_plain(await store.overview()))


async def webhook_message(request: web.Request) -> web.Response:
    store = _sidecar(request).webhooks.store
    if store is None:
        return _no_webhooks()
    view = await store.message(request.match_info["id"])
    if view is None:
        return web.json_response({"error": "no such message"}, status=404)
    out = _plain(view)
    for delivery in out["deliveries"]:
        delivery["url"] = _origin(delivery["url"])
    return web.json_response(out)


async def webhook_retry(request: web.Request) -> web.Response:
    sidecar = _sidecar(request)
    store = sidecar.webhooks.store
    if store is None:
        return _no_webhooks()
    count = await store.retry(request.match_info["id"])
    if count is None:
        return web.json_response({"error": "no such message"}, status=404)
    sidecar.webhooks.wake()
    return web.json_response({"retried_deliveries": count})


async def webhook_enable(request: web.Request) -> web.Response:
    """Enable every endpoint of this name (disabled by a 410 Gone)."""
    sidecar = _sidecar(request)
    store = sidecar.webhooks.store
    if store is None:
        return _no_webhooks()
    name = request.match_info["name"]
    enabled = []
    for stats in (await store.overview()).endpoints:
        if stats.endpoint == name and await store.enable(stats.source, name):
            enabled.append(stats.source)
    if not enabled:
        return web.json_response({"error": "no such endpoint"}, status=404)
    sidecar.webhooks.wake()
    return web.json_response({"enabled": name, "webhooks": enabled})


def admin_app(sidecar: Sidecar) -> web.Application:
    app = web.Application(middlewares=[same_origin_only])
    app[SIDECAR_KEY] = sidecar
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config)
    app.router.add_get("/services", services)
    app.router.add_post("/reload", reload)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/webhooks", webhooks)
    app.router.add_get("/webhooks/messages/{id}", webhook_message)
    app.router.add_post("/webhooks/messages/{id}/retry", webhook_retry)
    app.router.add_post("/webhooks/endpoints/{name}/enable", webhook_enable)
    return app
