"""Cloud connectors in the policy: `auth: {type: aws_sigv4}` and `objects:` rules.

`aws_sigv4` signs every call with AWS credentials the agent never holds
(steps/credentials/aws.py); `objects:` says which agent may read, write, list
or delete which buckets and keys of an S3-compatible service (steps/access/objects.py).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, ValidationInfo, field_validator, model_validator

from .base import AUTHORIZATION, Duration, Model, SecretStr, Size
from .secrets import Secret, resolver_from_context

_AWS_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_KEYS = ("access_key_id", "secret_access_key", "session_token")


def _http_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http:// or https:// URL")
    return value.rstrip("/")


class WebIdentity(Model):
    """The EKS/IRSA way: a projected token file exchanged at STS for a role's credentials."""

    role_arn: str = Field(description="The role to assume, arn:aws:iam::ACCOUNT:role/NAME")
    token_file: str = Field(
        description="The OIDC token (e.g. /var/run/secrets/eks.amazonaws.com/serviceaccount/"
        "token), read again at each exchange, so a rotated token is used"
    )
    # STS's RoleSessionName: ASCII letters, digits and _+=,.@- (its `\w` is ASCII). Spelled
    # out: pydantic-core's regex engine expands a Unicode `\w` repeated {2,64} into an
    # automaton of 4.5 MiB that every sidecar process kept, AWS or not.
    session_name: str = Field(default="agent-sidecar", pattern=r"^[A-Za-z0-9_+=,.@-]{2,64}$")
    sts_endpoint: str | None = Field(
        default=None, description="Default: https://sts.REGION.amazonaws.com"
    )
    duration: Duration = Field(
        default=3600.0, ge=900, le=43200, description="Lifetime asked for the credentials"
    )
    refresh_before: Duration = Field(
        default=300.0, ge=0, description="Fetch new credentials this long before expiry"
    )

    @field_validator("role_arn")
    @classmethod
    def _check_arn(cls, v: str) -> str:
        if not _ROLE_ARN.match(v):
            raise ValueError("role_arn must look like arn:aws:iam::123456789012:role/NAME")
        return v

    @field_validator("token_file")
    @classmethod
    def _check_file(cls, v: str) -> str:
        if not os.path.isabs(v):
            raise ValueError("token_file must be an absolute path")
        return v

    @field_validator("sts_endpoint")
    @classmethod
    def _check_endpoint(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v, "sts_endpoint")


class AwsSigV4Auth(Model):
    type: Literal["aws_sigv4"]
    service: str = Field(description="The signing name: s3, bedrock, sts, execute-api, ...")
    region: str = Field(description="The signing region, e.g. us-east-1")
    access_key_id: SecretStr | None = Field(
        default=None, description="With secret_access_key (and session_token): static keys"
    )
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile: str | None = Field(
        default=None,
        description="A profile of the shared credentials file, read at load (and again "
        "when the file changes)",
    )
    credentials_file: str | None = Field(
        default=None,
        description="The shared credentials file of `profile`; default: "
        "$AWS_SHARED_CREDENTIALS_FILE, else ~/.aws/credentials",
    )
    web_identity: WebIdentity | None = Field(
        default=None, description="Credentials of a role assumed with a web identity token"
    )
    payload: Literal["unsigned", "signed"] | None = Field(
        default=None,
        description="unsigned: UNSIGNED-PAYLOAD, the body streamed as it comes (S3); signed: "
        "the body's SHA-256 signed, so the body is held in memory up to max_body. "
        "Default: unsigned for s3, signed for every other service",
    )

    @field_validator("service", "region")
    @classmethod
    def _check_name(cls, v: str) -> str:
        if not _AWS_NAME.match(v):
            raise ValueError("expected a lower-case AWS name like 's3' or 'us-east-1'")
        return v

    @model_validator(mode="before")
    @classmethod
    def _read_profile(cls, data: Any, info: ValidationInfo) -> Any:
        if not isinstance(data, dict) or data.get("profile") is None:
            return data
        if any(data.get(k) is not None for k in _KEYS):
            raise ValueError(f"profile and {'/'.join(_KEYS)} are exclusive")
        import configparser  # only policies with a profile read one

        resolver = resolver_from_context(info.context)
        path = data.get("credentials_file") or os.environ.get(
            "AWS_SHARED_CREDENTIALS_FILE", os.path.expanduser("~/.aws/credentials")
        )
        if not isinstance(path, str) or not os.path.isabs(path):
            raise ValueError("credentials_file must be an absolute path")
        if resolver.check_only:
            return {**data, "access_key_id": "unresolved", "secret_access_key": "unresolved"}
        # Watched like a ${file:} secret: a rotated credentials file takes effect.
        resolver.files.add(path)
        parser = configparser.RawConfigParser()
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
            parser.read_string(text)
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not a credentials file"
            raise ValueError(f"cannot read credentials file {path}: {why}") from None
        resolver.digest.update(path.encode() + b"\0" + text.encode() + b"\0")
        profile = str(data["profile"])
        if not parser.has_section(profile):
            raise ValueError(f"credentials file {path} has no profile [{profile}]")
        found = {
            key: parser.get(profile, f"aws_{key}").strip()
            for key in _KEYS
            if parser.has_option(profile, f"aws_{key}")
        }
        if "access_key_id" not in found or "secret_access_key" not in found:
            raise ValueError(
                f"profile [{profile}] of {path} lacks aws_access_key_id or aws_secret_access_key"
            )
        return {**data, **found}

    @model_validator(mode="after")
    def _one_source(self) -> AwsSigV4Auth:
        keys = self.access_key_id is not None or self.secret_access_key is not None
        if self.web_identity is not None and keys:
            raise ValueError("web_identity and access keys (or profile) are exclusive")
        if self.web_identity is None:
            if self.access_key_id is None or self.secret_access_key is None:
                raise ValueError(
                    "aws_sigv4 needs credentials: access_key_id and secret_access_key, "
                    "a profile, or web_identity"
                )
        elif self.session_token is not None:
            raise ValueError("session_token goes with access keys, not web_identity")
        return self

    @property
    def signed_payload(self) -> bool:
        return self.payload == "signed" or (self.payload is None and self.service != "s3")

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return AUTHORIZATION


ObjectAction = Literal["read", "write", "list", "delete", "admin"]


class ObjectRule(Model):
    """Who may do what on which buckets and keys; a call needs one rule that lets it."""

    agents: list[str] = Field(
        default_factory=lambda: ["*"], description="Agent names or globs; '*': any agent"
    )
    buckets: list[str] = Field(default_factory=lambda: ["*"], description="Bucket names or globs")
    keys: list[str] = Field(
        default_factory=lambda: ["**"],
        description="Key globs: * within a segment, ** across; {agent} is the calling agent "
        "(agents/{agent}/** gives each agent its own prefix). Listing needs a prefix inside one",
    )
    actions: list[ObjectAction] = Field(
        min_length=1,
        description="read (GET, HEAD, a copy's source), write (PUT, multipart), list, delete, "
        "admin (bucket creation, deletion, settings)",
    )


class Objects(Model):
    """Object-store rules of an S3-compatible service (steps/access/objects.py)."""

    addressing: Literal["path", "virtual"] = Field(
        default="path",
        description="path: /BUCKET/KEY; virtual: the upstream host is BUCKET.s3..., the path "
        "the key",
    )
    rules: list[ObjectRule] = Field(default_factory=list, description="Empty: nothing allowed")
    read_only: bool = Field(default=False, description="Refuse every write, delete and admin")
    max_object_size: Size | None = Field(
        default=None, description="Largest object uploaded (a multipart upload's parts summed)"
    )
    content_types: list[str] | None = Field(
        default=None,
        description="Content types an upload may declare (globs like image/*); none declared "
        "counts as binary/octet-stream",
    )


_GCP_KINDS = ("service_account", "external_account")
CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"


class GcpAuth(Model):
    """Google access tokens from google-auth (steps/credentials/gcp.py)."""

    type: Literal["gcp"]
    credentials: SecretStr | None = Field(
        default=None,
        description="The JSON of a service-account key or of an external-account file "
        "(workload identity federation), e.g. ${file:/var/run/secrets/gcp/key.json}; "
        "absent: the metadata server (GKE workload identity, Compute Engine)",
    )
    scopes: list[str] = Field(
        default_factory=lambda: [CLOUD_PLATFORM], min_length=1, description="OAuth2 scopes"
    )
    refresh_before: Duration = Field(
        default=300.0, ge=0, description="Fetch a new token this long before expiry"
    )

    @field_validator("credentials")
    @classmethod
    def _check_credentials(cls, v: Secret | None, info: ValidationInfo) -> Secret | None:
        if v is None or (resolver_from_context(info.context).check_only and "${" in v.source):
            return v
        try:
            data = json.loads(v.reveal())
        except ValueError:
            raise ValueError("credentials is not JSON (a service-account key file)") from None
        kind = data.get("type") if isinstance(data, dict) else None
        if kind not in _GCP_KINDS:
            raise ValueError(f"credentials must be a file of type {' or '.join(_GCP_KINDS)}")
        if kind == "service_account":
            missing = [k for k in ("client_email", "private_key", "token_uri") if k not in data]
            if missing:
                raise ValueError(f"the service-account key lacks {', '.join(missing)}")
        return v

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return AUTHORIZATION


class ManagedIdentity(Model):
    client_id: str | None = Field(
        default=None, description="A user-assigned identity; absent: the system-assigned one"
    )
    endpoint: str = Field(
        default="http://169.254.169.254/metadata/identity/oauth2/token",
        description="The instance metadata (IMDS) token endpoint",
    )

    @field_validator("endpoint")
    @classmethod
    def _check_endpoint(cls, v: str) -> str:
        return _http_url(v, "endpoint")


class WorkloadIdentity(Model):
    """AKS workload identity: a federated token exchanged at Microsoft Entra ID.

    Each key defaults to the variable the AKS webhook sets in the pod."""

    tenant_id: str | None = Field(default=None, description="Default: $AZURE_TENANT_ID")
    client_id: str | None = Field(default=None, description="Default: $AZURE_CLIENT_ID")
    token_file: str | None = Field(default=None, description="Default: $AZURE_FEDERATED_TOKEN_FILE")
    authority: str | None = Field(
        default=None,
        description="Default: $AZURE_AUTHORITY_HOST, else https://login.microsoftonline.com",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_env(cls, data: Any, info: ValidationInfo) -> Any:
        if data is True:
            data = {}
        if not isinstance(data, dict):
            return data
        resolver = resolver_from_context(info.context)
        out = dict(data)
        for key, var in (
            ("tenant_id", "AZURE_TENANT_ID"),
            ("client_id", "AZURE_CLIENT_ID"),
            ("token_file", "AZURE_FEDERATED_TOKEN_FILE"),
        ):
            if out.get(key) is None:
                value = resolver.env.get(var)
                if value is None and not resolver.check_only:
                    raise ValueError(f"workload_identity.{key} is not set, nor is ${var}")
                out[key] = value
        if out.get("authority") is None:
            out["authority"] = (
                resolver.env.get("AZURE_AUTHORITY_HOST") or "https://login.microsoftonline.com"
            )
        return out

    @field_validator("authority")
    @classmethod
    def _check_authority(cls, v: str | None) -> str | None:
        return None if v is None else _http_url(v, "authority")

    @field_validator("token_file")
    @classmethod
    def _check_file(cls, v: str | None) -> str | None:
        if v is not None and not os.path.isabs(v):
            raise ValueError("token_file must be an absolute path")
        return v


class AzureAuth(Model):
    """Microsoft Entra ID access tokens (steps/credentials/azure.py)."""

    type: Literal["azure"]
    scope: str = Field(description="What the token is for, e.g. https://storage.azure.com/.default")
    managed_identity: ManagedIdentity | None = Field(
        default=None, description="The VM's or pod's managed identity (the default)"
    )
    workload_identity: WorkloadIdentity | None = Field(
        default=None, description="AKS workload identity federation"
    )
    refresh_before: Duration = Field(
        default=300.0, ge=0, description="Fetch a new token this long before expiry"
    )

    @model_validator(mode="after")
    def _one_source(self) -> AzureAuth:
        if self.managed_identity is not None and self.workload_identity is not None:
            raise ValueError("managed_identity and workload_identity are exclusive")
        return self

    @property
    def credential_header(self) -> str | None:
        """The header the credential lands in (the agent's own value there is dropped)."""
        return AUTHORIZATION
