"""`template: NAME`: what a service gets from a template, what the policy overrides,
and where errors point (the policy's FILE:LINE:COL, naming the template)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.policy.loader import load_policy
from sidecar.policy.models import BearerAuth, HeaderAuth
from sidecar.policy.templates import BUILTIN_DIR, catalog
from tests.helpers import ROOT
from tests.policy.test_loader import errors, write

BUILTINS = (
    "openai",
    "anthropic",
    "azure_openai",
    "gemini",
    "mistral",
    "ollama",
    "openwebui",
    "github",
    "gitlab",
    "slack",
    "stripe",
    "jira",
    "notion",
    "s3",
    "bedrock",
    "sts",
    "gcs",
    "vertex",
    "azure_blob",
)
# Templates that leave the upstream to the policy: the customer's own resource or site.
NEEDS_UPSTREAM = {
    "azure_openai": "https://example-resource.openai.azure.com",
    "jira": "https://example.atlassian.net",
    "azure_blob": "https://example.blob.core.windows.net",
}


def line_col(file: str, text: str) -> str:
    """LINE:COL where `text` starts in a template file, so tests survive edits to it."""
    for number, line in enumerate(Path(file).read_text().splitlines(), 1):
        if text in line:
            return f"{number}:{line.index(text) + 1}"
    raise AssertionError(f"{text!r} not in {file}")


def sidecar(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.process
def test_every_builtin_template_is_shipped_and_validates_through_the_cli(tmp_path: Path) -> None:
    assert sorted(catalog(None).templates) == sorted(BUILTINS)
    for name in BUILTINS:
        upstream = f"\n    upstream: {NEEDS_UPSTREAM[name]}" if name in NEEDS_UPSTREAM else ""
        (tmp_path / f"{name}.yaml").write_text(
            f"version: 1\nservices:\n  {name}:\n    template: {name}{upstream}\n"
        )
    done = sidecar("validate", str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"ok: {len(BUILTINS)} services from {len(BUILTINS)} files"


def test_each_builtin_template_fills_what_its_provider_needs(tmp_path: Path) -> None:
    lines = ["version: 1", "services:"]
    for name in BUILTINS:
        lines += [f"  {name}:", f"    template: {name}"]
        if name in NEEDS_UPSTREAM:
            lines.append(f"    upstream: {NEEDS_UPSTREAM[name]}")
    write(tmp_path, "all.yaml", "\n".join(lines) + "\n")
    services = load_policy(str(tmp_path), resolve_secrets=False).services
    spec = {name: services[name].spec for name in BUILTINS}
    assert all(s.template == name for name, s in spec.items())

    openai = spec["openai"]
    assert openai.upstream == "https://api.openai.com/v1"
    assert isinstance(openai.auth, BearerAuth)
    assert openai.auth.token.source == "${env:OPENAI_API_KEY}"
    assert openai.timeout.total >= 300 and openai.timeout.idle is not None
    assert openai.limits.retry_after == ["retry-after-ms", "retry-after"]
    assert ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens") in [
        (q.remaining, q.reset) for q in openai.limits.quota
    ]

    anthropic = spec["anthropic"]
    assert isinstance(anthropic.auth, HeaderAuth) and anthropic.auth.name == "x-api-key"
    assert anthropic.headers.default == {"anthropic-version": "2023-06-01"}
    assert any(q.remaining.startswith("anthropic-ratelimit-") for q in anthropic.limits.quota)

    azure = spec["azure_openai"]
    assert isinstance(azure.auth, HeaderAuth) and azure.auth.name == "api-key"
    assert "api-version" in azure.query.default

    gemini = spec["gemini"]
    assert isinstance(gemini.auth, HeaderAuth) and gemini.auth.name == "x-goog-api-key"

    for local in ("ollama", "openwebui"):
        assert spec[local].auth is None
        assert spec[local].upstream.startswith("http://127.0.0.1:")
    assert spec["notion"].headers.default.keys() == {"Notion-Version"}
    assert spec["jira"].auth is not None and spec["jira"].auth.type == "basic"


def test_the_policy_overrides_every_key_the_template_sets(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          llm:
            template: openai
            upstream: http://127.0.0.1:9/v1
            auth: {type: header, name: X-Key, value: k}
            headers: {set: {X-Team: research}}
            timeout: {total: 30s}
            retry: {on: [connect-error]}
            circuit_breaker: null
            limits: {quota: []}
        """,
    )
    spec = load_policy(str(tmp_path)).services["llm"].spec
    assert spec.upstream == "http://127.0.0.1:9/v1"
    # Another auth type replaces the template's whole: no bearer `token` left over.
    assert isinstance(spec.auth, HeaderAuth) and spec.auth.name == "X-Key"
    assert spec.headers.set == {"X-Team": "research"}
    # Mappings merge: connect and idle still the template's.
    assert spec.timeout.total == 30 and spec.timeout.connect == 5 and spec.timeout.idle == 300
    # Lists are replaced, the rest of the mapping kept.
    assert spec.retry is not None and spec.retry.on == ["connect-error"]
    assert spec.retry.attempts == 3 and spec.retry.backoff.max == 10
    assert spec.circuit_breaker is None  # null removes the template's key
    assert spec.limits.quota == [] and spec.limits.retry_after == ["retry-after-ms", "retry-after"]


def test_unknown_template_points_at_its_name_with_a_hint(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          ai:
            template: opnai
          other:
            template: [openai]
            upstream: http://x
        """,
    )
    # Only the name: no "'upstream' is required" for a service whose template is unknown.
    assert errors(tmp_path) == [
        f"{tmp_path}/p.yaml:4:15: unknown template 'opnai' (did you mean 'openai'?)",
        f"{tmp_path}/p.yaml:6:15: Input should be a valid string",
    ]


def test_errors_in_the_policy_keep_their_place_and_template_keys_name_the_template(
    tmp_path: Path,
) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          ai:
            template: openai
            retry: {attempts: 99}
            timout: {total: 1s}
          az:
            template: azure_openai
        """,
    )
    openai, azure = f"{BUILTIN_DIR}/openai.yaml", f"{BUILTIN_DIR}/azure_openai.yaml"
    assert errors(tmp_path, env={}) == [
        f"{tmp_path}/p.yaml:4:15: environment variable OPENAI_API_KEY is not set "
        f"(auth.token from template 'openai' at {openai}:{line_col(openai, '${env:')})",
        f"{tmp_path}/p.yaml:5:23: Input should be less than or equal to 10",
        f"{tmp_path}/p.yaml:6:5: unknown key 'timout' (did you mean 'timeout'?)",
        f"{tmp_path}/p.yaml:7:3: 'upstream' is required (template 'azure_openai' leaves it to "
        "the policy: https://<resource>.openai.azure.com)",
        f"{tmp_path}/p.yaml:8:15: environment variable AZURE_OPENAI_API_KEY is not set "
        f"(auth.value from template 'azure_openai' at {azure}:{line_col(azure, '${env:')})",
    ]


@pytest.mark.process
def test_a_user_template_beside_the_policies_is_found_and_wins_over_a_builtin(
    tmp_path: Path,
) -> None:
    (tmp_path / "templates").mkdir()
    write(
        tmp_path,
        "templates/internal.yaml",
        """
        # Our billing API.
        description: Internal billing API
        service:
          upstream: https://billing.internal
          auth: {type: bearer, token: "${env:BILLING_TOKEN}"}
          timeout: {total: 5s}
        """,
    )
    write(
        tmp_path,
        "templates/github.yaml",
        """
        description: GitHub Enterprise of our company
        service:
          upstream: https://github.example.com/api/v3
        """,
    )
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          billing: {template: internal}
          github: {template: github}
        """,
    )
    policy = load_policy(str(tmp_path), env={"BILLING_TOKEN": "b"})
    assert policy.services["billing"].spec.upstream == "https://billing.internal"
    assert policy.services["billing"].spec.timeout.total == 5
    assert policy.services["github"].spec.upstream == "https://github.example.com/api/v3"
    assert policy.services["github"].spec.auth is None  # the user's template, not merged

    # Editing a template changes the policy's version, so a reload picks it up.
    template = tmp_path / "templates" / "internal.yaml"
    template.write_text(template.read_text().replace("5s", "6s"))
    assert load_policy(str(tmp_path), env={"BILLING_TOKEN": "b"}).version != policy.version

    done = sidecar("templates", "--policies", str(tmp_path))
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()}
    assert "Internal billing API" in lines["internal"]
    assert lines["internal"].endswith(f"[{tmp_path}/templates/internal.yaml]")
    assert lines["github"].endswith(f"[{tmp_path}/templates/github.yaml]")
    assert lines["openai"].endswith("[built-in]")


def test_a_broken_user_template_is_reported_in_its_own_file(tmp_path: Path) -> None:
    (tmp_path / "templates").mkdir()
    write(
        tmp_path,
        "templates/bad.yaml",
        """
        descripton: typo
        service:
          upstream: http://x
          timout: 1s
        """,
    )
    write(tmp_path, "p.yaml", "version: 1\nservices:\n  s: {template: bad}\n")
    bad = f"{tmp_path}/templates/bad.yaml"
    assert errors(tmp_path) == [
        f"{tmp_path}/p.yaml:3:17: template 'bad' has errors (see {bad})",
        f"{bad}:1:1: unknown key 'descripton' (did you mean 'description'?)",
        f"{bad}:1:1: 'description' is required in a template",
    ]
    # A template key error is reported at the policy's template line, naming the template.
    fixed = "description: x\nservice:\n  upstream: http://x\n  timout: 1s\n"
    write(tmp_path, "templates/bad.yaml", fixed)
    assert errors(tmp_path) == [
        f"{tmp_path}/p.yaml:3:17: unknown key 'timout' (did you mean 'timeout'?) "
        f"(timout from template 'bad' at {bad}:4:11)"
    ]


@pytest.mark.process
@pytest.mark.parametrize("name", [n for n in BUILTINS if n not in NEEDS_UPSTREAM])
def test_templates_show_prints_a_policy_that_validates(tmp_path: Path, name: str) -> None:
    done = sidecar("templates", "show", name)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"# template '{name}': ")
    write(tmp_path, "shown.yaml", done.stdout)
    spec = load_policy(str(tmp_path), resolve_secrets=False).services[name].spec
    assert spec.template is None  # expanded: the keys themselves, no reference left


@pytest.mark.process
def test_templates_show_an_unknown_name() -> None:
    done = sidecar("templates", "show", "antropic")
    assert done.returncode == 1
    assert done.stderr.strip() == "sidecar: unknown template 'antropic' (did you mean 'anthropic'?)"


def test_example_policies_load() -> None:
    policy = load_policy(str(ROOT / "policies"), env={"OPENAI_API_KEY": "k", "GITHUB_TOKEN": "t"})
    assert {"openai", "github"} <= set(policy.services)


def test_docs_describe_every_builtin_template_and_its_key() -> None:
    doc = (ROOT / "docs" / "templates.md").read_text()
    sections = {part.split("`", 2)[1]: part for part in doc.split("\n### ")[1:]}
    for name, template in catalog(None).templates.items():
        assert name in sections, f"docs/templates.md has no section for {name}"
        text = (ROOT / "sidecar" / "templates" / f"{name}.yaml").read_text()
        for var in re.findall(r"\$\{env:([A-Z_]+)\}", text):
            assert var in sections[name], f"{name}: {var} not documented"
        row = next(line for line in doc.splitlines() if line.startswith(f"| `{name}` |"))
        for header in template.service.get("limits", {}).get("retry_after", ["Retry-After"]):
            assert f"`{header}`".lower() in row.lower(), f"{name}: {header} not in its row"


def test_the_schema_lets_a_template_stand_in_for_the_upstream() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from sidecar.policy.models import PolicyFile

    schema = PolicyFile.model_json_schema()
    jsonschema.validate({"version": 1, "services": {"a": {"template": "openai"}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"version": 1, "services": {"a": {"prefix": "/a"}}}, schema)


def test_a_key_the_policy_writes_is_reported_as_its_own(tmp_path: Path) -> None:
    write(
        tmp_path,
        "p.yaml",
        """
        version: 1
        services:
          az:
            template: azure_openai
            upstream: ftp://example
        """,
    )
    assert errors(tmp_path, resolve_secrets=False) == [
        f"{tmp_path}/p.yaml:5:15: upstream must start with http:// or https://"
    ]
