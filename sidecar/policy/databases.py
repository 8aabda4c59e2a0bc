"""The `databases:` part of the policy: PostgreSQL databases agents reach through the sidecar.

Each entry is one database: the loopback address agents connect to, the real
server and the credential the sidecar logs in with, the pool, the guards
(read-only, statement timeout, row limit, rate limits) and the statement
allow rules. The rules' meaning lives in sidecar/databases/statements/.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from .access import AgentGlob
from .base import Duration, Model, RateValue, SecretStr

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TABLE = re.compile(r"^(\*|[A-Za-z_][A-Za-z0-9_$]*(\.(\*|[A-Za-z_][A-Za-z0-9_$]*))?)$")

# The kinds a rule's `statements:` names; databases/statements classifies into them.
StatementKind = Literal[
    "select",
    "insert",
    "update",
    "delete",
    "merge",
    "ddl",
    "copy",
    "call",
    "set",
    "reset",
    "transaction",
    "show",
    "explain",
    "prepare",
    "execute",
    "listen",
    "lock",
    "vacuum",
    "grant",
    "other",
]


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(value: str) -> tuple[str, int]:
    """'127.0.0.1:15432' or '[::1]:15432' -> (host, port); ValueError when malformed."""
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def _listen(value: str) -> str:
    host, _ = split_address(value)
    if not _loopback(host):
        # Agents log in with any password: the listener must not be reachable off the host.
        raise ValueError(f"listen must be a loopback address (127.0.0.1, ::1), not {host}")
    return value


Listen = Annotated[str, AfterValidator(_listen)]


@dataclass(frozen=True, slots=True)
class Upstream:
    host: str
    port: int
    database: str


def parse_upstream(value: str) -> Upstream:
    parts = urlsplit(value)
    if parts.scheme not in ("postgres", "postgresql") or not parts.hostname:
        raise ValueError(f"{value!r} is not a postgres://host[:port]/database URL")
    if parts.password is not None:
        raise ValueError("the upstream URL must not hold a password: write it in auth.password")
    if parts.query or parts.fragment:
        raise ValueError("the upstream URL takes no ?options: write them as keys of the entry")
    try:
        port = parts.port or 5432
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    database = unquote(parts.path.lstrip("/"))
    if not database or "/" in database:
        raise ValueError(f"{value!r} names no database: postgres://host:5432/DATABASE")
    return Upstream(parts.hostname, port, database)


def _upstream(value: str) -> str:
    parse_upstream(value)
    return value


def _table(value: str) -> str:
    if not _TABLE.match(value):
        raise ValueError(f"table {value!r}: write schema.table, schema.*, table or *")
    return value


TableGlob = Annotated[str, AfterValidator(_table)]


class DatabaseTls(Model):
    """TLS to the upstream, with libpq's sslmode meanings."""

    mode: Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] = Field(
        default="prefer",
        description="disable, allow, prefer (TLS when the server offers it), require, "
        "verify-ca (and check the chain), verify-full (and the host name)",
    )
    ca: SecretStr | None = Field(
        default=None, description="PEM CA certificate(s) for verify-ca/verify-full"
    )
    cert: SecretStr | None = Field(default=None, description="PEM client certificate")
    key: SecretStr | None = Field(default=None, description="PEM key of the client certificate")

    @model_validator(mode="after")
    def _pairs(self) -> DatabaseTls:
        if (self.cert is None) != (self.key is None):
            raise ValueError("a client certificate needs both cert and key")
        return self


class DatabaseAuth(Model):
    username: str = Field(min_length=1, description="The role the sidecar logs in as")
    password: SecretStr | None = Field(
        default=None,
        description="Its password (SCRAM-SHA-256, md5 or cleartext, as the server asks); "
        "a rotated ${file:} takes effect for new server connections",
    )


class DatabasePool(Model):
    mode: Literal["transaction", "session"] = Field(
        default="transaction",
        description="transaction: a server connection per transaction (as pgbouncer); "
        "session: one per agent connection",
    )
    size: int = Field(default=10, ge=1, le=10_000, description="Server connections at most")
    min_idle: int = Field(default=0, ge=0, description="Idle server connections kept open")
    idle_timeout: Duration = Field(
        default=300.0, gt=0, description="An idle server connection is closed after this"
    )
    max_lifetime: Duration = Field(
        default=3600.0, gt=0, description="A server connection is closed once this old"
    )
    wait_timeout: Duration = Field(
        default=30.0,
        gt=0,
        description="How long a query waits for a server connection when all are busy",
    )

    @model_validator(mode="after")
    def _idle_fits(self) -> DatabasePool:
        if self.min_idle > self.size:
            raise ValueError(f"min_idle ({self.min_idle}) is more than size ({self.size})")
        return self


class DatabaseRateLimit(Model):
    rate: RateValue = Field(description="Statements per time, like '20/s' or '600/min'")
    burst: int | None = Field(
        default=None, ge=1, description="Bucket size; default: one second's worth of rate"
    )
    per: Literal["database", "agent"] = Field(
        default="agent", description="One bucket for the database, or one per agent"
    )


class StatementRule(Model):
    """A statement is allowed when one rule names its agent, every table it touches and
    its kind."""

    agents: Annotated[list[AgentGlob], BeforeValidator(_one_or_many)] = Field(
        default_factory=lambda: ["*"], min_length=1, description="Agent names or globs"
    )
    tables: Annotated[list[TableGlob], BeforeValidator(_one_or_many)] = Field(
        default_factory=lambda: ["*"],
        min_length=1,
        description="schema.table, schema.* or *; an unqualified name is public.<name>",
    )
    statements: Annotated[list[StatementKind], BeforeValidator(_one_or_many)] = Field(
        default_factory=list, description="Statement kinds; empty: any kind"
    )


class Database(Model):
    listen: Listen = Field(description="Loopback HOST:PORT agents connect to (PostgreSQL wire)")
    upstream: Annotated[str, AfterValidator(_upstream)] = Field(
        description="postgres://host[:port]/database"
    )
    tls: DatabaseTls = Field(default_factory=DatabaseTls)
    auth: DatabaseAuth
    pool: DatabasePool = Field(default_factory=DatabasePool)
    statement_timeout: Duration | None = Field(
        default=None, gt=0, description="Set on every server session; agents cannot undo it"
    )
    read_only: bool = Field(
        default=False,
        description="Refuse writes and open every server session with "
        "default_transaction_read_only = on",
    )
    max_rows: int | None = Field(
        default=None, ge=1, description="A result is stopped, with an error, after this many rows"
    )
    rate_limit: list[DatabaseRateLimit] = Field(default_factory=list)
    allow: list[StatementRule] | None = Field(
        default=None,
        description="Statement rules; absent: every statement the guards let through; "
        "empty: nothing",
    )

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _one_limit(cls, v: Any) -> Any:
        return [v] if isinstance(v, dict) else v

    @property
    def target(self) -> Upstream:
        return parse_upstream(self.upstream)

    @property
    def address(self) -> tuple[str, int]:
        return split_address(self.listen)


def _names(value: dict[str, Database]) -> dict[str, Database]:
    for name in value:
        if not _NAME.match(name):
            raise ValueError(f"database name {name!r} may hold only letters, digits, _ . -")
    seen: dict[tuple[str, int], str] = {}
    for name, db in value.items():
        address = db.address
        if address[1] != 0 and address in seen:
            raise ValueError(f"listen {db.listen} of '{name}' is already used by '{seen[address]}'")
        seen[address] = name
    return value


Databases = Annotated[dict[str, Database], AfterValidator(_names)]


def merge(parts: list[dict[str, Database]]) -> tuple[dict[str, Database], list[str]]:
    """The databases of several policy files as one, and what clashes between them."""
    merged: dict[str, Database] = {}
    listens: dict[tuple[str, int], str] = {}
    clashes: list[str] = []
    for part in parts:
        for name, db in part.items():
            if name in merged:
                clashes.append(f"database '{name}' is defined twice")
                continue
            address = db.address
            if address[1] != 0 and address in listens:
                clashes.append(
                    f"listen {db.listen} of '{name}' is already used by '{listens[address]}'"
                )
                continue
            merged[name] = db
            listens[address] = name
    return merged, clashes
