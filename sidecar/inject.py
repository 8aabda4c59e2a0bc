"""`sidecar inject`: a mutating admission webhook that adds the sidecar to annotated pods.

The API server sends an AdmissionReview v1 for each pod it creates; pods annotated
`sidecar.agent/inject: "true"` come back with a JSONPatch (RFC 6902) that adds the sidecar
as a native sidecar (an init container with `restartPolicy: Always`). Every other pod is
allowed unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aiohttp import web

log = logging.getLogger(__name__)

DEFAULT_IMAGE = "ghcr.io/agent-sidecar/sidecar:0.1.0"
CONTAINER_NAME = "agent-sidecar"
ADMIN_PORT = 15001
# The probes listener (--probes): /healthz and /readyz on the pod IP, admin on loopback.
PROBES_PORT = 15021
POLICIES_DIR = "/etc/sidecar/policies"
CREDENTIALS_DIR = "/var/run/secrets/agent-sidecar"
RUN_AS = 10001  # the numeric USER of the image

INJECT = "sidecar.agent/inject"
STATUS = "sidecar.agent/status"
POLICIES_CONFIGMAP = "sidecar.agent/policies-configmap"
CREDENTIALS_SECRET = "sidecar.agent/credentials-secret"
IMAGE = "sidecar.agent/image"
DEFAULT_POLICIES_CONFIGMAP = "agent-sidecar-policies"

# The largest object etcd stores is 1.5 MiB; the review wraps it, so leave headroom.
MAX_REVIEW_BYTES = 3 * 1024 * 1024
CERT_CHECK_INTERVAL = 30.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    env = os.environ.get
    parser.add_argument(
        "--listen",
        type=_host_port,
        default=env("SIDECAR_INJECT_LISTEN", "0.0.0.0:8443"),
        metavar="HOST:PORT",
        help="where to serve the webhook (env SIDECAR_INJECT_LISTEN, default %(default)s)",
    )
    parser.add_argument(
        "--tls-cert",
        default=env("SIDECAR_INJECT_TLS_CERT"),
        metavar="FILE",
        help="PEM serving certificate; the API server only calls webhooks over HTTPS "
        "(env SIDECAR_INJECT_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key",
        default=env("SIDECAR_INJECT_TLS_KEY"),
        metavar="FILE",
        help="PEM private key of --tls-cert (env SIDECAR_INJECT_TLS_KEY)",
    )
    parser.add_argument(
        "--image",
        default=env("SIDECAR_IMAGE", DEFAULT_IMAGE),
        help="sidecar image to inject (env SIDECAR_IMAGE, default %(default)s)",
    )


def run(args: argparse.Namespace) -> int:
    host, port = args.listen
    if bool(args.tls_cert) != bool(args.tls_key):
        print("sidecar inject: --tls-cert and --tls-key go together", file=sys.stderr)
        return 2
    tls: ssl.SSLContext | None = None
    if args.tls_cert:
        try:
            tls = _tls_context(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            print(f"sidecar inject: cannot load the TLS certificate: {e}", file=sys.stderr)
            return 1
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        try:
            runner.run(
                _serve(make_app(image=args.image), host, port, tls, (args.tls_cert, args.tls_key))
            )
        except OSError as e:
            print(f"sidecar inject: cannot listen on {host}:{port}: {e}", file=sys.stderr)
            return 1
    return 0


def make_app(*, image: str) -> web.Application:
    # Here, not at the top: `sidecar run` builds this command's parser too, and must
    # not pay aiohttp's megabytes for a webhook it does not serve.
    from aiohttp import web

    async def mutate(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            review = json.loads(body)
        except ValueError as e:
            return _bad_request(f"the body is not JSON: {e}")
        err = _review_error(review)
        if err:
            return _bad_request(err)
        req = review["request"]
        response: dict[str, Any] = {"uid": req["uid"], "allowed": True}
        # Only a pod being created is ours to change; allow anything else untouched,
        # so a too-wide webhook rule never blocks the cluster.
        pod = req.get("object")
        if _is_pod_create(req):
            err = _pod_error(pod)
            if err:
                return _bad_request(err)
            patch = build_patch(pod, image=image)
            if patch:
                response["patchType"] = "JSONPatch"
                response["patch"] = base64.b64encode(json.dumps(patch).encode()).decode()
                meta = pod.get("metadata") or {}
                name = req.get("name") or meta.get("name") or meta.get("generateName", "")
                log.info("injected the sidecar into pod %s/%s", req.get("namespace", ""), name)
        return web.json_response(
            {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}
        )

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application(client_max_size=MAX_REVIEW_BYTES)
    app.router.add_post("/mutate", mutate)
    app.router.add_get("/healthz", healthz)
    return app


def build_patch(pod: dict[str, Any], *, image: str) -> list[dict[str, Any]]:
    """The JSONPatch that injects the sidecar into `pod`, or [] when it must stay as it is."""
    metadata = pod.get("metadata") or {}
    annotations = metadata.get("annotations") or {}
    spec = pod.get("spec") or {}
    if str(annotations.get(INJECT, "")).strip().lower() != "true":
        return []
    if STATUS in annotations or _has_sidecar(spec):
        return []

    image = annotations.get(IMAGE) or image
    configmap = annotations.get(POLICIES_CONFIGMAP) or DEFAULT_POLICIES_CONFIGMAP
    secret = annotations.get(CREDENTIALS_SECRET)
    volumes: list[dict[str, Any]] = [
        {"name": "agent-sidecar-policies", "configMap": {"name": configmap}}
    ]
    if secret:
        volumes.append({"name": "agent-sidecar-credentials", "secret": {"secretName": secret}})

    container = sidecar_container(image=image, with_credentials=bool(secret))
    patch: list[dict[str, Any]] = []
    if spec.get("initContainers"):
        # Index 0, not "-": the sidecar starts before the pod's own init containers,
        # so they can already reach the services it proxies.
        patch.append({"op": "add", "path": "/spec/initContainers/0", "value": container})
    else:
        patch.append({"op": "add", "path": "/spec/initContainers", "value": [container]})

    if spec.get("volumes"):
        patch += [{"op": "add", "path": "/spec/volumes/-", "value": v} for v in volumes]
    else:
        patch.append({"op": "add", "path": "/spec/volumes", "value": volumes})

    # The inject annotation is there, so the annotations map is too: add one key to it.
    patch.append({"op": "add", "path": _annotation_path(STATUS), "value": "injected"})
    return patch


def sidecar_container(*, image: str, with_credentials: bool = False) -> dict[str, Any]:
    """The sidecar as a native sidecar container, the same one k8s/deployment.yaml spells out."""
    mounts: list[dict[str, Any]] = [
        {"name": "agent-sidecar-policies", "mountPath": POLICIES_DIR, "readOnly": True}
    ]
    if with_credentials:
        # The whole directory, never subPath: a subPath mount misses Secret rotations.
        mounts.append(
            {"name": "agent-sidecar-credentials", "mountPath": CREDENTIALS_DIR, "readOnly": True}
        )

    def probe(path: str, **timing: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": PROBES_PORT}, **timing}

    return {
        "name": CONTAINER_NAME,
        "image": image,
        "args": ["run", "--policies", POLICIES_DIR],
        "restartPolicy": "Always",
        # Spelled out so that an --image override with other defaults still keeps egress
        # and admin on loopback and lets the kubelet reach the probes over the pod IP.
        "env": [
            {"name": "SIDECAR_LISTEN", "value": "127.0.0.1:15000"},
            {"name": "SIDECAR_ADMIN", "value": f"127.0.0.1:{ADMIN_PORT}"},
            {"name": "SIDECAR_PROBES", "value": f"0.0.0.0:{PROBES_PORT}"},
        ],
        "ports": [{"name": "sidecar-probes", "containerPort": PROBES_PORT}],
        # Startup waits for /readyz: the agent containers start only once the routes
        # are loaded, so their first call does not fail.
        "startupProbe": probe("/readyz", periodSeconds=1, failureThreshold=30),
        "readinessProbe": probe("/readyz", periodSeconds=5, failureThreshold=3),
        "livenessProbe": probe("/healthz", periodSeconds=10, failureThreshold=3),
        "resources": {
            "requests": {"cpu": "50m", "memory": "64Mi"},
            "limits": {"cpu": "1", "memory": "256Mi"},
        },
        "securityContext": {
            "runAsNonRoot": True,
            # Explicit, so an --image override whose USER is a name still passes runAsNonRoot.
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": mounts,
    }


def _has_sidecar(spec: dict[str, Any]) -> bool:
    containers = (spec.get("initContainers") or []) + (spec.get("containers") or [])
    return any(c.get("name") == CONTAINER_NAME for c in containers)


def _annotation_path(key: str) -> str:
    # RFC 6901: "~" and "/" in a key are escaped, in that order.
    return "/metadata/annotations/" + key.replace("~", "~0").replace("/", "~1")


def _is_pod_create(req: dict[str, Any]) -> bool:
    kind = req.get("kind")
    return (
        isinstance(kind, dict)
        and kind.get("kind") == "Pod"
        and kind.get("group", "") == ""
        and req.get("operation") == "CREATE"
    )


def _review_error(review: Any) -> str | None:
    if not isinstance(review, dict):
        return "the body is not an AdmissionReview object"
    if review.get("apiVersion") != "admission.k8s.io/v1" or review.get("kind") != "AdmissionReview":
        return (
            "expected apiVersion admission.k8s.io/v1 and kind AdmissionReview, got "
            f"{review.get('apiVersion')!r} and {review.get('kind')!r}"
        )
    req = review.get("request")
    if not isinstance(req, dict):
        return "the AdmissionReview has no request object"
    if not isinstance(req.get("uid"), str) or not req["uid"]:
        return "request.uid is missing or not a string"
    return None


def _pod_error(pod: Any) -> str | None:
    """Why build_patch cannot read `pod`, checked up front so that no input makes it raise."""
    if not isinstance(pod, dict):
        return "request.object is missing or not a Pod object"
    for key in ("metadata", "spec"):
        if not isinstance(pod.get(key) or {}, dict):
            return f"request.object.{key} is not an object"
    annotations = (pod.get("metadata") or {}).get("annotations") or {}
    if not isinstance(annotations, dict):
        return "request.object.metadata.annotations is not an object"
    if not all(isinstance(v, str) for v in annotations.values()):
        return "request.object.metadata.annotations has a value that is not a string"
    spec = pod.get("spec") or {}
    for key in ("containers", "initContainers", "volumes"):
        items = spec.get(key) or []
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            return f"request.object.spec.{key} is not a list of objects"
    return None


def _bad_request(message: str) -> web.Response:
    from aiohttp import web

    return web.json_response({"error": message}, status=400)


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _tls_context(cert: str, key: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    return ctx


async def _reload_cert_when_changed(
    ctx: ssl.SSLContext, cert: str, key: str, *, interval: float = CERT_CHECK_INTERVAL
) -> None:
    """Load a renewed certificate into the live context.

    cert-manager and friends renew the Secret in place; without this the webhook would
    serve an expired certificate and, under failurePolicy Ignore, pods would quietly
    start without their sidecar.
    """

    def stamp() -> tuple[tuple[int, int], ...]:
        return tuple((os.stat(p).st_ino, os.stat(p).st_mtime_ns) for p in (cert, key))

    last = stamp()
    while True:
        await asyncio.sleep(interval)
        try:
            now = stamp()
            if now != last:
                # Check the pair on a scratch context first: a failed load can leave the
                # live one with the new cert and no key, and every handshake would fail.
                _tls_context(cert, key)
                # New handshakes use the new chain; open connections keep theirs.
                ctx.load_cert_chain(cert, key)
                last = now
                log.info("reloaded the TLS certificate %s", cert)
        except (OSError, ssl.SSLError) as e:
            # Mid-rotation the cert and key may not match yet: keep the old pair, retry.
            log.warning("cannot reload the TLS certificate %s: %s", cert, e)


async def _serve(
    app: web.Application,
    host: str,
    port: int,
    tls: ssl.SSLContext | None,
    cert_files: tuple[str, str],
) -> None:
    from aiohttp import web

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    watcher = None
    try:
        await web.TCPSite(runner, host, port, ssl_context=tls).start()
        bound = runner.addresses[0][1]  # the real port, also when asked for port 0
        log.info("sidecar inject serving on %s://%s:%d", "https" if tls else "http", host, bound)
        if tls:
            watcher = asyncio.create_task(_reload_cert_when_changed(tls, *cert_files))
        await stop.wait()
    finally:
        if watcher:
            watcher.cancel()
        await runner.cleanup()


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
