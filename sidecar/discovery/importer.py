"""`sidecar import openapi SPEC`: a service policy written from an OpenAPI document.

The output is a starting point a platform team reviews, and it passes
`sidecar validate` as it is: the upstream from `servers`, the credential from
`securitySchemes` as `${env:...}` placeholders (never a value), the `openapi:`
reference with validation on, and commented allow-rule examples, one per tag.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from ..openapi.document import METHODS, Document
from ..policy.models import Service

PLACEHOLDER_UPSTREAM = "https://api.example.invalid"
_NAME = re.compile(r"[^a-z0-9]+")
# Per tag, the comment lists this many operations; the rest are counted.
_SHOWN = 6


@dataclass
class Imported:
    name: str
    upstream: str
    auth: list[str] = field(default_factory=list)  # YAML lines of the auth block, or none
    notes: list[str] = field(default_factory=list)  # comments: what could not be mapped


def service_name(document: Document, fallback: str, upstream: str | None = None) -> str:
    """A short service name: from the upstream's host (`api.github.com` -> `github`), else
    the document's title (`Train Travel API` -> `train-travel-api`), else `fallback`."""
    host = urlsplit(upstream or "").hostname or ""
    labels = [part for part in host.split(".") if part not in ("api", "www")]
    named = len(labels) >= 2 and not host.endswith(".invalid") and not labels[-1].isdigit()
    from_host = labels[0] if named else ""
    for candidate in (from_host, document.title, fallback):
        name = _NAME.sub("-", candidate.lower()).strip("-")[:40].strip("-")
        if name:
            return name
    return "api"


def _q(value: str) -> str:
    # A JSON string is a YAML double-quoted scalar: any text is safe in it.
    return json.dumps(value, ensure_ascii=False)


def _one_line(text: Any, limit: int = 100) -> str:
    line = " ".join(str(text or "").split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _env(name: str, what: str) -> str:
    base = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_") or "API"
    return "${env:" + f"{base}_{what}" + "}"


def upstream_url(document: Document, override: str | None, notes: list[str]) -> str:
    def usable(url: str) -> str | None:
        # The policy's own check of an upstream URL.
        try:
            return Service.model_validate({"upstream": url}).upstream
        except ValueError:
            return None

    if override is not None:
        return override.rstrip("/")
    servers = document.data.get("servers") or []
    for server in servers if isinstance(servers, list) else []:
        if not isinstance(server, dict) or not isinstance(server.get("url"), str):
            continue
        url = server["url"]
        for var, spec in (server.get("variables") or {}).items():
            if isinstance(spec, dict) and "default" in spec:
                url = url.replace("{" + var + "}", str(spec["default"]))
        found = usable(url)
        if found is not None:
            if len(servers) > 1:
                notes.append(
                    "other servers: "
                    + ", ".join(str(s.get("url")) for s in servers[1:] if isinstance(s, dict))
                )
            return found
        notes.append(f"the document's server {url!r} is not an absolute http(s) URL")
    notes.append("set upstream: the document names no usable server (or pass --upstream)")
    return PLACEHOLDER_UPSTREAM


def _auth(
    name: str, schemes: dict[str, Any], order: list[str], upstream: str, notes: list[str]
) -> list[str]:
    """The auth block for the first scheme a sidecar can inject, as YAML lines."""
    skipped: list[str] = []
    for key in order:
        scheme = schemes.get(key)
        if not isinstance(scheme, dict):
            continue
        kind = scheme.get("type")
        lines: list[str] | None = None
        if kind == "http" and str(scheme.get("scheme", "")).lower() == "bearer":
            lines = ["type: bearer", f"token: {_q(_env(name, 'TOKEN'))}"]
        elif kind == "http" and str(scheme.get("scheme", "")).lower() == "basic":
            lines = [
                "type: basic",
                f"username: {_q(_env(name, 'USERNAME'))}",
                f"password: {_q(_env(name, 'PASSWORD'))}",
            ]
        elif kind == "apiKey" and scheme.get("in") in ("header", "query"):
            lines = [
                f"type: {scheme['in']}",
                f"name: {_q(str(scheme.get('name', '')))}",
                f"value: {_q(_env(name, 'API_KEY'))}",
            ]
        elif kind == "oauth2":
            flow = (scheme.get("flows") or {}).get("clientCredentials")
            token_url = urljoin(upstream + "/", str(flow.get("tokenUrl", ""))) if flow else ""
            if flow and urlsplit(token_url).scheme in ("http", "https"):
                lines = [
                    "type: oauth2_client_credentials",
                    f"token_url: {_q(token_url)}",
                    f"client_id: {_q(_env(name, 'CLIENT_ID'))}",
                    f"client_secret: {_q(_env(name, 'CLIENT_SECRET'))}",
                ]
                scopes = list((flow.get("scopes") or {}).keys())
                if scopes:
                    lines.append(f"# scopes the document lists: {_one_line(' '.join(scopes))}")
                    lines.append(f"# scope: {_q(' '.join(scopes))}")
        if lines is None:
            skipped.append(f"{key} ({_describe(scheme)})")
            continue
        if skipped:
            notes.append("security schemes a sidecar cannot inject: " + ", ".join(skipped))
        rest = [k for k in order if k != key and k in schemes]
        if rest:
            notes.append(f"auth uses '{key}'; the document also offers: {', '.join(rest)}")
        return lines
    if skipped:
        notes.append("no auth: the sidecar cannot inject " + ", ".join(skipped))
    elif not schemes:
        notes.append("no auth: the document declares no security scheme")
    return []


def _describe(scheme: dict[str, Any]) -> str:
    kind = str(scheme.get("type"))
    if kind == "apiKey":
        return f"apiKey in {scheme.get('in')}"
    if kind == "http":
        return f"http {scheme.get('scheme')}"
    if kind == "oauth2":
        return "oauth2 " + "/".join(scheme.get("flows") or {})
    return kind


def _scheme_order(data: dict[str, Any], schemes: dict[str, Any]) -> list[str]:
    """The document's own security requirements first, then the other schemes."""
    order: list[str] = []
    for requirement in data.get("security") or []:
        if isinstance(requirement, dict):
            order.extend(k for k in requirement if k not in order)
    for item in (data.get("paths") or {}).values():
        for method in METHODS:
            op = item.get(method) if isinstance(item, dict) else None
            for requirement in (op or {}).get("security") or [] if isinstance(op, dict) else []:
                if isinstance(requirement, dict):
                    order.extend(k for k in requirement if k not in order)
    order.extend(k for k in schemes if k not in order)
    return order


def _tags(data: dict[str, Any]) -> list[tuple[str, str, list[str], list[str]]]:
    """(tag, description, operation ids, paths) per tag, in the document's order."""
    described = {
        t["name"]: t.get("description", "")
        for t in data.get("tags") or []
        if isinstance(t, dict) and "name" in t
    }
    ops: dict[str, tuple[list[str], list[str]]] = {name: ([], []) for name in described}
    for path, item in (data.get("paths") or {}).items():
        if not isinstance(item, dict):
            continue
        for method in METHODS:
            op = item.get(method)
            if not isinstance(op, dict):
                continue
            for tag in op.get("tags") or ["(untagged)"]:
                ids, paths = ops.setdefault(str(tag), ([], []))
                if op.get("operationId"):
                    ids.append(str(op["operationId"]))
                if path not in paths:
                    paths.append(path)
    return [(t, str(described.get(t, "")), ids, paths) for t, (ids, paths) in ops.items() if paths]


def _glob(paths: Iterable[str]) -> str:
    """A path glob covering `paths`: their common literal leading segments, then `**`."""
    split = [p.strip("/").split("/") for p in paths]
    common: list[str] = []
    for parts in zip(*split, strict=False):
        if len(set(parts)) != 1 or "{" in parts[0]:
            break
        common.append(parts[0])
    return "/" + "/".join([*common, "**"]) if common else "/**"


def policy_yaml(
    document: Document,
    *,
    spec_ref: str,
    name: str,
    upstream: str | None = None,
    source: str = "",
) -> str:
    """The policy file's text."""
    data = document.data
    notes: list[str] = []
    target = upstream_url(document, upstream, notes)
    components = data.get("components") or {}
    schemes = components.get("securitySchemes") or {}
    schemes = {k: v for k, v in schemes.items() if isinstance(v, dict)}
    auth = _auth(name, schemes, _scheme_order(data, schemes), target, notes)

    title = _one_line(document.title) or "an OpenAPI document"
    out = [
        f"# Service policy for {title} (OpenAPI {data.get('openapi')}), written by",
        f"# `sidecar import openapi {source or spec_ref}`. Review it, then set the",
        "# environment variables it names (or change them to ${file:/path}).",
        "version: 1",
        "services:",
        f"  {name}:",
        f"    upstream: {_q(target)}",
    ]
    if auth:
        out.append("    auth:")
        out.extend(f"      {line}" for line in auth)
    out.append("    # Relative to this file's directory; keep the document next to the policy.")
    out.append(f"    openapi: {_q(spec_ref)}")
    out.append("    validate:")
    out.append("      requests: enforce          # report: only count and log; off")
    out.append("      responses: report          # count answers the document does not describe")
    out.append("      unknown_operations: allow  # forbid: 404 for calls the document lacks")
    for note in notes:
        out.append(f"    # NOTE: {_one_line(note, 200)}")
    tags = _tags(data)
    if tags:
        out.append("    # Allow rules, one per tag of the document (examples: uncomment and")
        out.append("    # name the agents; a call no rule allows is refused with 403):")
        out.append("    # allow:")
        for tag, description, ids, paths in tags:
            about = f" ({_one_line(description, 60)})" if description else ""
            out.append(f"    #   # {_one_line(tag, 60)}{about}")
            out.append('    #   - agents: ["*"]')
            glob = _q(_glob(paths))
            if ids:
                shown = ", ".join(
                    i if re.fullmatch(r"[\w./-]+", i) else _q(i) for i in ids[:_SHOWN]
                )
                more = f"  # {_SHOWN} of {len(ids)} operations" if len(ids) > _SHOWN else ""
                out.append(f"    #     operations: [{shown}]{more}")
                out.append(f"    #     # or by path: paths: [{glob}]")
            else:
                out.append(f"    #     paths: [{glob}]")
    return "\n".join(out) + "\n"
