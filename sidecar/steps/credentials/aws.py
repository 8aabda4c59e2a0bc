"""AWS credentials and the `aws_sigv4` step: every call signed with keys the agent never holds.

Credentials come from the policy's keys (`${env:}`, `${file:}`, a shared
credentials file's profile: all read at load), or from a web identity: the
projected token file is exchanged at STS (`AssumeRoleWithWebIdentity`, an
unsigned call) for a role's temporary keys, cached and renewed before they
expire, one exchange at a time (refresh.py).

The step first removes what the agent signed with (Authorization, X-Amz-Date,
X-Amz-Security-Token, X-Amz-Content-Sha256, and any presigned query: X-Amz-*),
then signs the call as it will be sent: the upstream's Host and base path,
the agent's query, and the fields AWS wants signed (Content-Type, Content-MD5,
every x-amz-*). It runs inside retry, so each attempt is signed afresh.

Payload: `unsigned` sends UNSIGNED-PAYLOAD and streams the body as it comes
(S3; a 50 MB upload is never held); `signed` reads the body, up to max_body,
and signs its SHA-256 (Bedrock and most other services require it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from datetime import datetime
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.base import AUTHORIZATION
from ...policy.cloud import AwsSigV4Auth, WebIdentity
from ...policy.loaded import ServicePolicy
from . import sigv4
from .refresh import Refreshing

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger("sidecar.auth")

# Signed bodies are held in memory; without a max_body, at most this much.
SIGNED_BODY_LIMIT: Final = 32 << 20
STS_TIMEOUT: Final = 10.0
_DROP: Final = ("authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256")
# Fields signed besides host and x-amz-*: what S3 and the SDKs sign that a proxy may see.
_SIGNED: Final = frozenset({"content-type", "content-md5"})
_OWN_SIGNED: Final = "host;x-amz-content-sha256;x-amz-date"
_OWN_SIGNED_WITH_TOKEN: Final = f"{_OWN_SIGNED};x-amz-security-token"
_SIGNED_RAW: Final = frozenset(name.encode() for name in _SIGNED)
# The agent's own streaming form that stays unsigned: its body is aws-chunked framing
# with a trailing checksum, and the value tells the upstream so.
_KEPT_PAYLOADS: Final = frozenset({"STREAMING-UNSIGNED-PAYLOAD-TRAILER"})
_SIGV2_PRESIGNED: Final = frozenset({"awsaccesskeyid", "signature", "expires"})
_STS_NS: Final = "{https://sts.amazonaws.com/doc/2011-06-15/}"
# The clock credential lifetimes are measured with; tests replace it before building.
CLOCK = time.monotonic


class AwsCredentials:
    __slots__ = ("access_key", "secret", "token")

    def __init__(self, access_key: str, secret: str, token: str | None) -> None:
        self.access_key = access_key
        self.secret = secret
        self.token = token

    def __repr__(self) -> str:
        return f"AwsCredentials({self.access_key[:4]}...)"


class StaticCredentials:
    def __init__(self, credentials: AwsCredentials) -> None:
        self.credentials = credentials

    def fresh(self) -> AwsCredentials:
        return self.credentials

    async def get(self) -> AwsCredentials:
        return self.credentials

    def retire(self) -> None:
        return None


class WebIdentityCredentials:
    """A role's temporary keys, from STS for the projected token."""

    def __init__(self, *, service: str, spec: WebIdentity, region: str) -> None:
        self.service = service
        self._spec = spec
        self._url = spec.sts_endpoint or f"https://sts.{region}.amazonaws.com"
        self._refreshing: Refreshing[AwsCredentials] = Refreshing(
            self._assume, refresh_before=spec.refresh_before, clock=CLOCK
        )
        self._session: aiohttp.ClientSession | None = None  # opened at the first exchange

    @property
    def fetches(self) -> int:
        return self._refreshing.fetches

    def fresh(self) -> AwsCredentials | None:
        return self._refreshing.fresh()

    async def get(self) -> AwsCredentials:
        return await self._refreshing.get()

    async def _assume(self) -> tuple[AwsCredentials, float]:
        # Imported here: a policy with static keys never needs an HTTP client.
        import aiohttp

        spec = self._spec
        try:
            token = (await asyncio.to_thread(_read_text, spec.token_file)).strip()
        except (OSError, UnicodeDecodeError):
            raise self._failed(f"the token file {spec.token_file} could not be read") from None
        form = {
            "Action": "AssumeRoleWithWebIdentity",
            "Version": "2011-06-15",
            "RoleArn": spec.role_arn,
            "RoleSessionName": spec.session_name,
            "WebIdentityToken": token,
            "DurationSeconds": str(int(spec.duration)),
        }
        session = self._session
        if session is None:
            session = self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=STS_TIMEOUT),
                cookie_jar=aiohttp.DummyCookieJar(),
                trust_env=False,
            )
        asked = time.time()
        try:
            async with session.post(self._url, data=form) as resp:
                status = resp.status
                raw = await resp.read()
        except TimeoutError:
            raise self._failed(f"STS did not answer within {STS_TIMEOUT:g}s") from None
        except aiohttp.ClientError:
            raise self._failed("STS could not be reached") from None
        return self._parse(status, raw, asked, spec.duration)

    def _parse(
        self, status: int, raw: bytes, asked: float, duration: float
    ) -> tuple[AwsCredentials, float]:
        import xml.etree.ElementTree as ET

        try:
            root = ET.fromstring(raw)
        except ET.ParseError:
            raise self._failed(f"STS answered HTTP {status} without XML") from None
        if status != 200:
            code = root.findtext(f".//{_STS_NS}Code") or root.findtext(".//Code") or ""
            safe = code if code.isascii() and code.isalnum() and len(code) < 64 else ""
            raise self._failed(f"STS answered HTTP {status}" + (f" ({safe})" if safe else ""))
        found = root.find(f".//{_STS_NS}Credentials")
        if found is None:
            found = root.find(".//Credentials")
        if found is None:
            raise self._failed("STS's answer has no Credentials")

        def field(name: str) -> str:
            return (found.findtext(_STS_NS + name) or found.findtext(name) or "").strip()

        key, secret, token = field("AccessKeyId"), field("SecretAccessKey"), field("SessionToken")
        if not key or not secret or not token:
            raise self._failed("STS's answer lacks a key, secret or session token")
        try:
            expires = datetime.fromisoformat(field("Expiration").replace("Z", "+00:00"))
            lifetime = expires.timestamp() - asked
        except ValueError:
            lifetime = duration
        if lifetime <= 0:
            lifetime = duration  # a clock apart from STS's: trust the duration asked for
        log.debug("service %s: new AWS role credentials, valid %gs", self.service, lifetime)
        return AwsCredentials(key, secret, token), lifetime

    def _failed(self, why: str) -> ProblemError:
        log.warning("service %s: web identity exchange failed: %s", self.service, why)
        return ProblemError(
            Reason.auth_failed,
            f"The sidecar could not get AWS credentials for service '{self.service}': {why}. "
            "The call was not sent; try again later.",
            service=self.service,
        )

    def retire(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            asyncio.get_running_loop().create_task(session.close())


def _read_text(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


CredentialSource = StaticCredentials | WebIdentityCredentials


class Signer:
    """Signs a call, synchronously, once its credentials and payload hash are known."""

    def __init__(self, *, service: str, spec: AwsSigV4Auth, upstream: str) -> None:
        parts = urlsplit(upstream)
        host = parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        default = 443 if parts.scheme == "https" else 80
        port = parts.port or default
        self.service = service
        self.host = host if port == default else f"{host}:{port}"
        self._base = parts.path.rstrip("/")
        self._region = spec.region
        self._name = spec.service
        self._s3 = spec.service == "s3"
        self._key: tuple[str, str, bytes] = ("", "", b"")  # (secret, day, signing key)
        self._stamp: tuple[int, str] = (-1, "")

    def _amz_date(self) -> str:
        now = int(time.time())
        stamp = self._stamp
        if stamp[0] != now:
            stamp = self._stamp = (now, time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)))
        return stamp[1]

    def _signing_key(self, secret: str, day: str) -> bytes:
        cached = self._key
        if cached[0] != secret or cached[1] != day:
            cached = self._key = (
                secret,
                day,
                sigv4.signing_key(secret, day, self._region, self._name),
            )
        return cached[2]

    def sign(self, call: Call, credentials: AwsCredentials, payload: str | None) -> None:
        """`payload`: the body's hash, or None for an unsigned payload."""
        fields, agent_payload = self._agent_fields(call)
        if payload is None:
            payload = self._unsigned(agent_payload)
        path, sep, query = call.target.partition("?")
        if sep:
            query = _without_presigning(query)
        if self._s3:
            path = sigv4.canonical_path(path, s3=True)
            canonical = sigv4.canonical_path(self._base + path, s3=True) if self._base else path
        else:
            canonical = sigv4.canonical_path(self._base + path, s3=False)
        call.target = f"{path}?{query}" if query else path
        amz_date = self._amz_date()
        token = credentials.token
        query = sigv4.canonical_query(query)
        if fields:
            fields.append(("host", self.host))
            fields.append(("x-amz-date", amz_date))
            fields.append(("x-amz-content-sha256", payload))
            if token is not None:
                fields.append(("x-amz-security-token", token))
            text, names = sigv4.canonical_request(call.method, canonical, query, fields, payload)
        else:
            # Only the sidecar's own fields (a plain GET): already in canonical order.
            lines = f"host:{self.host}\nx-amz-content-sha256:{payload}\nx-amz-date:{amz_date}\n"
            if token is not None:
                lines += f"x-amz-security-token:{token}\n"
                names = _OWN_SIGNED_WITH_TOKEN
            else:
                names = _OWN_SIGNED
            text = f"{call.method}\n{canonical}\n{query}\n{lines}\n{names}\n{payload}"
        day = amz_date[:8]
        scope = f"{day}/{self._region}/{self._name}/aws4_request"
        signature = sigv4.signature(
            self._signing_key(credentials.secret, day), amz_date, scope, text
        )
        added = [
            ("X-Amz-Date", amz_date),
            ("X-Amz-Content-Sha256", payload),
            (AUTHORIZATION, sigv4.authorization(credentials.access_key, scope, names, signature)),
        ]
        if token is not None:
            added.append(("X-Amz-Security-Token", token))
        call.set_headers(added)

    @staticmethod
    def _agent_fields(call: Call) -> tuple[list[tuple[str, str]], str | None]:
        """The agent's fields to sign (its own signature's fields left out, the session
        token removed), and the payload hash it declared."""
        fields: list[tuple[str, str]] = []
        agent_payload: str | None = None
        raw = call.raw_headers
        if raw is not None:
            # The fields as bytes, not decoded: most calls carry no x-amz-* at all.
            token = False
            for raw_name, raw_value in raw:
                key = raw_name.lower()
                if key in _SIGNED_RAW or key.startswith(b"x-amz-"):
                    if key == b"x-amz-content-sha256":
                        agent_payload = raw_value.decode("latin-1")
                    elif key == b"x-amz-security-token":
                        token = True
                    elif key != b"x-amz-date":
                        fields.append((key.decode("latin-1"), raw_value.decode("latin-1")))
            if token:
                call.headers.popall("x-amz-security-token", None)
            return fields, agent_payload
        headers = call.headers
        agent_payload = headers.get("x-amz-content-sha256")
        for name in _DROP:
            headers.popall(name, None)
        for name, value in headers.items():
            lower = name.lower()
            if lower.startswith("x-amz-") or lower in _SIGNED:
                fields.append((lower, value))
        return fields, agent_payload

    def _unsigned(self, agent_payload: str | None) -> str:
        if agent_payload is None or agent_payload == sigv4.UNSIGNED_PAYLOAD:
            return sigv4.UNSIGNED_PAYLOAD
        if agent_payload in _KEPT_PAYLOADS:
            return agent_payload
        if agent_payload.startswith("STREAMING-"):
            raise ProblemError(
                Reason.bad_request,
                f"Service '{self.service}' re-signs every call, so a body signed chunk by "
                f"chunk ({agent_payload}) cannot be sent; upload it unsigned (the default of "
                "AWS SDKs over plain HTTP) or in one piece.",
                service=self.service,
            )
        return sigv4.UNSIGNED_PAYLOAD


class AwsSigV4:
    """The step: remove the agent's signature, sign the call with the sidecar's keys."""

    def __init__(
        self,
        *,
        signer: Signer,
        source: CredentialSource,
        signed_payload: bool,
        max_body: int | None,
    ) -> None:
        self.signer = signer
        self.service = signer.service
        self.source = source
        self._signed = signed_payload
        self._limit = max_body or SIGNED_BODY_LIMIT

    async def __call__(self, call: Call, next: Handler) -> Reply:
        source = self.source
        credentials = source.fresh()
        if credentials is None:
            credentials = await source.get()
        payload = await self._hash_body(call) if self._signed else None
        self.signer.sign(call, credentials, payload)
        return await next(call)

    async def _hash_body(self, call: Call) -> str:
        body = call.body
        if body is None:
            return sigv4.EMPTY_SHA256
        if not isinstance(body, bytes):
            declared = call.content_length
            if declared is not None and declared > self._limit:
                raise self._too_large()
            chunks = []
            seen = 0
            async for chunk in body:
                seen += len(chunk)
                if seen > self._limit:
                    raise self._too_large()
                chunks.append(chunk)
            body = call.body = b"".join(chunks)
            call.content_length = len(body)
        return hashlib.sha256(body).hexdigest()

    def _too_large(self) -> ProblemError:
        return ProblemError(
            Reason.request_too_large,
            f"Service '{self.service}' signs each request body, so it holds it in memory: at "
            f"most {self._limit} bytes.",
            service=self.service,
        )


class StaticAwsSigV4:
    """Static keys and an unsigned payload: nothing to wait for, so a `call.Before` step
    (the chain calls `before` and the next step, with no coroutine of its own)."""

    def __init__(self, *, signer: Signer, credentials: AwsCredentials) -> None:
        self.signer = signer
        self.credentials = credentials

    def before(self, call: Call) -> None:
        self.signer.sign(call, self.credentials, None)

    async def __call__(self, call: Call, next: Handler) -> Reply:
        self.before(call)
        return await next(call)


def _without_presigning(query: str) -> str:
    # A presigned URL's parameters (SigV4's X-Amz-*, SigV2's AWSAccessKeyId, Signature,
    # Expires) would make AWS check the agent's signature instead of ours.
    pairs = [p for p in query.split("&") if p]
    names = {p.partition("=")[0].lower() for p in pairs}
    drop = _SIGV2_PRESIGNED if "awsaccesskeyid" in names or "signature" in names else ()
    return "&".join(
        p for p in pairs if p[:6].lower() != "x-amz-" and p.partition("=")[0].lower() not in drop
    )


def build(
    service: ServicePolicy, spec: AwsSigV4Auth, *, state: StateBuild
) -> AwsSigV4 | StaticAwsSigV4:
    signer = Signer(service=service.name, spec=spec, upstream=service.spec.upstream)
    source: CredentialSource
    if spec.web_identity is not None:
        web = spec.web_identity
        source = state.get(
            service.name,
            "aws_web_identity",
            (web, spec.region),
            lambda: WebIdentityCredentials(service=service.name, spec=web, region=spec.region),
        )
    else:
        # The model requires both keys when there is no web identity.
        key = spec.access_key_id.reveal() if spec.access_key_id is not None else ""
        secret = spec.secret_access_key.reveal() if spec.secret_access_key is not None else ""
        token = spec.session_token.reveal() if spec.session_token is not None else None
        credentials = AwsCredentials(key, secret, token)
        if not spec.signed_payload:
            return StaticAwsSigV4(signer=signer, credentials=credentials)
        source = StaticCredentials(credentials)
    return AwsSigV4(
        signer=signer,
        source=source,
        signed_payload=spec.signed_payload,
        max_body=service.spec.max_body,
    )
