"""The policy format, version 1, as pydantic models.

Every model rejects unknown keys, every value is checked here, so the
compiler and the steps can trust what they get.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    ConfigDict,
    Field,
    ModelWrapValidatorHandler,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .base import (
    AUTHORIZATION,
    Duration,
    HeaderName,
    HeaderValue,
    Model,
    RateValue,
    RedisUrl,
    SecretStr,
    ServiceName,
    Size,
    _did_you_mean,
)
from .cloud import AwsSigV4Auth, AzureAuth, GcpAuth
from .secrets import Secret, resolver_from_context
from .units import (
    Rate,
)

RETRY_CONDITIONS = ("connect-error", "timeout", "reset", "5xx", "gateway-error")
BREAKER_CONDITIONS = ("connect-error", "timeout", "reset", "5xx")


class Agents(Model):
    header: HeaderName = Field(
        default="X-Agent-Id", description="Request header that names the calling agent"
    )
    # Verified identity, see access.py: with either set, every call must prove who it is.
    verify: JwtVerify | None = Field(default=None, description="Verify agents' JWTs (JWKS)")
    keys: AgentKeys = Field(default_factory=dict, description="Agent name -> sha256:<key hash>")
    credential_header: CredentialHeader = Field(
        default="X-Agent-Token", description="Header carrying the agent's JWT or key"
    )

    @field_validator("credential_header")
    @classmethod
    def _not_the_name_header(cls, v: str, info: ValidationInfo) -> str:
        if v.lower() == str(info.data.get("header", "")).lower():
            raise ValueError("credential_header must differ from header (the self-declared name)")
        return v


class HeaderRules(Model):
    # Names and values are checked one by one, so each bad one is reported at its place.
    set: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict, description="Headers set on every request"
    )
    remove: list[HeaderName] = Field(
        default_factory=list, description="Headers removed from every request"
    )
    default: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict,
        description="Headers added when the agent sent none of that name (an SDK's own "
        "version header wins)",
    )


def _query_value(value: str) -> str:
    if any(c in value for c in "\r\n#"):
        raise ValueError("a query value must not hold a line break or '#'")
    return value


QueryName = Annotated[str, Field(min_length=1), AfterValidator(_query_value)]
QueryValue = Annotated[str, AfterValidator(_query_value)]


class QueryRules(Model):
    set: dict[QueryName, QueryValue] = Field(
        default_factory=dict, description="Query parameters set on every request"
    )
    default: dict[QueryName, QueryValue] = Field(
        default_factory=dict,
        description="Query parameters added when the agent sent none of that name",
    )


class Timeout(Model):
    connect: Duration = Field(default=5.0, gt=0, description="Connecting to the upstream")
    total: Duration = Field(
        default=300.0,
        gt=0,
        description="Per attempt, from sending the request until the response headers arrive",
    )
    idle: Duration | None = Field(
        default=None,
        gt=0,
        description="Longest silence while the response body streams (none by default)",
    )


class RateLimit(Model):
    rate: RateValue | None = Field(
        default=None, description="Sustained rate of calls, like '10/s' or '600/min'"
    )
    tokens: RateValue | None = Field(
        default=None,
        description="A token limit instead of `rate` (services with `llm:`): LLM tokens, like "
        "'100000/min'; a call is let through while tokens are left and charged its usage",
    )
    burst: int | None = Field(
        default=None,
        ge=1,
        description="Bucket size; default: one second's worth of `rate` (at least 1), one "
        "minute's worth of `tokens`",
    )
    per: Literal["service", "agent"] = Field(
        default="service", description="One bucket for the service, or one per agent"
    )
    max_wait: Duration | None = Field(
        default=None, description="Queue up to this long for a token instead of refusing"
    )
    backend: RedisUrl | None = Field(
        default=None, description="redis://host:port/db to share the limit between sidecars"
    )
    fail_open: bool = Field(
        default=True, description="When the backend is unreachable: let calls through (true)"
    )
    operations: list[str] | None = Field(
        default=None,
        min_length=1,
        description="Count only calls whose GraphQL/MCP operation matches one of these globs, "
        "like 'mutation:*' or 'tools/call:search_*'",
    )
    by_operation: bool = Field(
        default=False,
        description="One bucket per GraphQL/MCP operation (within `per`), not one for all",
    )

    @model_validator(mode="after")
    def _local_operations(self) -> RateLimit:
        if self.backend is not None and (self.operations is not None or self.by_operation):
            raise ValueError("operations and by_operation apply to limits without a backend")
        return self

    @model_validator(mode="after")
    def _rate_or_tokens(self) -> RateLimit:
        if (self.rate is None) == (self.tokens is None):
            raise ValueError("set either rate (calls) or tokens (LLM tokens)")
        if self.tokens is not None and (self.operations is not None or self.by_operation):
            raise ValueError("operations and by_operation apply to call limits only")
        return self

    @property
    def call_rate(self) -> Rate:
        """The rate of a call limit; token limits are steps/llm/llm.py's, never asked this."""
        if self.rate is None:
            raise ValueError("a token limit has no call rate")
        return self.rate


def _check_condition(item: str | int, names: tuple[str, ...], *, lo: int) -> str | int:
    """One entry of an `on:` list: a named condition or a status code from `lo` up."""
    if isinstance(item, int) and not isinstance(item, bool):
        if not lo <= item <= 599:
            raise ValueError(f"status {item} is not allowed here; use {lo}..599")
    elif item not in names:
        raise ValueError(f"unknown condition {item!r}{_did_you_mean(str(item), list(names))}")
    return item


RetryCondition = Annotated[
    str | int, AfterValidator(lambda v: _check_condition(v, RETRY_CONDITIONS, lo=400))
]
# A 4xx is the caller's fault, never the upstream's: it must not trip the breaker.
BreakerCondition = Annotated[
    str | int, AfterValidator(lambda v: _check_condition(v, BREAKER_CONDITIONS, lo=500))
]


class Backoff(Model):
    initial: Duration = Field(default=0.1, gt=0)
    max: Duration = Field(default=5.0, gt=0)


class RetryBudget(Model):
    ratio: float = Field(
        default=0.2, ge=0, le=1, description="Retries allowed as a share of active requests"
    )
    min_concurrency: int = Field(
        default=3, ge=0, description="Concurrent retries always allowed, whatever the ratio"
    )


class Retry(Model):
    attempts: int = Field(default=3, ge=1, le=10, description="Total tries, the first included")
    on: list[RetryCondition] = Field(
        default_factory=lambda: list[str | int](["connect-error", "timeout", 502, 503, 504]),
        description="connect-error, timeout, reset, 5xx, gateway-error, or status codes",
    )
    backoff: Backoff = Field(default_factory=Backoff)
    budget: RetryBudget = Field(default_factory=RetryBudget)


class CircuitBreaker(Model):
    failure_ratio: float = Field(default=0.5, gt=0, le=1)
    min_requests: int = Field(default=10, ge=1)
    window: Duration = Field(default=30.0, gt=0)
    open_for: Duration = Field(default=15.0, gt=0)
    half_open_requests: int = Field(default=1, ge=1)
    on: list[BreakerCondition] = Field(
        default_factory=lambda: list[str | int](["connect-error", "timeout", "5xx"]),
        description="What counts as a failure: connect-error, timeout, reset, 5xx, 5xx codes",
    )


class BearerAuth(Model):
    type: Literal["bearer"]
    token: SecretStr

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return AUTHORIZATION


class HeaderAuth(Model):
    type: Literal["header"]
    name: HeaderName
    value: SecretStr

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return self.name


class QueryAuth(Model):
    type: Literal["query"]
    name: str = Field(min_length=1)
    value: SecretStr

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return None  # a query parameter, no header


class BasicAuth(Model):
    type: Literal["basic"]
    username: SecretStr
    password: SecretStr

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return AUTHORIZATION


class OAuth2ClientCredentials(Model):
    type: Literal["oauth2_client_credentials"]
    token_url: str
    client_id: SecretStr
    client_secret: SecretStr
    scope: str | None = None
    audience: str | None = None
    auth_method: Literal["client_secret_basic", "client_secret_post"] = Field(
        default="client_secret_basic", description="How the client authenticates to token_url"
    )
    refresh_before: Duration = Field(
        default=60.0, ge=0, description="Refresh this long before the token expires"
    )

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return AUTHORIZATION

    @field_validator("token_url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("token_url must be an http:// or https:// URL")
        return v


class JwtAuth(Model):
    type: Literal["jwt"]
    algorithm: Literal["RS256", "RS384", "RS512", "ES256", "ES384", "HS256", "HS384", "HS512"]
    key: SecretStr = Field(description="PEM private key (RS*/ES*) or shared secret (HS*)")
    kid: str | None = None
    claims: dict[str, Any] = Field(default_factory=dict)
    ttl: Duration = Field(default=300.0, gt=0)
    header: HeaderName = Field(default=AUTHORIZATION, description="Sent as 'Bearer <jwt>' here")

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return self.header

    @field_validator("key")
    @classmethod
    def _check_key(cls, v: Secret, info: ValidationInfo) -> Secret:
        # A bad key must fail `sidecar validate`, not the first call. Imported here:
        # the steps import this module.
        from .jwt_keys import signing_key

        algorithm = info.data.get("algorithm")
        # `sidecar validate` without --resolve-secrets leaves references unread.
        unresolved = v.unresolved or (
            resolver_from_context(info.context).check_only and "${" in v.source
        )
        if algorithm is not None and not unresolved:
            signing_key(algorithm, v.reveal())
        return v

    @field_validator("claims")
    @classmethod
    def _check_claims(cls, v: dict[str, Any]) -> dict[str, Any]:
        from .jwt_keys import RESERVED_CLAIMS

        reserved = sorted(RESERVED_CLAIMS & set(v))
        if reserved:
            raise ValueError(
                f"claims may not set {', '.join(reserved)}: the sidecar sets them (see ttl)"
            )
        try:
            json.dumps(v)
        except (TypeError, ValueError):
            raise ValueError("claims must be plain JSON values (quote dates)") from None
        return v


Auth = Annotated[
    BearerAuth
    | HeaderAuth
    | QueryAuth
    | BasicAuth
    | OAuth2ClientCredentials
    | JwtAuth
    | AwsSigV4Auth
    | GcpAuth
    | AzureAuth,
    Field(discriminator="type"),
]
AUTH_TYPES = (
    "bearer",
    "header",
    "query",
    "basic",
    "oauth2_client_credentials",
    "jwt",
    "aws_sigv4",
    "gcp",
    "azure",
)


def _service_schema(schema: dict[str, Any]) -> None:
    # A file may leave `upstream` to the template it names: the schema describes
    # files as written, before the loader fills templates in.
    required = schema.get("required", [])
    if "upstream" in required:
        required.remove("upstream")
        if not required:
            del schema["required"]
        schema["anyOf"] = [
            {"required": ["upstream"]},
            {"required": ["template"]},
            {"required": ["files"]},
        ]


class Service(Model):
    model_config = ConfigDict(json_schema_extra=_service_schema)

    template: str | None = Field(
        default=None,
        description="Start from this template (see `sidecar templates`); every key set "
        "here overrides the template's",
    )
    upstream: str = Field(description="scheme://host[:port][/base/path]")
    prefix: str | None = Field(default=None, description="Default: /<service name>")
    auth: Auth | None = None
    headers: HeaderRules = Field(default_factory=HeaderRules)
    query: QueryRules = Field(default_factory=QueryRules)
    timeout: Timeout = Field(default_factory=Timeout)
    rate_limit: list[RateLimit] = Field(default_factory=list)
    retry: Retry | None = None
    circuit_breaker: CircuitBreaker | None = None
    max_body: Size | None = Field(
        default=None, description="Largest request body accepted; larger ones get 413"
    )
    redirects: Literal["rewrite", "pass"] = Field(
        default="rewrite",
        description="rewrite: a Location or Content-Location naming the upstream is pointed "
        "at the sidecar; pass: left as the upstream sent it",
    )
    forwarded: bool = Field(
        default=False,
        description="Send X-Forwarded-For/-Proto/-Host and Via upstream (off: none are sent)",
    )
    check: Check | None = Field(
        default=None, description="The probe `sidecar check` sends through this service"
    )
    limits: UpstreamLimits = Field(
        default_factory=lambda: UpstreamLimits(),
        description="How the upstream reports its own limits, read by the adaptive pause",
    )
    allow: list[AllowRule] | None = Field(
        default=None, description="Who may call what; absent: the top-level allow rules"
    )
    method_override: list[Method] = Field(
        default_factory=list,
        description="Methods that X-HTTP-Method-Override, X-HTTP-Method, X-Method-Override "
        "and the _method query parameter may name (allow rules then judge that method); "
        "none: those headers are dropped",
    )
    escaped_slashes: Literal["refuse", "keep"] = Field(
        default="refuse",
        description="A path with an encoded / or \\ (%2F, %5C) on a service with allow rules: "
        "refuse: 400; keep: judged as one segment (the upstream never splits there, as "
        "GitLab's project ids)",
    )
    openapi: DocumentPath | None = Field(default=None, description="The API's OpenAPI document")
    validation: Validate | None = Field(default=None, alias="validate")
    graphql: GraphQL | None = Field(default=None, description="A GraphQL API, see protocols.py")
    mcp: MCPSetting = Field(default=None, description="An MCP server: true, or its tool rules")
    llm: LLM | None = Field(default=None, description="An LLM API: token accounting, see llm.py")
    mode: Mode = Field(
        default="live",
        description="live: the upstream answers; mock: `mock:`; record: the upstream, saved "
        "to `cassettes`; replay: `cassettes`; observe: the upstream, with the shape of each "
        "call written to <data-dir>/observe for `sidecar learn`",
    )
    mock: list[MockAnswer] = Field(default_factory=list, description="Answers of mode: mock")
    faults: Faults | None = Field(default=None, description="Injected faults, see testing.py")
    fallback: list[str] = Field(
        default_factory=list,
        description="Services to try in turn, each with its own chain, when this one is "
        "down, refuses (breaker, limit) or answers 429/5xx",
    )
    model_map: dict[str, str] = Field(
        default_factory=dict,
        description="When this service serves another's fallback: the JSON body's "
        '"model" renamed (e.g. gpt-4o: claude-sonnet-4-5)',
    )
    translate: Translate | None = Field(
        default=None,
        description="AGENT_API->UPSTREAM_API: calls in the agent's LLM API (directly or as "
        "another service's fallback hop) are translated to this service's and its answers "
        "back, streams included (e.g. openai->anthropic)",
    )
    cache: Cache | None = Field(default=None, description="Answers served again, see cache.py")
    # prices before budget: the budget's check reads them.
    prices: Prices = Field(
        default_factory=dict,
        description="LLM prices per model (a name or glob; `default` for the others) for "
        "cost budgets, see budget.py",
    )
    budget: list[Budget] = Field(
        default_factory=list,
        description="Token or cost budgets per calendar window (UTC); over budget: 429 "
        "budget_exhausted, see budget.py",
    )
    objects: Objects | None = Field(
        default=None,
        description="Object-store rules of an S3-compatible service: buckets and keys per "
        "agent, see cloud.py",
    )
    cassettes: Cassettes | None = Field(
        default=None, description="Recordings of mode: record and replay, see testing.py"
    )
    files: Files | None = Field(
        default=None,
        description="Serve a local directory instead of an upstream (no upstream then), "
        "see docs/files.md",
    )

    @model_validator(mode="before")
    @classmethod
    def _files_have_no_upstream(cls, data: Any) -> Any:
        return fill_upstream(data)

    @field_validator("upstream")
    @classmethod
    def _check_upstream(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https"):
            raise ValueError("upstream must start with http:// or https://")
        if not parts.hostname:
            raise ValueError("upstream has no host")
        if parts.query or parts.fragment:
            raise ValueError("upstream must not have a query or fragment")
        if parts.username is not None or parts.password is not None:
            # It would be shown in /config and sent as a credential the policy never names.
            raise ValueError("upstream must not hold user:password; use auth: {type: basic}")
        try:
            parts.port  # noqa: B018  (raises on a bad port)
        except ValueError:
            raise ValueError("upstream has an invalid port") from None
        return v.rstrip("/")

    @field_validator("prefix")
    @classmethod
    def _check_prefix(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith("/"):
            raise ValueError("prefix must start with '/'")
        if any(c in v for c in "?#% ") or "/../" in v + "/" or "/./" in v + "/":
            raise ValueError("prefix must be a plain path")
        return v.rstrip("/") or "/"

    @field_validator("rate_limit", "budget", mode="before")
    @classmethod
    def _one_or_many(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @field_validator("budget")
    @classmethod
    def _cost_needs_prices(cls, v: list[Budget], info: ValidationInfo) -> list[Budget]:
        prices = info.data.get("prices") or {}
        if any(b.cost is not None for b in v) and "default" not in prices:
            raise ValueError(
                "a cost budget needs prices: with a `default` entry, the price of every model "
                "the table does not name (else those calls would cost nothing)"
            )
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _offline_secrets(
        cls, data: Any, handler: ModelWrapValidatorHandler[Service], info: ValidationInfo
    ) -> Service:
        # A service that never calls its upstream needs no credential (policy/secrets.py).
        resolver = resolver_from_context(info.context)
        before = resolver.offline
        resolver.offline = not resolver.calls_out(data)
        try:
            return handler(data)
        finally:
            resolver.offline = before

    @model_validator(mode="after")
    def _token_limits_need_llm(self) -> Service:
        if self.llm is None and any(x.tokens is not None for x in self.rate_limit):
            raise ValueError("a rate_limit with tokens needs llm: (the answers report the tokens)")
        if self.llm is None and self.budget:
            raise ValueError("a budget needs llm: (the answers report the tokens)")
        return self

    @model_validator(mode="after")
    def _translate_matches_llm(self) -> Service:
        if self.translate is not None and self.llm is not None:
            upstream_api = self.translate.partition("->")[2]
            if self.llm.api != upstream_api:
                raise ValueError(
                    f"translate: {self.translate} sends {upstream_api} calls upstream, "
                    f"but llm.api is {self.llm.api}"
                )
        return self

    @model_validator(mode="after")
    def _mock_needs_mode(self) -> Service:
        # A live service with mock answers would look mocked in a review and call the API.
        if self.mock and self.mode != "mock":
            raise ValueError("mock answers are used only with mode: mock")
        # A live service's cassettes apply when a run records or replays every service
        # (`sidecar record|replay`, `--mode`): its redactions must be writable beforehand.
        if self.cassettes is not None and self.mode == "mock":
            raise ValueError("cassettes are not used with mode: mock (a mock never records)")
        return self


class PolicyFile(Model):
    """One policy file. The files of a directory are merged into one Policy."""

    model_config = ConfigDict(
        title="agent-sidecar policy", json_schema_extra={"$id": "agent-sidecar/policy/v1"}
    )

    version: Literal[1] = Field(description="Policy format version")
    agents: Agents | None = None
    # A bad name is reported with the other services' errors, not instead of them.
    services: dict[ServiceName, Service] = Field(default_factory=dict)
    webhooks: Webhooks | None = Field(
        default=None, description="Inbound receivers and outbound endpoints, see webhooks.py"
    )
    allow: list[AllowRule] | None = Field(
        default=None, description="Allow rules of every service that has none of its own"
    )
    admin: Admin | None = Field(default=None, description="The admin listener, see alerts.py")
    alerts: Alerts | None = Field(
        default=None, description="Alert rules and where they are sent, see alerts.py"
    )
    databases: Databases | None = Field(
        default=None,
        description="PostgreSQL databases agents reach on a loopback listener, see databases.py",
    )


# At the end: each feature's models, which Agents, Service and PolicyFile name. Their
# names resolve when a model first validates (defer_build, policy/base.py): no
# model_rebuild here, which would build every validator in every process.
from .access import AgentKeys, AllowRule, CredentialHeader, JwtVerify, Method  # noqa: E402
from .alerts import Admin, Alerts  # noqa: E402
from .budget import Budget, Prices  # noqa: E402
from .cache import Cache  # noqa: E402
from .check import Check  # noqa: E402
from .cloud import Objects  # noqa: E402
from .databases import Databases  # noqa: E402
from .files import Files, fill_upstream  # noqa: E402
from .llm import LLM  # noqa: E402
from .openapi import DocumentPath, Validate  # noqa: E402
from .protocols import GraphQL, MCPSetting  # noqa: E402
from .testing import Cassettes, Faults, MockAnswer, Mode  # noqa: E402
from .translate import Translate  # noqa: E402
from .upstream_limits import UpstreamLimits  # noqa: E402
from .webhooks import Webhooks  # noqa: E402
