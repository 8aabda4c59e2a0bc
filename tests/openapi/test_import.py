"""`sidecar import openapi`: real public documents in, a policy that `sidecar validate`
accepts as it is out; and the generated policy serving real calls."""

from __future__ import annotations

import json
import lzma
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import StartSidecar, echo_app

pytestmark = pytest.mark.process

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "openapi"


def sidecar(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


@pytest.fixture(scope="module")
def github(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """GitHub's REST description (13 MB), unpacked from the vendored xz once per module."""
    path = tmp_path_factory.mktemp("github") / "api.github.com.json"
    path.write_bytes(lzma.decompress((DATA / "api.github.com.json.xz").read_bytes()))
    return path


def import_into(directory: Path, spec: Path, *args: str) -> dict[str, Any]:
    """Import next to a copy of the document, the way a team keeps them; validate the dir."""
    directory.mkdir(exist_ok=True)
    copy = directory / spec.name
    if not copy.exists():
        shutil.copy(spec, copy)
    out = directory / "service.yaml"
    done = sidecar("import", "openapi", str(copy), "-o", str(out), *args)
    assert done.returncode == 0, done.stderr
    checked = sidecar("validate", str(directory))
    assert checked.returncode == 0, checked.stderr + out.read_text()
    assert checked.stdout.startswith("ok: 1 services")
    policy: dict[str, Any] = yaml.safe_load(out.read_text())
    return policy


@pytest.mark.parametrize(
    ("document", "name", "upstream", "auth"),
    [
        (
            "petstore.yaml",
            "petstore",
            "http://petstore.swagger.io/v2",
            {"type": "header", "name": "api_key", "value": "${env:PETSTORE_API_KEY}"},
        ),
        (
            "petstore-3.1.json",
            "petstore",
            "http://petstore.swagger.io/v2",
            {"type": "header", "name": "api_key", "value": "${env:PETSTORE_API_KEY}"},
        ),
        (
            "security.yaml",
            "httpbin",
            "https://httpbin.org",
            {"type": "query", "name": "apiKey", "value": "${env:HTTPBIN_API_KEY}"},
        ),
        # Its only scheme is an authorization-code flow, which needs a person: no auth.
        ("train-travel.yaml", "example", "https://api.example.com", None),
    ],
)
def test_import_public_documents(
    tmp_path: Path, document: str, name: str, upstream: str, auth: dict[str, str] | None
) -> None:
    policy = import_into(tmp_path / "p", DATA / document)
    [(service, spec)] = policy["services"].items()
    assert service == name
    assert spec["upstream"] == upstream
    assert spec.get("auth") == auth
    assert spec["openapi"] == document
    assert spec["validate"] == {
        "requests": "enforce",
        "responses": "report",
        "unknown_operations": "allow",
    }


def test_import_github_the_large_one(tmp_path: Path, github: Path) -> None:
    policy = import_into(tmp_path / "p", github, "--name", "gh")
    spec = policy["services"]["gh"]
    assert spec["upstream"] == "https://api.github.com"
    assert "auth" not in spec  # the document declares no security scheme
    text = (tmp_path / "p" / "service.yaml").read_text()
    assert "# NOTE: no auth: the document declares no security scheme" in text
    # One commented allow example per tag, naming real operation ids.
    assert "#   # issues (Interact with GitHub Issues.)" in text
    assert "operations: [issues/list, " in text


@pytest.mark.parametrize(
    ("scheme", "auth"),
    [
        ("bearer", {"type": "bearer", "token": "${env:HTTPBIN_TOKEN}"}),
        (
            "basic",
            {
                "type": "basic",
                "username": "${env:HTTPBIN_USERNAME}",
                "password": "${env:HTTPBIN_PASSWORD}",
            },
        ),
        (
            "apiKey_header",
            {"type": "header", "name": "X-API-KEY", "value": "${env:HTTPBIN_API_KEY}"},
        ),
        (
            "oauth2_clientCredentials",
            {
                "type": "oauth2_client_credentials",
                "token_url": "http://alt.example.com/oauth/token",
                "client_id": "${env:HTTPBIN_CLIENT_ID}",
                "client_secret": "${env:HTTPBIN_CLIENT_SECRET}",
            },
        ),
        # A cookie is no credential the sidecar injects: the next scheme the document lists.
        (
            "apiKey_cookie",
            {"type": "header", "name": "X-API-KEY", "value": "${env:HTTPBIN_API_KEY}"},
        ),
    ],
)
def test_each_kind_of_security_scheme(tmp_path: Path, scheme: str, auth: dict[str, str]) -> None:
    """The document's own `security` requirement picks the scheme."""
    document = yaml.safe_load((DATA / "security.yaml").read_text())
    document["security"] = [{scheme: []}]
    if scheme == "apiKey_cookie":
        document["security"].append({"apiKey_header": []})
    directory = tmp_path / "p"
    directory.mkdir()
    (directory / "security.json").write_text(json.dumps(document))
    policy = import_into(directory, directory / "security.json")
    assert policy["services"]["httpbin"]["auth"] == auth


def test_import_refuses_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "swagger.json").write_text('{"swagger": "2.0", "paths": {}}')
    done = sidecar("import", "openapi", str(tmp_path / "swagger.json"))
    assert done.returncode == 1
    assert "Swagger 2.0 is not supported" in done.stderr
    done = sidecar("import", "openapi", str(DATA / "petstore.yaml"), "--name", "_x")
    assert done.returncode == 2
    assert "may hold only letters" in done.stderr


def test_validate_points_at_a_broken_document(tmp_path: Path) -> None:
    (tmp_path / "broken.json").write_text(
        '{"openapi": "3.0.3", "paths": {"/a": {"get": {"parameters": [{"$ref": "#/nope"}],'
        ' "responses": {}}}}}'
    )
    (tmp_path / "policy.yaml").write_text(
        "version: 1\nservices:\n  a:\n    upstream: http://x\n    openapi: broken.json\n"
    )
    done = sidecar("validate", str(tmp_path))
    assert done.returncode == 1
    assert done.stderr.strip() == (
        f"{tmp_path}/policy.yaml:5:14: {tmp_path}/broken.json: GET /a: "
        "$ref '#/nope' names nothing in the document"
    )


async def test_the_generated_github_policy_validates_real_calls(
    tmp_path: Path,
    github: Path,
    upstream: Any,
    start_sidecar: StartSidecar,
    client: aiohttp.ClientSession,
) -> None:
    echo = await upstream(echo_app())
    out = tmp_path / "github.yaml"
    done = sidecar(
        "import", "openapi", str(github), "--upstream", echo, "-o", str(out), cwd=tmp_path
    )
    assert "wrote service 'github-s-official" in done.stderr  # no name from an IP address
    assert done.returncode == 0, done.stderr
    # The generated reference is relative to the file; the test sidecar's policy lives elsewhere.
    text = re.sub(r'openapi: ".*"', f'openapi: "${{file:{github}}}"', out.read_text())
    sc = await start_sidecar(text.replace("github-s-official-openapi-spec-octokit-e:", "github:"))
    async with client.get(f"{sc.url}/github/repos/octo/hello/issues?per_page=abc") as resp:
        assert resp.status == 422
        body = await resp.json(content_type=None)
    assert body["operation"] == "issues/list-for-repo"
    assert body["errors"] == [
        {
            "in": "query",
            "name": "per_page",
            "pointer": "",
            "message": '"abc" is not of type "integer"',
        }
    ]
    async with client.post(f"{sc.url}/github/repos/octo/hello/issues", json={"body": "x"}) as resp:
        body = await resp.json(content_type=None)
    assert body["errors"][0]["message"] == '"title" is a required property'
    async with client.post(
        f"{sc.url}/github/repos/octo/hello/issues", json={"title": "It broke", "labels": ["bug"]}
    ) as resp:
        assert resp.status == 200
        echoed = await resp.json()
    assert echoed["path"] == "/repos/octo/hello/issues"


def test_import_to_another_directory_copies_the_document_beside_the_policy(
    tmp_path: Path,
) -> None:
    specs, policies = tmp_path / "specs", tmp_path / "policies"
    specs.mkdir()
    policies.mkdir()
    shutil.copy(DATA / "petstore.yaml", specs / "petstore.yaml")
    out = policies / "pets.yaml"
    done = sidecar("import", "openapi", str(specs / "petstore.yaml"), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert f"copied {specs / 'petstore.yaml'} beside the policy" in done.stderr
    policy = yaml.safe_load(out.read_text())
    assert policy["services"]["petstore"]["openapi"] == "petstore.yaml"
    # The policy directory alone, as a ConfigMap mounts it, still validates.
    mounted = tmp_path / "configmap"
    shutil.copytree(policies, mounted)
    shutil.rmtree(specs)
    checked = sidecar("validate", str(mounted))
    assert checked.returncode == 0, checked.stderr
    # Another document of the same name there is never overwritten.
    (policies / "petstore.yaml").write_text("openapi: 3.0.0\ninfo: {title: x, version: '1'}\n")
    shutil.copytree(tmp_path / "configmap", specs, dirs_exist_ok=True)
    (specs / "petstore.yaml").write_bytes((DATA / "petstore.yaml").read_bytes())
    again = sidecar("import", "openapi", str(specs / "petstore.yaml"), "-o", str(out))
    assert again.returncode == 1
    assert "is another document" in again.stderr
