"""`sidecar inject`: real AdmissionReviews over HTTP, the returned JSONPatch applied to the pod."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jsonpatch
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sidecar import inject
from tests.helpers import eventually, stop_task

REPO = Path(__file__).resolve().parents[2]
IMAGE = "registry.example/agent-sidecar:test"
Pod = dict[str, Any]
Validate = Callable[[dict[str, Any]], None]


def make_pod(
    *,
    annotations: dict[str, str] | None = None,
    init_containers: list[dict[str, Any]] | None = None,
    volumes: list[dict[str, Any]] | None = None,
) -> Pod:
    """A pod as a ReplicaSet creates it: generateName, no name yet."""
    metadata: dict[str, Any] = {
        "generateName": "research-agent-7d9f8b6c4-",
        "namespace": "agents",
        "labels": {"app.kubernetes.io/name": "research-agent"},
    }
    if annotations is not None:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "agent",
                "image": "ghcr.io/example/research-agent:1.0",
                "env": [{"name": "OPENAI_BASE_URL", "value": "http://127.0.0.1:15000/openai"}],
                "resources": {"requests": {"cpu": "250m", "memory": "256Mi"}},
            }
        ],
        "restartPolicy": "Always",
        "serviceAccountName": "default",
    }
    if init_containers is not None:
        spec["initContainers"] = init_containers
    if volumes is not None:
        spec["volumes"] = volumes
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def review(pod: Any, *, operation: str = "CREATE") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "agents",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


@pytest.fixture
async def webhook() -> AsyncIterator[aiohttp.ClientSession]:
    server = TestServer(inject.make_app(image=IMAGE), host="127.0.0.1", port=0)
    await server.start_server()
    async with aiohttp.ClientSession(base_url=server.make_url("/")) as session:
        yield session
    await server.close()


async def admit(
    session: aiohttp.ClientSession, pod: Pod, *, operation: str = "CREATE"
) -> tuple[dict[str, Any], Pod]:
    """Send the pod through the webhook; return its response and the pod it would create."""
    sent = review(pod, operation=operation)
    async with session.post("/mutate", json=sent) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["apiVersion"] == "admission.k8s.io/v1"
    assert body["kind"] == "AdmissionReview"
    response: dict[str, Any] = body["response"]
    assert response["uid"] == sent["request"]["uid"]
    assert response["allowed"] is True
    if "patch" not in response:
        assert "patchType" not in response
        return response, pod
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return response, jsonpatch.apply_patch(pod, ops)


def sidecar_of(pod: Pod) -> dict[str, Any]:
    sidecar: dict[str, Any] = pod["spec"]["initContainers"][0]
    assert sidecar["name"] == "agent-sidecar"
    return sidecar


def assert_native_sidecar(pod: Pod, *, image: str, configmap: str) -> None:
    sidecar = sidecar_of(pod)
    assert sidecar["image"] == image
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["startupProbe"]["httpGet"] == {"path": "/readyz", "port": 15021}
    assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 15021}
    assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 15021}
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}

    [mount] = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/etc/sidecar/policies"]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume == {"name": mount["name"], "configMap": {"name": configmap}}
    assert pod["metadata"]["annotations"]["sidecar.agent/status"] == "injected"


async def test_a_pod_without_init_containers_or_volumes_gets_the_sidecar(
    webhook: aiohttp.ClientSession, k8s_validate: Validate
) -> None:
    pod = make_pod(annotations={"sidecar.agent/inject": "true"})
    k8s_validate(pod)

    _, injected = await admit(webhook, pod)

    k8s_validate(injected)
    assert_native_sidecar(injected, image=IMAGE, configmap="agent-sidecar-policies")
    assert len(injected["spec"]["initContainers"]) == 1
    assert injected["spec"]["containers"] == pod["spec"]["containers"]
    assert injected["metadata"]["annotations"]["sidecar.agent/inject"] == "true"


async def test_existing_init_containers_volumes_and_annotations_are_kept(
    webhook: aiohttp.ClientSession, k8s_validate: Validate
) -> None:
    pod = make_pod(
        annotations={
            "sidecar.agent/inject": "true",
            "sidecar.agent/policies-configmap": "team-a-policies",
            "sidecar.agent/credentials-secret": "team-a-keys",
            "sidecar.agent/image": "registry.example/agent-sidecar:canary",
            "prometheus.io/scrape": "true",
        },
        init_containers=[
            {"name": "fetch-prompts", "image": "busybox:1.36", "command": ["true"]},
            {"name": "migrate", "image": "busybox:1.36", "command": ["true"]},
        ],
        volumes=[{"name": "cache", "emptyDir": {}}],
    )
    k8s_validate(pod)

    _, injected = await admit(webhook, pod)

    k8s_validate(injected)
    assert_native_sidecar(
        injected, image="registry.example/agent-sidecar:canary", configmap="team-a-policies"
    )
    # First, so the pod's own init containers can already call out through it.
    names = [c["name"] for c in injected["spec"]["initContainers"]]
    assert names == ["agent-sidecar", "fetch-prompts", "migrate"]
    volumes = injected["spec"]["volumes"]
    assert [v["name"] for v in volumes] == [
        "cache",
        "agent-sidecar-policies",
        "agent-sidecar-credentials",
    ]
    assert volumes[2]["secret"] == {"secretName": "team-a-keys"}
    mounts = {m["name"]: m for m in sidecar_of(injected)["volumeMounts"]}
    assert mounts["agent-sidecar-credentials"]["mountPath"] == "/var/run/secrets/agent-sidecar"
    assert "subPath" not in mounts["agent-sidecar-credentials"]
    assert injected["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


@pytest.mark.parametrize(
    "annotations",
    [
        None,
        {},
        {"prometheus.io/scrape": "true"},
        {"sidecar.agent/inject": "false"},
    ],
    ids=["no-annotations", "empty-annotations", "other-annotations", "inject-false"],
)
async def test_a_pod_not_annotated_for_injection_is_allowed_unchanged(
    webhook: aiohttp.ClientSession, annotations: dict[str, str] | None
) -> None:
    pod = make_pod(annotations=annotations, volumes=[{"name": "cache", "emptyDir": {}}])
    response, _ = await admit(webhook, pod)
    assert "patch" not in response


async def test_an_injected_pod_is_not_injected_twice(webhook: aiohttp.ClientSession) -> None:
    pod = make_pod(annotations={"sidecar.agent/inject": "true"})
    _, injected = await admit(webhook, pod)

    response, _ = await admit(webhook, injected)
    assert "patch" not in response

    # The sidecar alone, without the status annotation, is enough to leave a pod alone.
    del injected["metadata"]["annotations"]["sidecar.agent/status"]
    response, _ = await admit(webhook, injected)
    assert "patch" not in response


async def test_a_pod_that_spells_out_the_sidecar_is_left_alone(
    webhook: aiohttp.ClientSession,
) -> None:
    # k8s/deployment.yaml in a namespace where injection is on.
    [deployment] = yaml.safe_load_all((REPO / "k8s" / "deployment.yaml").read_text())
    template = copy.deepcopy(deployment["spec"]["template"])
    template["metadata"]["annotations"] = {"sidecar.agent/inject": "true"}
    pod = {"apiVersion": "v1", "kind": "Pod", **template}
    response, _ = await admit(webhook, pod)
    assert "patch" not in response


async def test_only_pod_creation_is_mutated(webhook: aiohttp.ClientSession) -> None:
    pod = make_pod(annotations={"sidecar.agent/inject": "true"})
    response, _ = await admit(webhook, pod, operation="UPDATE")
    assert "patch" not in response


def _review_with(**request: Any) -> bytes:
    body = review(make_pod(annotations={"sidecar.agent/inject": "true"}))
    body["request"].update(request)
    return json.dumps(body).encode()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "not JSON"),
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        (b"[]", "not an AdmissionReview"),
        (b'{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}', "v1"),
        (b'{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}', "request"),
        (_review_with(uid=None), "uid"),
        (_review_with(object=None), "request.object"),
        (_review_with(object={"metadata": {"annotations": ["x"]}}), "annotations"),
        (_review_with(object={"spec": {"initContainers": {"a": 1}}}), "initContainers"),
        (_review_with(object={"spec": "nope"}), "spec"),
    ],
    ids=[
        "empty",
        "broken-json",
        "not-utf8",
        "array",
        "v1beta1",
        "no-request",
        "no-uid",
        "no-object",
        "annotations-list",
        "init-containers-map",
        "spec-string",
    ],
)
async def test_a_malformed_review_is_a_400_with_a_json_reason(
    webhook: aiohttp.ClientSession, body: bytes, message: str
) -> None:
    async with webhook.post(
        "/mutate", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        text = await resp.text()
        assert resp.status == 400, text
        assert resp.content_type == "application/json"
    error = json.loads(text)["error"]
    assert message in error
    assert "Traceback" not in text


async def test_healthz(webhook: aiohttp.ClientSession) -> None:
    async with webhook.get("/healthz") as resp:
        assert resp.status == 200


# --- TLS, as the API server calls it ------------------------------------------------------


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
) -> x509.Certificate:
    """A CA when issuer is None, else a serving cert for localhost signed by issuer."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if issuer is None:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=0), True)
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), True
        )
    else:
        builder = builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


class Pki:
    """A CA (what caBundle would hold) that issues the injector's serving certificates."""

    def __init__(self, directory: Path) -> None:
        self.ca_key = _key()
        self.ca = _cert("agent-sidecar test CA", self.ca_key)
        self.cert_file = directory / "tls.crt"
        self.key_file = directory / "tls.key"

    def issue(self) -> x509.Certificate:
        """Write a fresh serving cert and key over the old ones, each file replaced atomically."""
        key = _key()
        cert = _cert(
            "agent-sidecar-injector.agent-sidecar.svc", key, ("agent-sidecar test CA", self.ca_key)
        )
        for path, data in (
            (
                self.key_file,
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                ),
            ),
            (self.cert_file, cert.public_bytes(serialization.Encoding.PEM)),
        ):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return cert

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(
            cadata=self.ca.public_bytes(serialization.Encoding.PEM).decode()
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# The real program, as the image's ENTRYPOINT runs it.
SIDECAR_INJECT = [sys.executable, "-m", "sidecar", "inject"]


async def _start_injector(pki: Pki) -> tuple[asyncio.subprocess.Process, int, list[str]]:
    """`sidecar inject` serving TLS on a free port: the process, its port, its stderr lines.

    It logs the port it was asked for (not the bound one), so `:0` cannot be used:
    a free port is picked, and picked again if someone took it before the bind.
    """
    for _ in range(5):
        port = _free_port()
        proc = await asyncio.create_subprocess_exec(
            *SIDECAR_INJECT,
            "--listen",
            f"127.0.0.1:{port}",
            "--tls-cert",
            str(pki.cert_file),
            "--tls-key",
            str(pki.key_file),
            "--image",
            IMAGE,
            cwd=REPO,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stderr is not None
        lines: list[str] = []
        async with asyncio.timeout(20):
            while not any("serving on" in line for line in lines):
                line = (await proc.stderr.readline()).decode()
                if not line:  # exited before serving
                    break
                lines.append(line)
        if any("serving on" in line for line in lines):
            return proc, port, lines
        await proc.wait()
        if not any("cannot listen" in line for line in lines):
            pytest.fail("sidecar inject did not start:\n" + "".join(lines))
    pytest.fail("sidecar inject found no free port in 5 tries")


@pytest.mark.process
async def test_run_serves_https_and_stops_on_sigterm(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    pki.issue()
    proc, port, lines = await _start_injector(pki)
    try:
        url = f"https://localhost:{port}"
        connector = aiohttp.TCPConnector(ssl=pki.client_context())
        async with aiohttp.ClientSession(base_url=url, connector=connector) as session:
            async with session.get("/healthz") as resp:
                assert resp.status == 200
            _, injected = await admit(
                session, make_pod(annotations={"sidecar.agent/inject": "true"})
            )
            assert sidecar_of(injected)["image"] == IMAGE
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), timeout=10)
    stderr = "".join(lines) + err.decode()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


@pytest.mark.process
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--tls-cert", "/nonexistent/tls.crt"], "--tls-cert and --tls-key go together"),
        (["--tls-cert", "/nonexistent/tls.crt", "--tls-key", "/nonexistent/tls.key"], "TLS"),
        (["--listen", "localhost"], "HOST:PORT"),
    ],
)
def test_run_explains_a_bad_command_line(args: list[str], error: str) -> None:
    proc = subprocess.run(
        [*SIDECAR_INJECT, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert error in proc.stderr
    assert "Traceback" not in proc.stderr


async def _served_serial(port: int, ctx: ssl.SSLContext) -> int:
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).serial_number
    finally:
        writer.close()
        await writer.wait_closed()


async def test_a_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    pki = Pki(tmp_path)
    first = pki.issue()
    server_ctx = inject._tls_context(str(pki.cert_file), str(pki.key_file))
    runner = web.AppRunner(inject.make_app(image=IMAGE))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = runner.addresses[0][1]
    watcher = asyncio.create_task(
        inject._reload_cert_when_changed(
            server_ctx, str(pki.cert_file), str(pki.key_file), interval=0.02
        )
    )
    try:
        client_ctx = pki.client_context()
        assert await _served_serial(port, client_ctx) == first.serial_number

        renewed = pki.issue()

        async def renewed_served() -> bool:
            return await _served_serial(port, client_ctx) == renewed.serial_number

        await eventually(renewed_served, "the renewed certificate served")
    finally:
        await stop_task(watcher)
        await runner.cleanup()
