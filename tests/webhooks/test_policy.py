"""The `webhooks:` keys: checked by `sidecar validate` with FILE:LINE:COL like the rest."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml

from sidecar.policy.loader import PolicyError, load_policy
from sidecar.policy.models import PolicyFile
from sidecar.policy.secrets import SecretResolver
from sidecar.policy.webhooks import DEFAULT_SCHEDULE, Webhooks, merge

GOOD = """
version: 1
webhooks:
  inbound:
    github:
      path: /hooks/github
      verify: {type: github, secrets: "${env:GH_SECRET}"}
      routes:
        - match: {header: {X-GitHub-Event: push}}
          deliver_to: http://127.0.0.1:8080/events
  outbound:
    events:
      signing: {secrets: ["${env:WHSEC}"]}
      endpoints:
        - {name: crm, url: "https://crm.example.com/hooks", events: ["invoice.*"]}
"""


def errors(tmp_path: Path, text: str) -> list[str]:
    (tmp_path / "p.yaml").write_text(textwrap.dedent(text).lstrip("\n"))
    with pytest.raises(PolicyError) as info:
        load_policy(str(tmp_path), env={"GH_SECRET": "s", "WHSEC": "whsec_c2VjcmV0"})
    return [str(p).removeprefix(str(tmp_path) + "/") for p in info.value.problems]


def test_a_good_policy_loads_with_defaults(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(GOOD)
    load_policy(str(tmp_path), env={"GH_SECRET": "s", "WHSEC": "whsec_c2VjcmV0"})
    # Only the checks of form without --resolve-secrets, as in CI.
    load_policy(str(tmp_path), resolve_secrets=False)
    model = PolicyFile.model_validate(
        yaml.safe_load(GOOD), context={"secrets": SecretResolver(check_only=True)}
    )
    assert model.webhooks is not None
    assert model.webhooks.inbound["github"].verify.secrets[0].source == "${env:GH_SECRET}"


def test_bad_keys_are_reported_with_their_position(tmp_path: Path) -> None:
    text = GOOD.replace("      routes:", "      retries: 3\n      routes:")
    assert errors(tmp_path, text) == ["p.yaml:7:7: unknown key 'retries' (did you mean 'retry'?)"]
    text = GOOD.replace("type: github", "type: gitlab")
    assert errors(tmp_path, text)[0].startswith("p.yaml:6:22: Input should be 'standard'")
    text = GOOD.replace("https://crm.example.com/hooks", "ftp://crm")
    assert errors(tmp_path, text) == ["p.yaml:14:28: 'ftp://crm' is not an http:// or https:// URL"]
    text = GOOD.replace('signing: {secrets: ["${env:WHSEC}"]}', "signing: {secrets: [not-a-key]}")
    assert errors(tmp_path, text) == [
        "p.yaml:12:16: a Standard Webhooks key starts with whsec_, whpk_ or whsk_"
    ]
    text = GOOD.replace("type: github,", "type: github, header: X-Sig,")
    assert errors(tmp_path, text) == ["p.yaml:6:15: header: only for type: hmac, not github"]


def test_defaults_and_merge() -> None:
    spec = Webhooks.model_validate(
        {
            "inbound": {"a": {"path": "/a", "verify": {"type": "slack", "secrets": "x"}}},
            "outbound": {
                "o": {
                    "signing": {"secrets": "whsec_c2VjcmV0"},
                    "endpoints": [{"name": "e", "url": "https://e.example.com/"}],
                }
            },
        }
    )
    hook = spec.inbound["a"]
    assert tuple(hook.retry.schedule) == DEFAULT_SCHEDULE
    assert (hook.verify.tolerance, hook.dedup_window, hook.max_body) == (300, 86400, 1 << 20)
    assert spec.outbound["o"].endpoints[0].events == ["*"]
    other = Webhooks.model_validate(
        {"inbound": {"b": {"path": "/a", "verify": {"type": "slack", "secrets": "x"}}}}
    )
    merged, clashes = merge([spec, other, spec])
    assert clashes == [
        "path /a of 'b' is already used by 'a'",
        "inbound webhook 'a' is defined twice",
        "outbound webhook 'o' is defined twice",
    ]
    assert list(merged.inbound) == ["a"]


def test_the_store_key(tmp_path: Path) -> None:
    text = GOOD.replace("webhooks:\n", "webhooks:\n  store: {backend: 'http://redis:6379'}\n")
    assert errors(tmp_path, text) == [
        "p.yaml:3:20: backend must be a redis://, rediss:// or unix:// URL"
    ]
    text = GOOD.replace("webhooks:\n", "webhooks:\n  store: {retention: 0s}\n")
    assert errors(tmp_path, text)[0].startswith("p.yaml:3:22: Input should be greater than 0")
    spec = Webhooks.model_validate(
        {"store": {"backend": "redis://:hunter2@redis:6379/0", "retention": "24h"}}
    )
    assert (spec.store.claim_idle, spec.store.retention) == (60, 86400)
    # Shown (schema, /config) with its password masked.
    assert spec.model_dump(mode="json")["store"]["backend"] == "redis://:***@redis:6379/0"
    # Files that agree on the store merge; files that disagree clash.
    plain = Webhooks.model_validate({})
    merged, clashes = merge([plain, spec, spec])
    assert clashes == [] and merged.store == spec.store
    other = Webhooks.model_validate({"store": {"backend": "redis://other:6379/0"}})
    assert merge([spec, other])[1] == ["webhooks.store is set differently in two files"]
    assert merge([plain])[0].store.backend is None
