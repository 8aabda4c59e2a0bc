"""The example manifests in k8s/: valid Kubernetes objects that fit together."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar import inject

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
Resource = dict[str, Any]


def load(name: str) -> list[Resource]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def one(name: str, kind: str) -> Resource:
    [found] = [doc for doc in load(name) if doc["kind"] == kind]
    return found


def by_name(items: list[Resource], name: str) -> Resource:
    [found] = [item for item in items if item["name"] == name]
    return found


ALL = [
    pytest.param(doc, id=f"{path.name}:{doc['kind']}/{doc['metadata']['name']}")
    for path in sorted(K8S.glob("*.yaml"))
    for doc in load(path.name)
]


def test_the_expected_manifests_exist() -> None:
    names = {p.name for p in K8S.glob("*.yaml")}
    assert {
        "deployment.yaml",
        "configmap.yaml",
        "secret.yaml",
        "injector.yaml",
        "mutatingwebhook.yaml",
    } <= names


@pytest.mark.parametrize("resource", ALL)
def test_every_manifest_is_valid(
    resource: Resource, k8s_validate: Callable[[Resource], None]
) -> None:
    k8s_validate(resource)


def pod_spec() -> Resource:
    spec: Resource = one("deployment.yaml", "Deployment")["spec"]["template"]["spec"]
    return spec


def test_the_sidecar_is_a_native_sidecar_with_admin_probes() -> None:
    spec = pod_spec()
    sidecar = spec["initContainers"][0]
    assert sidecar["name"] == "agent-sidecar"
    assert sidecar["restartPolicy"] == "Always"
    probes = {k: sidecar[k]["httpGet"] for k in ("startupProbe", "readinessProbe", "livenessProbe")}
    assert probes == {
        "startupProbe": {"path": "/readyz", "port": 15021},
        "readinessProbe": {"path": "/readyz", "port": 15021},
        "livenessProbe": {"path": "/healthz", "port": 15021},
    }
    env = {e["name"]: e["value"] for e in sidecar["env"]}
    assert env["SIDECAR_LISTEN"].startswith("127.0.0.1:"), "egress must stay on loopback"
    assert env["SIDECAR_ADMIN"].startswith("127.0.0.1:"), "admin needs a token elsewhere"
    assert env["SIDECAR_PROBES"] == "0.0.0.0:15021", "the kubelet probes over the pod IP"


def test_the_sidecar_in_the_deployment_is_the_one_the_webhook_injects() -> None:
    # Both describe one container; a fix to one that misses the other shows up here.
    sidecar = pod_spec()["initContainers"][0]
    injected = inject.sidecar_container(image=sidecar["image"], with_credentials=True)
    assert sidecar == injected


@pytest.mark.parametrize(
    ("name", "kind"),
    [("deployment.yaml", "Deployment"), ("injector.yaml", "Deployment")],
)
def test_every_container_is_locked_down(name: str, kind: str) -> None:
    spec = one(name, kind)["spec"]["template"]["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["automountServiceAccountToken"] is False
    for c in spec.get("initContainers", []) + spec["containers"]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]}, c["name"]
        assert set(c["resources"]) == {"requests", "limits"}, c["name"]
        assert set(c["resources"]["limits"]) >= {"cpu", "memory"}, c["name"]


def test_the_agent_calls_openai_through_the_sidecar() -> None:
    agent = by_name(pod_spec()["containers"], "agent")
    env = {e["name"]: e.get("value") for e in agent["env"]}
    assert env["OPENAI_BASE_URL"] == "http://127.0.0.1:15000/openai"
    # The agent holds no credential: it mounts neither the Secret nor the policies.
    assert "volumeMounts" not in agent
    assert not env["OPENAI_API_KEY"].startswith("sk-")

    # ... and /openai is a route of the policy the sidecar mounts.
    [policy_text] = one("configmap.yaml", "ConfigMap")["data"].values()
    services = yaml.safe_load(policy_text)["services"]
    prefixes = {svc.get("prefix", f"/{name}") for name, svc in services.items()}
    assert "/openai" in prefixes


def test_policies_come_from_the_configmap_as_a_directory() -> None:
    spec = pod_spec()
    configmap = one("configmap.yaml", "ConfigMap")
    sidecar = spec["initContainers"][0]
    mount = by_name(sidecar["volumeMounts"], "agent-sidecar-policies")
    assert "subPath" not in mount, "a subPath mount never sees a ConfigMap update"
    assert mount["mountPath"] == sidecar["args"][sidecar["args"].index("--policies") + 1]
    volume = by_name(spec["volumes"], "agent-sidecar-policies")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    for filename, text in configmap["data"].items():
        assert filename.endswith((".yaml", ".yml"))
        assert yaml.safe_load(text)["version"] == 1


@pytest.mark.process
def test_the_example_policy_passes_sidecar_validate(tmp_path: Path) -> None:
    # What a platform team's CI runs on the ConfigMap's files before applying it.
    for filename, text in one("configmap.yaml", "ConfigMap")["data"].items():
        (tmp_path / filename).write_text(text)
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar", "validate", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_every_file_secret_in_the_policy_is_a_key_of_the_mounted_secret() -> None:
    spec = pod_spec()
    secret = one("secret.yaml", "Secret")
    sidecar = spec["initContainers"][0]
    mount = by_name(sidecar["volumeMounts"], "agent-sidecar-credentials")
    assert "subPath" not in mount, "a subPath mount never sees a rotated Secret"
    volume = by_name(spec["volumes"], "agent-sidecar-credentials")
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]

    policy_text = "".join(one("configmap.yaml", "ConfigMap")["data"].values())
    paths = re.findall(r"\$\{file:([^}]+)\}", policy_text)
    assert paths, "the example policy reads its credential from a file"
    keys = set(secret.get("stringData", {})) | set(secret.get("data", {}))
    for path in paths:
        directory, _, key = path.rpartition("/")
        assert directory == mount["mountPath"], path
        assert key in keys, path


def test_the_webhook_reaches_the_injector_service() -> None:
    webhook_config = one("mutatingwebhook.yaml", "MutatingWebhookConfiguration")
    [webhook] = webhook_config["webhooks"]
    assert webhook["failurePolicy"] == "Ignore"
    assert webhook["sideEffects"] == "None"
    assert webhook["admissionReviewVersions"] == ["v1"]
    assert webhook["rules"] == [
        {
            "operations": ["CREATE"],
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "scope": "Namespaced",
        }
    ]

    target = webhook["clientConfig"]["service"]
    service = one("injector.yaml", "Service")
    assert (target["name"], target["namespace"]) == (
        service["metadata"]["name"],
        service["metadata"]["namespace"],
    )
    assert target["path"] == "/mutate"
    [port] = service["spec"]["ports"]
    assert port["port"] == target["port"]

    deployment = one("injector.yaml", "Deployment")
    pod = deployment["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    by_port_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    args = container["args"]
    assert args[0] == "inject"
    assert args[args.index("--listen") + 1] == f"0.0.0.0:{by_port_name[port['targetPort']]}"
    # The API server only calls webhooks over HTTPS: the cert and key must be mounted.
    [tls_mount] = container["volumeMounts"]
    for flag in ("--tls-cert", "--tls-key"):
        assert args[args.index(flag) + 1].startswith(tls_mount["mountPath"] + "/")


def test_the_injector_is_never_sent_its_own_pods() -> None:
    [webhook] = one("mutatingwebhook.yaml", "MutatingWebhookConfiguration")["webhooks"]
    namespace = one("injector.yaml", "Namespace")
    selector = webhook["namespaceSelector"]["matchLabels"]
    labels = namespace["metadata"].get("labels", {})
    assert not selector.items() <= labels.items()


def test_a_disruption_budget_keeps_one_injector_up() -> None:
    # The webhook fails open: a drain that evicted both replicas would let pods
    # start without a sidecar.
    deployment = one("injector.yaml", "Deployment")
    budget = one("injector.yaml", "PodDisruptionBudget")
    assert budget["apiVersion"] == "policy/v1"
    assert budget["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert budget["spec"]["minAvailable"] == 1 < deployment["spec"]["replicas"]
    selector = budget["spec"]["selector"]
    assert set(selector) == {"matchLabels"}
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selector["matchLabels"].items() <= pod_labels.items()
