"""The graphql: and mcp: keys as `sidecar validate` reports them."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from sidecar.policy.loader import PolicyError, load_policy
from sidecar.policy.protocols import MCP


def errors(directory: Path, text: str) -> list[str]:
    (directory / "p.yaml").write_text(textwrap.dedent(text).lstrip("\n"))
    with pytest.raises(PolicyError) as info:
        load_policy(str(directory))
    return [str(p).replace(f"{directory}/", "") for p in info.value.problems]


def test_graphql_and_mcp_mistakes_are_reported_where_they_are(tmp_path: Path) -> None:
    found = errors(
        tmp_path,
        """
        version: 1
        services:
          gh:
            upstream: https://api.github.com
            graphql:
              path: graphql
              max_depht: 5
              allow:
                - {agents: [research-*], types: [querry]}
          tools:
            upstream: http://127.0.0.1:9000
            mcp: {tools: search_*, per_agnt: {}}
            rate_limit:
              - {rate: 1/s, backend: "redis://127.0.0.1", operations: ["tools/call:*"]}
        """,
    )
    assert found == [
        "p.yaml:6:13: path must start with '/'",
        "p.yaml:7:7: unknown key 'max_depht' (did you mean 'max_depth'?)",
        "p.yaml:9:42: Input should be 'query', 'mutation' or 'subscription'",
        "p.yaml:12:18: Input should be a valid list",
        "p.yaml:12:28: unknown key 'per_agnt' (did you mean 'per_agent'?)",
        "p.yaml:14:9: operations and by_operation apply to limits without a backend",
    ]


def test_mcp_true_and_graphql_defaults_load(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(
        textwrap.dedent(
            """
            version: 1
            services:
              gh: {upstream: "https://api.github.com", graphql: {}}
              tools: {upstream: "http://127.0.0.1:9000", mcp: true}
            """
        )
    )
    policy = load_policy(str(tmp_path))
    graphql = policy.services["gh"].spec.graphql
    assert graphql is not None and graphql.path == "/graphql" and graphql.allow is None
    assert policy.services["tools"].spec.mcp == MCP()
