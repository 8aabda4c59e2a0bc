"""Object-store rules (`objects:`): who may read, write, list or delete which keys.

Any S3-compatible API. Each call is classified once, from its method, path
and query, into an action on a bucket and key (or a listing under a prefix);
the call goes on only if a rule names the agent, the bucket, the key and the
action. Then the service-wide checks: read_only, the largest object
(a multipart upload's parts summed as they arrive), allowed content types.

- Path-style addressing (`/BUCKET/KEY`), or virtual-hosted (`addressing:
  virtual`: the upstream host is `BUCKET.s3...`, the path is the key).
- A copy (`x-amz-copy-source`) also needs read on its source; a multi-object
  delete (`POST ?delete`) needs delete on every key its body names.
- Presigned URLs are refused: they carry a credential the agent may not have,
  and name an identity the rules cannot see.
- `{agent}` in a key glob is the calling agent (`agents/{agent}/**`); a call
  without an agent, or an agent name with a `/`, matches no such rule.

Every refusal is 403 `forbidden`, naming the rule that refused.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections import OrderedDict
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

from ...core.call import Call, Handler, Reply, make_replayable
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.cloud import ObjectRule, Objects
from ...policy.loaded import ServicePolicy

# A multi-object delete's XML body is read to check its keys; S3 allows 1000 keys.
DELETE_BODY_LIMIT: Final = 1 << 20
# Multipart uploads whose part sizes are tracked; the oldest are forgotten first.
TRACKED_UPLOADS: Final = 10_000
DEFAULT_CONTENT_TYPE: Final = "binary/octet-stream"
_PRESIGNED: Final = frozenset({"x-amz-signature", "x-amz-credential"})


class Operation:
    """What one call does, in the rules' words."""

    __slots__ = ("action", "bucket", "key", "prefix")

    def __init__(
        self, action: str, bucket: str | None, key: str | None = None, prefix: str | None = None
    ) -> None:
        self.action = action
        self.bucket = bucket
        self.key = key
        self.prefix = prefix  # a listing's


def classify(method: str, path: str, query: dict[str, str], *, bucket: str | None) -> Operation:
    """`bucket`: the virtual host's bucket (then the whole path is the key), else None."""
    if bucket is None:
        name, _, rest = path.lstrip("/").partition("/")
        bucket, key = (unquote(name) or None), unquote(rest)
    else:
        key = unquote(path[1:])
    if bucket is None:
        return Operation("list" if method in ("GET", "HEAD") else "admin", None, prefix="")
    if not key:
        if method in ("GET", "HEAD"):
            return Operation("list", bucket, prefix=query.get("prefix", ""))
        if method == "POST" and "delete" in query:
            return Operation("delete", bucket)  # the keys are in the body
        return Operation("admin", bucket)
    if method in ("GET", "HEAD"):
        return Operation("read", bucket, key)
    if method == "DELETE":
        # Aborting a multipart upload discards what the same writer sent.
        return Operation("write" if "uploadId" in query else "delete", bucket, key)
    if method == "POST" and ("restore" in query or "select" in query):
        return Operation("read", bucket, key)
    return Operation("write", bucket, key)


@functools.lru_cache(maxsize=4096)
def _key_pattern(glob: str, agent: str | None) -> re.Pattern[str] | None:
    if "{agent}" in glob and (agent is None or "/" in agent or not agent):
        return None
    out = []
    for part in re.split(r"(\*\*|\*|\?|\{agent\})", glob):
        if part == "**":
            out.append(".*")
        elif part == "*":
            out.append("[^/]*")
        elif part == "?":
            out.append("[^/]")
        elif part == "{agent}":
            out.append(re.escape(agent or ""))
        else:
            out.append(re.escape(part))
    return re.compile("".join(out) + r"\Z", re.DOTALL)


def _fixed_prefix(glob: str, agent: str | None) -> str | None:
    """The literal start of a key glob, what every key it matches begins with."""
    if "{agent}" in glob and (agent is None or "/" in agent or not agent):
        return None
    head = re.split(r"\*|\?", glob, maxsplit=1)[0]
    return head.replace("{agent}", agent or "")


class Rule:
    def __init__(self, number: int, spec: ObjectRule) -> None:
        self.number = number
        self.agents = tuple(spec.agents)
        self.buckets = tuple(spec.buckets)
        self.keys = tuple(spec.keys)
        self.actions = frozenset(spec.actions)

    def lets(self, agent: str | None, op: Operation, key: str | None = None) -> bool:
        if op.action not in self.actions:
            return False
        name = agent or ""
        if not any(glob == "*" or fnmatch.fnmatchcase(name, glob) for glob in self.agents):
            return False
        if op.bucket is None:  # the list of buckets: every bucket's name
            return "*" in self.buckets
        if not any(fnmatch.fnmatchcase(op.bucket, glob) for glob in self.buckets):
            return False
        if op.action == "admin":
            return True
        if op.action == "list":
            prefix = op.prefix or ""
            for glob in self.keys:
                fixed = _fixed_prefix(glob, agent)
                if fixed is not None and prefix.startswith(fixed):
                    return True
            return False
        key = op.key if key is None else key
        for glob in self.keys:
            pattern = _key_pattern(glob, agent)
            if pattern is not None and pattern.match(key or ""):
                return True
        return False


class Uploads:
    """Part sizes of the multipart uploads in progress, per upload id (state store)."""

    def __init__(self) -> None:
        self.parts: OrderedDict[str, dict[str, int]] = OrderedDict()

    def total_with(self, upload: str, part: str, size: int) -> int:
        sizes = self.parts.get(upload, {})
        return sum(v for k, v in sizes.items() if k != part) + size

    def record(self, upload: str, part: str, size: int) -> None:
        sizes = self.parts.get(upload)
        if sizes is None:
            sizes = self.parts[upload] = {}
            while len(self.parts) > TRACKED_UPLOADS:
                self.parts.popitem(last=False)
        sizes[part] = size

    def forget(self, upload: str) -> None:
        self.parts.pop(upload, None)


class ObjectRules:
    """The step."""

    def __init__(self, *, service: str, spec: Objects, upstream: str, uploads: Uploads) -> None:
        self.service = service
        self.rules = tuple(Rule(i, r) for i, r in enumerate(spec.rules, 1))
        self.read_only = spec.read_only
        self.max_size = spec.max_object_size
        self.content_types = tuple(spec.content_types) if spec.content_types else None
        host = urlsplit(upstream).hostname or ""
        self.bucket = host.split(".", 1)[0] if spec.addressing == "virtual" else None
        self.uploads = uploads

    async def __call__(self, call: Call, next: Handler) -> Reply:
        path, _, raw_query = call.target.partition("?")
        query = dict(parse_qsl(raw_query, keep_blank_values=True))
        lowered = {name.lower() for name in query}
        if lowered & _PRESIGNED or ("signature" in lowered and "awsaccesskeyid" in lowered):
            raise self._refuse(
                "objects: presigned URLs are refused (they carry a credential of their own); "
                "send the call unsigned, through the sidecar, which signs it"
            )
        op = classify(call.method, path, query, bucket=self.bucket)
        if op.key is not None and any(part in (".", "..") for part in op.key.split("/")):
            # Literal on S3, but resolved by some S3-compatible servers: out of a prefix.
            raise self._refuse("objects: keys with '.' or '..' segments are refused")
        if self.read_only and op.action in ("write", "delete", "admin"):
            raise self._refuse(f"objects.read_only: service '{self.service}' is read-only")
        if op.action == "delete" and op.key is None:
            for key in await self._delete_keys(call):
                self._check(call.agent, op, key)
        else:
            self._check(call.agent, op)
        if op.action == "write":
            self._check_upload(call, op, query)
        source = call.header("x-amz-copy-source")
        if source and op.action == "write":
            self._check_copy_source(call.agent, source)
        return await next(call)

    def _check(self, agent: str | None, op: Operation, key: str | None = None) -> None:
        for rule in self.rules:
            if rule.lets(agent, op, key):
                return
        who = f"agent '{agent}'" if agent else "a call without an agent"
        what = op.action
        if op.bucket is None:
            where = "the list of buckets"
        elif op.action == "list":
            where = f"bucket '{op.bucket}' under prefix '{op.prefix or ''}'"
        elif op.action == "admin":
            where = f"bucket '{op.bucket}' (its creation, deletion or settings)"
        else:
            where = f"key '{key if key is not None else op.key}' in bucket '{op.bucket}'"
        raise self._refuse(f"objects.rules: no rule lets {who} {what} {where}")

    def _check_upload(self, call: Call, op: Operation, query: dict[str, str]) -> None:
        upload = query.get("uploadId")
        creates = call.method == "POST" and "uploads" in query
        if call.method == "POST" and upload is not None:
            self.uploads.forget(upload)  # completed
            return
        if call.method == "DELETE" and upload is not None:
            self.uploads.forget(upload)  # aborted
            return
        has_body = call.method == "PUT" and not (set(query) - {"partNumber", "uploadId"})
        copies = call.header("x-amz-copy-source") is not None
        if self.content_types is not None and (creates or (has_body and upload is None)):
            declared = (call.header("content-type") or DEFAULT_CONTENT_TYPE).split(";")[0]
            declared = declared.strip().lower()
            if not any(fnmatch.fnmatchcase(declared, glob) for glob in self.content_types):
                raise self._refuse(
                    f"objects.content_types: '{declared}' is not one of "
                    f"{', '.join(self.content_types)}"
                )
        if self.max_size is None or not has_body or copies:
            return
        size = self._declared_size(call)
        if size is None:
            raise self._refuse(
                "objects.max_object_size: an upload must declare its size (Content-Length)"
            )
        if upload is not None:
            part = query.get("partNumber", "")
            total = self.uploads.total_with(upload, part, size)
            if total > self.max_size:
                raise self._refuse(
                    f"objects.max_object_size: the parts of this multipart upload add up to "
                    f"{total} bytes, over {self.max_size}"
                )
            self.uploads.record(upload, part, size)
        elif size > self.max_size:
            raise self._refuse(
                f"objects.max_object_size: the object is {size} bytes, over {self.max_size}"
            )

    @staticmethod
    def _declared_size(call: Call) -> int | None:
        # aws-chunked framing: the object is the decoded length, not the framed body's.
        decoded = call.header("x-amz-decoded-content-length")
        if decoded is not None:
            return int(decoded) if decoded.isdigit() else None
        return call.content_length

    def _check_copy_source(self, agent: str | None, source: str) -> None:
        path = unquote(source.partition("?")[0]).lstrip("/")
        bucket, _, key = path.partition("/")
        self._check(agent, Operation("read", bucket or None, key))

    async def _delete_keys(self, call: Call) -> list[str]:
        import xml.etree.ElementTree as ET  # only multi-object deletes carry XML

        if not await make_replayable(call, DELETE_BODY_LIMIT) or not isinstance(
            call.body, bytes | None
        ):
            raise self._refuse("objects.rules: a multi-object delete body is too large to check")
        try:
            root = ET.fromstring(call.body or b"")
        except ET.ParseError:
            raise self._refuse("objects.rules: a multi-object delete body is not XML") from None
        keys = [e.text or "" for e in root.iter() if e.tag.rpartition("}")[2] == "Key"]
        if not keys:
            raise self._refuse("objects.rules: a multi-object delete names no key")
        return keys

    def _refuse(self, detail: str) -> ProblemError:
        # Each detail starts with the rule's name ("objects.max_object_size: ..."), also
        # given alone as `rule`, for an agent that reads the body as data.
        return ProblemError(
            Reason.forbidden,
            f"Service '{self.service}' refused the call: {detail}.",
            service=self.service,
            extra={"rule": detail.partition(":")[0]},
        )


def build(service: ServicePolicy, *, state: StateBuild) -> ObjectRules | None:
    spec = service.spec.objects
    if spec is None:
        return None
    uploads = state.get(service.name, "objects_uploads", spec.max_object_size, Uploads)
    return ObjectRules(
        service=service.name, spec=spec, upstream=service.spec.upstream, uploads=uploads
    )
