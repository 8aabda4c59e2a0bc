"""docs/policy.md and `sidecar schema` must describe every key of the format.

Each model of the schema is documented in its own part of docs/policy.md: a
key counts only where a reader of that model would look for it (its table
row, or the row of the key that holds it), not anywhere in the file.
"""

from __future__ import annotations

import re
from pathlib import Path

from sidecar.policy.models import PolicyFile

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "policy.md"

# model -> (section, row): the keys must be first-column entries of a table in
# `section`; with a row, they must appear in that section's row for `row` instead.
# Auth kinds are rows of the kinds table, named by their `type`.
WHERE: dict[str, tuple[str, str | None]] = {
    "PolicyFile": ("Top level", None),
    "Agents": ("agents", None),
    "JwtVerify": ("verify (agents)", None),
    "AllowRule": ("allow", None),
    "Service": ("Service", None),
    "HeaderRules": ("Service", "headers"),
    "QueryRules": ("Service", "query"),
    "UpstreamLimits": ("limits", None),
    "Quota": ("limits", "quota"),
    "Timeout": ("timeout", None),
    "RateLimit": ("rate_limit", None),
    "Retry": ("retry", None),
    "Backoff": ("retry", "backoff"),
    "RetryBudget": ("retry", "budget"),
    "CircuitBreaker": ("circuit_breaker", None),
    "BearerAuth": ("auth", "bearer"),
    "HeaderAuth": ("auth", "header"),
    "QueryAuth": ("auth", "query"),
    "BasicAuth": ("auth", "basic"),
    "OAuth2ClientCredentials": ("auth/oauth2_client_credentials", None),
    "JwtAuth": ("auth/jwt", None),
    "AwsSigV4Auth": ("auth/aws_sigv4", None),
    "WebIdentity": ("auth/aws_sigv4", "web_identity"),
    "GcpAuth": ("auth/gcp", None),
    "AzureAuth": ("auth/azure", None),
    "ManagedIdentity": ("auth/azure", "managed_identity"),
    "WorkloadIdentity": ("auth/azure", "workload_identity"),
    "Objects": ("objects", None),
    "ObjectRule": ("objects", "rules"),
    "Webhooks": ("webhooks", None),
    "InboundWebhook": ("webhooks.inbound", None),
    "Validate": ("validate", None),
    "Verify": ("verify", None),
    "Route": ("routes", None),
    "Match": ("match", None),
    "ValueMatch": ("value tests", None),
    "OutboundWebhook": ("webhooks.outbound", None),
    "OutboundEndpoint": ("endpoints", None),
    "Signing": ("signing", None),
    "DeliveryRetry": ("webhook retry", None),
    "GraphQL": ("graphql", None),
    "GraphQLRule": ("graphql.allow", None),
    "MCP": ("mcp", None),
    "LLM": ("llm", None),
    "Budget": ("budget", None),
    "Price": ("prices", None),
    "WebhookStore": ("webhooks.store", None),
    "MockAnswer": ("mock", None),
    "MockMatch": ("mock", "match"),
    "Cassettes": ("cassettes", None),
    "CassetteMatch": ("cassettes", "match"),
    "Faults": ("faults", None),
    "DelayFault": ("faults", "delay"),
    "AbortFault": ("faults", "abort"),
    "ResetFault": ("faults", "reset"),
    "BandwidthFault": ("faults", "bandwidth"),
    "SSEFault": ("faults", "sse"),
    "Cache": ("cache", None),
    "Check": ("check", None),
    "Files": ("files", None),
    "Admin": ("admin", None),
    "Alerts": ("alerts", None),
    "Receiver": ("alerts.receivers", None),
    "Rule": ("alerts.rules", None),
    "Database": ("databases", None),
    "DatabaseTls": ("databases.tls", None),
    "DatabaseAuth": ("databases.auth", None),
    "DatabasePool": ("databases.pool", None),
    "DatabaseRateLimit": ("databases.rate_limit", None),
    "StatementRule": ("databases.allow", None),
}

_TICKED = re.compile(r"`([A-Za-z_]+)`")


def sections(doc: str) -> dict[str, str]:
    """Heading (backticks dropped) -> its text; "auth/<kind>" for the `<kind>`: sub-tables."""
    out: dict[str, str] = {}
    name = ""
    for line in doc.splitlines():
        heading = re.match(r"#{1,6}\s+(.*)", line)
        sub = re.fullmatch(r"`(\w+)`:", line.strip())
        if heading:
            name = heading.group(1).replace("`", "").strip()
            continue
        if sub and name.split("/")[0] == "auth":
            name = f"auth/{sub.group(1)}"
            continue
        out[name] = out.get(name, "") + line + "\n"
    return out


def rows(text: str) -> dict[str, str]:
    """Table rows of a section by each key named in their first cell."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        first = line.split("|")[1]
        for key in _TICKED.findall(first):
            out[key] = line
    return out


def undocumented(doc: str) -> list[str]:
    schema = PolicyFile.model_json_schema()
    parts = sections(doc)
    missing = []
    for model, definition in [("PolicyFile", schema), *schema["$defs"].items()]:
        if model not in WHERE:
            missing.append(f"{model}: no section of docs/policy.md is mapped to it")
            continue
        section, row = WHERE[model]
        text = parts.get(section)
        if text is None:
            missing.append(f"{model}: no section {section!r}")
            continue
        table = rows(text)
        if row is not None and row not in table:
            missing.append(f"{model}: no row {row!r} in section {section!r}")
            continue
        for key in definition.get("properties", {}):
            if key == "type" and model.endswith(("Auth", "Credentials")):
                continue  # the kind's row or sub-table is named after its type
            found = key in _TICKED.findall(table[row]) if row is not None else key in table
            if not found:
                missing.append(f"{model}.{key} (in {section!r}{f' row {row!r}' if row else ''})")
    return missing


def test_every_policy_key_is_documented_in_its_section() -> None:
    assert undocumented(DOC.read_text()) == []


def test_a_key_moved_out_of_its_section_is_reported() -> None:
    """The check itself: a key documented elsewhere in the file does not count."""
    doc = DOC.read_text()
    idle = next(line for line in doc.splitlines() if line.startswith("| `idle` |"))
    moved = doc.replace(idle + "\n", "").replace("## `agents`", f"{idle}\n\n## `agents`")
    assert undocumented(moved) == ["Timeout.idle (in 'timeout')"]
    backoff = next(line for line in doc.splitlines() if line.startswith("| `backoff` |"))
    without_max = doc.replace(backoff, backoff.replace("`max`", "max"))
    assert undocumented(without_max) == ["Backoff.max (in 'retry' row 'backoff')"]
    jwt_kid = next(line for line in doc.splitlines() if line.startswith("| `kid` |"))
    assert undocumented(doc.replace(jwt_kid + "\n", "")) == ["JwtAuth.kid (in 'auth/jwt')"]


def test_schema_gives_every_key_a_type() -> None:
    schema = PolicyFile.model_json_schema()
    for definition in schema["$defs"].values():
        for key, prop in definition.get("properties", {}).items():
            if "description" not in prop and "$ref" not in prop:
                # Keys explained only in docs/ are fine; the schema needs a type at least.
                assert "type" in prop or "anyOf" in prop or "enum" in prop or "const" in prop, key


def test_readme_starts_with_the_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    block = readme.split("```sh", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["make run", "make test"]
