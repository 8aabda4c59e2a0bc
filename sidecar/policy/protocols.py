"""The `graphql:` and `mcp:` parts of a service: policy that understands the protocol.

A GraphQL service gets limits on each operation's depth, aliases and
estimated cost, and allow rules by operation type and name per agent. An MCP
service (Model Context Protocol over streamable HTTP) gets allow rules by tool
name per agent. Patterns are shell-style globs (`*`, `?`, `[abc]`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator

from .base import Model

OperationType = Literal["query", "mutation", "subscription"]
OPERATION_TYPES: tuple[OperationType, ...] = ("query", "mutation", "subscription")


def _endpoint_path(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError("path must start with '/'")
    if any(c in value for c in "?#% "):
        raise ValueError("path must be a plain path, without query or fragment")
    return value.rstrip("/") or "/"


class GraphQLRule(Model):
    """One allow rule: an operation passes when some rule matches it all."""

    agents: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Agent id globs this rule is for (a call without an agent id is '')",
    )
    types: list[OperationType] = Field(
        default_factory=lambda: list(OPERATION_TYPES),
        min_length=1,
        description="Operation types allowed: query, mutation, subscription",
    )
    operations: list[str] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="Operation name globs allowed (an anonymous operation is '')",
    )


class GraphQL(Model):
    path: str = Field(
        default="/graphql",
        description="The GraphQL endpoint, under the service's prefix; other paths pass as-is",
    )
    max_depth: int | None = Field(
        default=None, ge=1, description="Deepest field nesting allowed (a top-level field is 1)"
    )
    max_aliases: int | None = Field(
        default=None, ge=0, description="Most aliased fields allowed in one operation"
    )
    max_cost: int | None = Field(
        default=None,
        ge=1,
        description="Highest estimated cost allowed: every field costs 1, times the page "
        "sizes (first/last/limit) of the fields around it",
    )
    allow: list[GraphQLRule] | None = Field(
        default=None, description="Allow rules; none: every operation is allowed"
    )
    persisted_queries: bool = Field(
        default=True,
        description="Pass requests that carry only a persisted-query id (their operation "
        "cannot be checked); false refuses them with 403",
    )
    introspection: Literal["allow", "deny"] | list[str] = Field(
        default="allow",
        description="Operations that select __schema or __type (measured apart from "
        "max_depth, max_aliases and max_cost): allow, deny, or the agent id globs that "
        "may run them",
    )
    count_errors: bool = Field(
        default=False,
        description="A 2xx JSON answer of the endpoint with a non-empty `errors` array counts "
        "as a failure for the circuit breaker and as an error in metrics and spans (answers "
        "up to 1 MiB are read for it; larger or streamed ones are relayed unread)",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str) -> str:
        return _endpoint_path(v)


class MCP(Model):
    path: str | None = Field(
        default=None,
        description="The MCP endpoint under the service's prefix; none: every POST is read",
    )
    tools: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Tool name globs any agent may call (tools/call)",
    )
    per_agent: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Agent id -> the tool name globs that agent may call, instead of `tools`",
    )

    @field_validator("path")
    @classmethod
    def _check_path(cls, v: str | None) -> str | None:
        return None if v is None else _endpoint_path(v)


def _flag(value: Any) -> Any:
    # `mcp: true` is every tool allowed (the defaults), `mcp: false` no MCP at all.
    if value is True:
        return {}
    return None if value is False else value


def _accept_true(schema: dict[str, Any]) -> None:
    schema["anyOf"] = [{"type": "boolean"}, *schema["anyOf"]]


MCPSetting = Annotated[MCP | None, BeforeValidator(_flag), Field(json_schema_extra=_accept_true)]
