"""The admin listener: health, readiness, the effective config, reloads.

Runs on the same HTTP/1.1 listener as the egress (http/listener.py), so a
sidecar that serves no webhook never loads an HTTP framework. Nothing here
ever shows a secret: secrets serialize as their reference (`${file:/path}`,
`${env:NAME}`) or `<redacted>`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import enum
import hmac
import json
import logging
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from .core.headers import SERVER
from .core.problems import ProblemError, problem_parts
from .core.reasons import Reason
from .http.listener import App, Request, Response
from .telemetry.metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from .runtime import Sidecar

log = logging.getLogger("sidecar.admin")

Params = dict[str, str]
Handler = Callable[["Sidecar", Request, Params], Awaitable[Response]]
_JSON = "application/json; charset=utf-8"


def json_response(data: Any, status: int = 200) -> Response:
    return Response(
        status=status,
        headers=[("Content-Type", _JSON), ("Server", SERVER)],
        body=json.dumps(data).encode(),
    )


async def healthz(sidecar: Sidecar, request: Request, params: Params) -> Response:
    return json_response({"status": "ok"})


async def readyz(sidecar: Sidecar, request: Request, params: Params) -> Response:
    if sidecar.draining:
        return json_response({"status": "draining"}, status=503)
    if sidecar.router is None:
        return json_response({"status": "no policy loaded"}, status=503)
    return json_response({"status": "ready", "version": sidecar.router.version})


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
        # Dumped by the loader (policy/described.py): no serializer is built here.
        "agents": policy.described["agents"],
        "allow": policy.described["allow"],
        "services": {
            name: described["spec"] for name, described in policy.described["services"].items()
        },
    }


async def config(sidecar: Sidecar, request: Request, params: Params) -> Response:
    return json_response(effective_config(sidecar))


async def reload(sidecar: Sidecar, request: Request, params: Params) -> Response:
    result = await sidecar.reload("admin")
    return json_response(result.as_dict(), status=200 if result.ok else 422)


async def services(sidecar: Sidecar, request: Request, params: Params) -> Response:
    """Each service's route and the live state of its breaker and retry budget."""
    policy = sidecar.policy
    out: dict[str, Any] = {}
    every = policy.described["services"] if policy else {}
    for name, s in policy.services.items() if policy else ():
        # The upstream URL holds no user:password: the policy model refuses one.
        entry: dict[str, Any] = {"prefix": s.prefix, "upstream": s.spec.upstream}
        for step, key in (("breaker", "circuit_breaker"), ("retry", "retry")):
            found = sidecar.state.find(name, step)
            entry[key] = found[0].snapshot() if found else None
        described = every[name]
        entry["rate_limit"] = described["rate_limit"]
        if s.spec.budget:
            # What is written and, for a budget of the whole service, what is left of it.
            entry["budget"] = [b.snapshot() for b in sidecar.state.find(name, "llm-budget")]
        # Never hidden: chaos left on, or a mocked service, must show at a glance.
        entry["mode"] = s.spec.mode
        faults = sidecar.state.find(name, "faults")
        entry["faults"] = faults[0].snapshot() if faults else None
        # How full the cache is (memory), or where it lives (Redis, without its password).
        cache = sidecar.state.find(name, "cache")
        entry["cache"] = cache[0].snapshot() if cache else None
        # The rules in force and where they are written; none means every agent may call.
        entry["allow"] = {
            "from": s.allow_from or None,
            "rules": described["allow"],
        }
        out[name] = entry
    return json_response({"services": out})


async def databases(sidecar: Sidecar, request: Request, params: Params) -> Response:
    """Each database: where it listens, its upstream (never the password), its pool now."""
    return json_response({"databases": sidecar.databases.stats()})


async def metrics(sidecar: Sidecar, request: Request, params: Params) -> Response:
    telemetry = sidecar.telemetry
    # The queue gauges as of this scrape, not of the last periodic read.
    await sidecar.webhooks.refresh_gauges()
    return Response(
        status=200,
        headers=[("Content-Type", CONTENT_TYPE), ("Server", SERVER)],
        body=telemetry.metrics.render(),
    )


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _cross_origin(request: Request) -> Response | None:
    # A web page can POST text/plain anywhere without a CORS preflight, so any site
    # a browser on this host visits could trigger reloads; browsers always name
    # the page's origin on such a request, while curl, probes and scripts send none.
    origin = request.headers.get("Origin")
    if origin is None or request.method in SAFE_METHODS:
        return None
    own = f"http://{request.headers.get('Host', '')}".lower()
    if origin.lower() == own:
        return None
    status, headers, body = problem_parts(
        ProblemError(
            Reason.forbidden_origin,
            f"the admin port accepts {request.method} only from its own origin {own}",
        )
    )
    return Response(status=status, headers=headers, body=body)


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


def _no_webhooks() -> Response:
    return json_response({"error": "no webhooks are configured"}, status=404)


async def webhooks(sidecar: Sidecar, request: Request, params: Params) -> Response:
    """Per endpoint: queue depth, oldest pending age, successes, failures, dead, disabled."""
    store = sidecar.webhooks.store
    if store is None:
        return _no_webhooks()
    return json_response(_plain(await store.overview()))


async def webhook_message(sidecar: Sidecar, request: Request, params: Params) -> Response:
    store = sidecar.webhooks.store
    if store is None:
        return _no_webhooks()
    view = await store.message(params["id"])
    if view is None:
        return json_response({"error": "no such message"}, status=404)
    out = _plain(view)
    for delivery in out["deliveries"]:
        delivery["url"] = _origin(delivery["url"])
    return json_response(out)


async def webhook_retry(sidecar: Sidecar, request: Request, params: Params) -> Response:
    store = sidecar.webhooks.store
    if store is None:
        return _no_webhooks()
    count = await store.retry(params["id"])
    if count is None:
        return json_response({"error": "no such message"}, status=404)
    sidecar.webhooks.wake()
    return json_response({"retried_deliveries": count})


async def webhook_enable(sidecar: Sidecar, request: Request, params: Params) -> Response:
    """Enable every endpoint of this name (disabled by a 410 Gone)."""
    store = sidecar.webhooks.store
    if store is None:
        return _no_webhooks()
    name = params["name"]
    enabled = []
    for stats in (await store.overview()).endpoints:
        if stats.endpoint == name and await store.enable(stats.source, name):
            enabled.append(stats.source)
    if not enabled:
        return json_response({"error": "no such endpoint"}, status=404)
    sidecar.webhooks.wake()
    return json_response({"enabled": name, "webhooks": enabled})


# Largest POST /faults body read: a switch is a few bytes of JSON.
_FAULTS_BODY_LIMIT = 4096


async def _json_body(request: Request) -> Any:
    body = request.body
    if body is None:
        return {}
    data = b""
    async for chunk in body:
        data += chunk
        if len(data) > _FAULTS_BODY_LIMIT:
            raise ValueError(f"the body is larger than {_FAULTS_BODY_LIMIT} bytes")
    return json.loads(data) if data.strip() else {}


def _switch_of(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "on", "1", "false", "off", "0"):
        return value.lower() in ("true", "on", "1")
    return None


async def faults_view(sidecar: Sidecar, request: Request, params: Params) -> Response:
    return json_response({"faults": {name: f.snapshot() for name, f in sidecar.faults().items()}})


async def faults(sidecar: Sidecar, request: Request, params: Params) -> Response:
    """Switch fault injection on or off, for one service or all, without a reload.

    Takes `enabled` (and optionally `service`) from a JSON body or the query string:
    `POST /faults?service=github&enabled=false`. The switch holds until a reload
    changes that service's `faults:` block (a changed block starts as it says).
    """
    try:
        asked = await _json_body(request)
    except ValueError as err:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        return json_response({"error": f"the body is not a JSON object: {err}"}, status=400)
    if not isinstance(asked, dict):
        return json_response({"error": "the body is not a JSON object"}, status=400)
    for key, values in parse_qs(request.target.partition("?")[2]).items():
        asked.setdefault(key, values[-1])
    unknown = sorted(set(asked) - {"service", "enabled"})
    if unknown:
        return json_response(
            {"error": f"unknown keys {', '.join(unknown)}; expected service, enabled"}, status=400
        )
    enabled = _switch_of(asked.get("enabled"))
    if enabled is None:
        return json_response({"error": "give enabled: true or false"}, status=400)
    switches = sidecar.faults()
    service = asked.get("service")
    if service is not None:
        if not isinstance(service, str):
            return json_response({"error": "service must be a service's name"}, status=400)
        if service not in switches:
            return json_response(
                {"error": f"service {service!r} has no faults block in the policy"}, status=404
            )
        switches = {service: switches[service]}
    for name, switch in switches.items():
        switch.switch(enabled)
        log.warning(
            "fault injection of service %s switched %s by the admin port",
            name,
            "on" if enabled else "off",
        )
    return json_response({"faults": {name: f.snapshot() for name, f in switches.items()}})


# The console's own headers: it is never framed (clickjacking of its replay and
# enable buttons), loads nothing but its own files, and is never cached.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_SECURITY_HEADERS = [
    ("Content-Security-Policy", CONSOLE_CSP),
    ("X-Frame-Options", "DENY"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
]
_STATIC = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/console.js": ("console.js", "text/javascript; charset=utf-8"),
    "/console.css": ("console.css", "text/css; charset=utf-8"),
}
_static_cache: dict[str, bytes] = {}


def _read_static(name: str) -> bytes:
    from importlib import resources

    return resources.files("sidecar.console").joinpath("static", name).read_bytes()


async def console_file(sidecar: Sidecar, request: Request, params: Params) -> Response:
    """The console page and its script and style: package data, no build step, no CDN."""
    name, content_type = _STATIC[request.target.partition("?")[0]]
    body = _static_cache.get(name)
    if body is None:
        # Read once, off the loop; the files do not change while the package is installed.
        body = _static_cache[name] = await asyncio.to_thread(_read_static, name)
    headers = [("Content-Type", content_type), ("Server", SERVER), *_SECURITY_HEADERS]
    return Response(status=200, headers=headers, body=body)


async def console_api(sidecar: Sidecar, request: Request, params: Params) -> Response:
    """Everything the console shows, as one JSON document (docs/console.md)."""
    from .console.api import document

    # The queue figures as of now, for /metrics and the page alike.
    await sidecar.webhooks.refresh_gauges()
    return json_response(await document(sidecar))


_ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/", console_file),
    ("GET", "/console.js", console_file),
    ("GET", "/console.css", console_file),
    ("GET", "/api/console", console_api),
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/config", config),
    ("GET", "/services", services),
    ("GET", "/databases", databases),
    ("POST", "/reload", reload),
    ("GET", "/faults", faults_view),
    ("POST", "/faults", faults),
    ("GET", "/metrics", metrics),
    ("GET", "/webhooks", webhooks),
    ("GET", "/webhooks/messages/{id}", webhook_message),
    ("POST", "/webhooks/messages/{id}/retry", webhook_retry),
    ("POST", "/webhooks/endpoints/{name}/enable", webhook_enable),
]


def _compile(template: str) -> re.Pattern[str]:
    # "/a/{id}/b" -> ^/a/(?P<id>[^/]+)/b$: literal parts and one named segment each.
    parts = re.split(r"\{(\w+)\}", template)
    regex = "".join(
        re.escape(part) if i % 2 == 0 else f"(?P<{part}>[^/]+)" for i, part in enumerate(parts)
    )
    return re.compile(regex + "$")


_COMPILED = [(method, _compile(path), handler) for method, path, handler in _ROUTES]


def _plain_answer(status: int, text: str, extra: list[tuple[str, str]] | None = None) -> Response:
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Server", SERVER)]
    return Response(status=status, headers=headers + (extra or []), body=text.encode())


# Answered without a token (never with a wrong one): kubelet probes carry no secret.
PROBES = frozenset({"/healthz", "/readyz"})


def presented_token(request: Request) -> str | None:
    """The token of `Authorization: Bearer T`, or the password of HTTP Basic (browsers)."""
    value = request.headers.get("Authorization")
    if not value:
        return None
    scheme, _, rest = value.strip().partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer":
        return rest.strip()
    if scheme == "basic":
        try:
            decoded = base64.b64decode(rest.strip(), validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            return ""
        return decoded.partition(":")[2]
    return ""


def _unauthorized(detail: str) -> Response:
    status, headers, body = problem_parts(ProblemError(Reason.unauthenticated, detail))
    # Basic first: a browser opening the console asks for it (any user name, the token).
    headers.append(("WWW-Authenticate", 'Basic realm="sidecar admin", charset="UTF-8"'))
    headers.append(("WWW-Authenticate", 'Bearer realm="sidecar admin"'))
    return Response(status=status, headers=headers, body=body)


def check_token(sidecar: Sidecar, request: Request, *, protected: bool) -> Response | None:
    """None when the request may go on; else the 401 to answer.

    With a token in force every path but the probes needs it, and a wrong one
    gets 401 on every path. On a non-loopback address with no token (a reload
    removed it) only the probes answer.
    """
    token = sidecar.admin_token
    presented = presented_token(request)
    path = request.target.partition("?")[0]
    if token is None:
        if not protected or path in PROBES:
            return None
        return _unauthorized("the admin port is not on loopback and no admin token is set")
    if presented is None:
        if path in PROBES:
            return None
        return _unauthorized("the admin port needs its token: Authorization: Bearer <token>")
    if hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8")):
        return None
    return _unauthorized("the admin token is wrong")


def admin_app(sidecar: Sidecar, *, protected: bool = False) -> App:
    """The admin port's handler; `protected`: bound to a non-loopback address."""

    async def handle(request: Request) -> Response:
        refused = check_token(sidecar, request, protected=protected)
        if refused is None:
            refused = _cross_origin(request)
        if refused is not None:
            return refused
        path = request.target.partition("?")[0]
        allowed: list[str] = []
        for method, pattern, handler in _COMPILED:
            found = pattern.match(path)
            if found is None:
                continue
            if request.method == method or (request.method == "HEAD" and method == "GET"):
                params = {k: unquote(v) for k, v in found.groupdict().items()}
                return await handler(sidecar, request, params)
            allowed.append(method)
            if method == "GET":
                allowed.append("HEAD")
        if allowed:
            allow = ", ".join(sorted(set(allowed)))
            return _plain_answer(405, "405: Method Not Allowed", [("Allow", allow)])
        return _plain_answer(404, "404: Not Found")

    return handle


def probes_app(sidecar: Sidecar) -> App:
    """The probes listener (`--probes`): /healthz and /readyz, nothing else, no token.

    Kubernetes probes reach a pod over its IP, so this listener binds there while
    the admin port (the console, reloads, the figures) stays on loopback; it shows
    nothing but readiness and the policy's version hash.
    """

    async def handle(request: Request) -> Response:
        path = request.target.partition("?")[0]
        handler = {"/healthz": healthz, "/readyz": readyz}.get(path)
        if handler is None:
            return _plain_answer(404, "404: Not Found")
        if request.method not in ("GET", "HEAD"):
            return _plain_answer(405, "405: Method Not Allowed", [("Allow", "GET, HEAD")])
        return await handler(sidecar, request, {})

    return handle
