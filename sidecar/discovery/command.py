"""`sidecar discover URL`: the probes in order, then the drafted service policy.

Order: the base URL itself (what it links to, how it asks to authenticate), the
usual OpenAPI places, GraphQL introspection, an MCP `initialize`. The first
description found shapes the policy; with none, a minimal service is written.
Credentials come only from `--header`, with `${env:NAME}` references that the
draft keeps as references: a value is never written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

from .findings import Findings, find_graphql, find_mcp, find_openapi, linked_documents, note_auth
from .probe import OutOfBudget, Prober

_ENV = re.compile(r"\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}")
_NAME = re.compile(r"[^a-z0-9]+")


class DiscoverError(Exception):
    pass


def _q(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _one_line(text: str, limit: int = 90) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def parse_headers(given: list[str], env: dict[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """(headers to send, expanded; the same with their `${env:}` text, for the draft)."""
    sent: dict[str, str] = {}
    written: dict[str, str] = {}
    for item in given:
        name, sep, value = item.partition(":")
        name, value = name.strip(), value.strip()
        if not sep or not name:
            raise DiscoverError(f"--header {item.split(':')[0]!r}...: give it as 'Name: value'")
        missing = [m.group(1) for m in _ENV.finditer(value) if m.group(1) not in env]
        if missing:
            raise DiscoverError(f"--header {name}: environment variable {missing[0]} is not set")
        sent[name] = _ENV.sub(lambda m: env[m.group(1)], value)
        if _ENV.search(value):
            written[name] = value
    return sent, written


def service_name(url: str) -> str:
    host = urlsplit(url).hostname or "api"
    labels = [p for p in host.split(".") if p not in ("api", "www")]
    if not labels or all(p.isdigit() for p in labels) or host in ("localhost",):
        return "api"
    return _NAME.sub("-", labels[0].lower()).strip("-")[:40] or "api"


def known_template(url: str) -> str | None:
    """The built-in template whose upstream is this host (and port), if one is."""
    from ..policy.templates import catalog

    parts = urlsplit(url)
    for name, template in sorted(catalog(None).templates.items()):
        upstream = str(template.service.get("upstream") or "")
        if "<" in upstream or not upstream:
            continue
        theirs = urlsplit(upstream)
        if (theirs.hostname, theirs.port) == (parts.hostname, parts.port) and theirs.hostname:
            if theirs.hostname in ("127.0.0.1", "localhost"):
                continue  # a local default port proves nothing about what listens there
            return name
    return None


async def probe(
    base: str, headers: dict[str, str], max_requests: int, seconds: float
) -> tuple[Findings, list[str]]:
    import aiohttp

    findings = Findings()
    prober = Prober(base, headers, max_requests, time.monotonic() + seconds)
    async with aiohttp.ClientSession() as session:
        prober.session = session
        try:
            first = await prober.request("GET", "/", what=" (the base URL)")
            linked: list[str] = []
            if first is not None:
                note_auth(first, findings)
                linked = linked_documents(first)
            await find_openapi(prober, findings, linked)
            if findings.openapi is None:
                await find_graphql(prober, findings)
            if findings.openapi is None and not findings.graphql_path:
                await find_mcp(prober, findings)
        except OutOfBudget as e:
            prober.note(f"stopped: out of budget ({e})")
    return findings, prober.lines


def _auth_lines(name: str, findings: Findings, written: dict[str, str]) -> list[str]:
    """An `auth:` from a --header given as ${env:} (the probes used it), else a commented
    suggestion from what the API asked for."""
    for header, value in written.items():
        if header.lower() == "authorization" and value.lower().startswith("bearer "):
            return [f"    auth: {{type: bearer, token: {_q(value[7:].strip())}}}"]
        if header.lower() != "authorization":
            return [f"    auth: {{type: header, name: {header}, value: {_q(value)}}}"]
    env = re.sub(r"[^A-Z0-9]+", "_", name.upper()).strip("_") or "API"
    lines: list[str] = []
    for scheme in findings.auth:
        if scheme == "bearer":
            lines.append(
                f'    # auth: {{type: bearer, token: "${{env:{env}_TOKEN}}"}}'
                "   # WWW-Authenticate: Bearer"
            )
        elif scheme == "basic":
            lines.append(
                f'    # auth: {{type: basic, username: "${{env:{env}_USER}}", '
                f'password: "${{env:{env}_PASSWORD}}"}}   # WWW-Authenticate: Basic'
            )
        else:
            lines.append(
                f"    # auth: the API asked for WWW-Authenticate: {scheme}; see docs/policy.md#auth"
            )
    return lines


def draft(
    name: str, base: str, findings: Findings, written: dict[str, str], out: Path | None
) -> tuple[str, list[str]]:
    """The policy text, and the files written beside it (the OpenAPI document)."""
    if findings.openapi is not None:
        from .importer import policy_yaml

        suffix = (
            ".yaml"
            if findings.openapi_media.endswith("yaml")
            or findings.openapi_at.endswith((".yaml", ".yml"))
            else ".json"
        )
        doc_name = f"{name}.openapi{suffix}"
        directory = out.parent if out is not None else Path.cwd()
        directory.mkdir(parents=True, exist_ok=True)
        (directory / doc_name).write_bytes(findings.openapi_text)
        text = policy_yaml(
            findings.openapi,
            spec_ref=doc_name,
            name=name,
            upstream=base,
            source=findings.openapi_at,
        )
        auth = _auth_lines(name, findings, written)
        if auth and "    auth:" not in text and not auth[0].lstrip().startswith("#"):
            text = text.replace(
                f"    upstream: {_q(base)}\n",
                f"    upstream: {_q(base)}\n" + "\n".join(auth) + "\n",
                1,
            )
        return text, [str(directory / doc_name)]
    lines = [
        f"# Service policy drafted by `sidecar discover {base}`. Review it before use.",
        "version: 1",
        "services:",
        f"  {name}:",
        f"    upstream: {_q(base)}",
    ]
    lines += _auth_lines(name, findings, written)
    if findings.graphql_path:
        found = "; ".join(
            f"{kind}: {', '.join(fields[:12])}{' ...' if len(fields) > 12 else ''}"
            for kind, fields in findings.graphql_roots.items()
        )
        lines += [
            "    graphql:",
            f"      path: {findings.graphql_path}",
            "      max_depth: 10",
            "      max_aliases: 15",
            "      max_cost: 5000",
            f"      # operations found: {_one_line(found, 200)}",
        ]
        if "mutation" in findings.graphql_roots:
            lines += [
                "      # allow:                 # e.g. only queries for most agents:",
                '      #   - {agents: ["*"], types: [query]}',
            ]
    elif findings.mcp_path:
        lines += ["    mcp:", f"      path: {findings.mcp_path}"]
        if findings.mcp_tools:
            lines.append("      tools:                   # delete the tools agents must not call")
            for tool, description in findings.mcp_tools:
                comment = f"   # {_one_line(description)}" if description else ""
                lines.append(f"        - {_q(tool)}{comment}")
        else:
            lines.append("      tools: []                # the server listed no tools")
    else:
        lines.append("    # No OpenAPI document, GraphQL endpoint or MCP server was found.")
    return "\n".join(lines) + "\n", []


def run(
    args: argparse.Namespace, *, stdout: IO[str] = sys.stdout, stderr: IO[str] = sys.stderr
) -> int:
    base = args.url.rstrip("/")
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        print(f"sidecar discover: {args.url!r} is not an http(s) URL", file=stderr)
        return 2
    if parts.username is not None or parts.password is not None or parts.query or "#" in base:
        # Never echoed: what is there may be a credential. It would be sent to every probe
        # and written into the draft's `upstream:`, which takes no query anyway.
        print(
            "sidecar discover: the URL holds a user name, password, query or fragment; give "
            "the API's base URL alone, and a credential with --header 'Name: ${env:VAR}'",
            file=stderr,
        )
        return 2
    try:
        headers, written = parse_headers(args.header, dict(os.environ))
    except DiscoverError as e:
        print(f"sidecar discover: {e}", file=stderr)
        return 2
    for header in headers:
        if header not in written:
            print(
                f"note: --header {header} is a value, not ${{env:...}}: sent, never written",
                file=stderr,
            )
    name = args.name or service_name(base)
    out = Path(args.out) if args.out else None
    template = known_template(base)
    if template is not None:
        text = (
            f"# {parts.hostname} is a known provider: the built-in template `{template}` sets its\n"
            "# upstream, credential, headers, timeouts and limits "
            f"(sidecar templates show {template}).\n"
            f"version: 1\nservices:\n  {name}: {{template: {template}}}\n"
        )
        print(f"known provider: template {template}", file=stderr)
    else:
        findings, lines = asyncio.run(probe(base, headers, args.max_requests, args.timeout))
        for line in lines:
            print(line, file=stderr)
        text, extra = draft(name, base, findings, written, out)
        if findings.openapi is not None:
            print(
                f"found: OpenAPI document at {urlsplit(findings.openapi_at).path} -> {extra[0]}",
                file=stderr,
            )
        elif findings.graphql_path:
            print(f"found: GraphQL at {findings.graphql_path}", file=stderr)
        elif findings.mcp_path:
            print(
                f"found: MCP server {findings.mcp_server!r} at {findings.mcp_path} "
                f"with {len(findings.mcp_tools)} tools",
                file=stderr,
            )
        else:
            print(
                "found: no description (no OpenAPI, GraphQL or MCP); wrote a minimal service",
                file=stderr,
            )
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"wrote service '{name}' to {out}", file=stderr)
    else:
        stdout.write(text)
    return 0
