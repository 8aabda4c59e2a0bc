"""The admin listener: health, readiness, the effective config, reloads.

Nothing here ever shows a secret: secrets serialize as their reference
(`${file:/path}`, `${env:NAME}`) or `<redacted>`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

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
        out[name] = entry
    return web.json_response({"services": out})


async def metrics(request: web.Request) -> web.Response:
    telemetry = _sidecar(request).telemetry
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


def admin_app(sidecar: Sidecar) -> web.Application:
    app = web.Application(middlewares=[same_origin_only])
    app[SIDECAR_KEY] = sidecar
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/config", config)
    app.router.add_get("/services", services)
    app.router.add_post("/reload", reload)
    app.router.add_get("/metrics", metrics)
    return app
