"""docs/policy.md and `sidecar schema` must describe every key of the format."""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.policy.models import PolicyFile

ROOT = Path(__file__).resolve().parents[1]


def test_every_policy_key_is_documented() -> None:
    schema = PolicyFile.model_json_schema()
    doc = (ROOT / "docs" / "policy.md").read_text()
    documented = set(re.findall(r"`([a-z_]+)`", doc))
    missing = []
    for name, definition in [("PolicyFile", schema), *schema["$defs"].items()]:
        for key, prop in definition.get("properties", {}).items():
            if key not in documented:
                missing.append(f"{name}.{key}")
            if name != "PolicyFile" and "description" not in prop and "$ref" not in prop:
                # Keys explained only in docs/ are fine; the schema needs a type at least.
                assert "type" in prop or "anyOf" in prop or "enum" in prop or "const" in prop, key
    assert missing == []


def test_readme_starts_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]
