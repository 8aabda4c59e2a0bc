"""The sidecar's own answers: RFC 9457 problem+json with an X-Sidecar-Error reason.

An agent, often an LLM reading the text, must be able to tell the sidecar's
refusals from the upstream's answers and know what to do next. SDKs show only
what their ecosystem's error body names, so the document carries it too, as
extension members: a top-level `message` everywhere (the openai SDK 3.x and
many HTTP clients read it), an `error: {message, type, code}` object on an LLM
service's refusals (the openai and anthropic SDKs), and GraphQL's
`errors: [{message, extensions: {code}}]` on a GraphQL service's (gql, Apollo).
A refusal that retrying cannot clear soon carries `x-should-retry: false`,
which the openai and anthropic SDKs honour over their own retry rules.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Final

from .headers import SERVER
from .reasons import Reason

if TYPE_CHECKING:
    from aiohttp import web

PROBLEM_TYPE: Final = "https://agent-sidecar.dev/errors/"

# reason -> (status, title) of the HTTP answer
REASONS: Final[dict[str, tuple[int, str]]] = {
    Reason.no_route: (404, "No route"),
    Reason.bad_request: (400, "Bad request"),
    Reason.method_not_allowed: (405, "Method not allowed"),
    Reason.rate_limited: (429, "Rate limited by the sidecar"),
    # services.<name>.budget: a token or cost budget is spent until its window resets.
    Reason.budget_exhausted: (429, "Budget exhausted"),
    Reason.circuit_open: (503, "Circuit open"),
    Reason.upstream_paused: (503, "Upstream asked for a pause"),
    Reason.upstream_timeout: (504, "Upstream timeout"),
    Reason.upstream_unreachable: (502, "Upstream unreachable"),
    Reason.request_too_large: (413, "Request too large"),
    Reason.auth_failed: (502, "Credential unavailable"),
    Reason.unauthenticated: (401, "Agent identity required"),
    Reason.forbidden: (403, "Not allowed by the sidecar's policy"),
    # services.<name>.validate: the call breaks, or is missing from, the OpenAPI document.
    Reason.invalid_request: (422, "Request does not match the API's OpenAPI document"),
    Reason.unknown_operation: (404, "No such operation in the API's OpenAPI document"),
    Reason.internal_error: (500, "Sidecar internal error"),
    # Admin port only: a browser page's request to a state-changing endpoint.
    Reason.forbidden_origin: (403, "Cross-origin request refused"),
    Reason.http_version_not_supported: (505, "HTTP version not supported"),
    Reason.graphql_limit: (400, "GraphQL operation over a limit"),
    # services.<name>.faults: an abort the policy asked for; its status is the policy's.
    Reason.fault_injected: (503, "Fault injected by the sidecar"),
    # services.<name>.mode: mock, and no mock answer matches the call.
    Reason.no_mock: (501, "No mock answer"),
    # services.<name>.mode: replay, and no recording matches the call.
    Reason.no_recording: (501, "No recording"),
    # services.<name>.files (docs/files.md): no such file; a write's precondition failed;
    # a range past the file's end; an agent's quota (or the volume) is full.
    Reason.not_found: (404, "Not found"),
    Reason.precondition_failed: (412, "Precondition failed"),
    Reason.range_not_satisfiable: (416, "Range not satisfiable"),
    Reason.quota_exceeded: (507, "Storage quota exceeded"),
    # services.<name>.translate: the upstream's 2xx answer is not the JSON its API sends.
    Reason.untranslatable_answer: (502, "Upstream answer could not be translated"),
}


# Refusals a retry cannot clear soon: the SDKs' own retries (openai, anthropic) would only
# repeat them. Never rate_limited, circuit_open or upstream_paused: those clear by
# themselves, and their Retry-After says when.
NOT_RETRYABLE: Final = frozenset(
    {
        Reason.budget_exhausted,
        Reason.forbidden,
        Reason.invalid_request,
        Reason.no_mock,
        Reason.no_recording,
        Reason.unknown_operation,
    }
)
_NO_RETRY: Final = ("x-should-retry", "false")

# What each ecosystem reads from an error body (Route.dialect), besides problem+json.
PLAIN: Final = 0
LLM: Final = 1  # error: {message, type, code}, as OpenAI and Anthropic write it
GRAPHQL: Final = 2  # errors: [{message, extensions: {code}}]

# An LLM error's `type` by status, in the words both OpenAI and Anthropic use.
_LLM_TYPES: Final[dict[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class ProblemError(Exception):
    """Raised anywhere in a chain to make the sidecar answer for itself."""

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        service: str | None = None,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
        cause: str | None = None,
        extra: dict[str, object] | None = None,
        content_type: str = "application/problem+json",
        status: int | None = None,
        body: bytes | None = None,
    ) -> None:
        super().__init__(detail)
        # The whole body in another protocol's own form instead of the problem document
        # (an MCP refusal is a JSON-RPC error answer); None: the problem document.
        self.body = body
        # Another status than the reason's own (an injected abort's is the policy's).
        self._status = status
        # RFC 9457 extension members added to the body (e.g. invalid_request's `errors`).
        self.extra = extra
        # What went wrong on the wire, in the words retry/breaker `on:` lists use:
        # "connect-error", "timeout", "reset"; None for the sidecar's own refusals.
        self.cause = cause
        self.reason = reason
        self.detail = detail
        self.service = service
        self.retry_after = retry_after
        self.headers = headers
        # application/json for a client that accepts only that (an MCP client reads a
        # JSON-RPC error from a refusal only then); the body is the same problem document.
        self.content_type = content_type

    @property
    def status(self) -> int:
        return self._status or REASONS[self.reason][0]


def problem_document(err: ProblemError, service: str | None = None) -> dict[str, object]:
    """The RFC 9457 body, for any data plane that writes the answer itself."""
    title = REASONS[err.reason][1]
    status = err.status
    document: dict[str, object] = {
        "type": PROBLEM_TYPE + err.reason.replace("_", "-"),
        "title": title,
        "status": status,
        "detail": err.detail,
        "service": err.service or service,
        "reason": err.reason,
        # RFC 9457 allows extension members: the one most SDKs print.
        "message": err.detail,
    }
    if err.extra:
        for key, value in err.extra.items():
            document.setdefault(key, value)  # the standard members cannot be overridden
    return document


def problem_parts(
    err: ProblemError, service: str | None = None, dialect: int = PLAIN
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of the sidecar's answer, for any data plane to write;
    `dialect` adds the error members the service's SDKs read (LLM or GRAPHQL)."""
    body = problem_document(err, service)
    if dialect == LLM:
        body.setdefault(
            "error",
            {
                "message": err.detail,
                "type": _LLM_TYPES.get(err.status, "api_error"),
                "code": err.reason,
            },
        )
    elif dialect == GRAPHQL:
        body.setdefault("errors", [{"message": err.detail, "extensions": {"code": err.reason}}])
    headers = [
        ("Content-Type", err.content_type),
        ("X-Sidecar-Error", err.reason),
        ("Server", SERVER),
    ]
    if err.reason in NOT_RETRYABLE:
        headers.append(_NO_RETRY)
    if err.retry_after is not None:
        # Whole seconds, rounded up: an agent that waits exactly this long succeeds.
        seconds = max(1, math.ceil(err.retry_after))
        headers.append(("Retry-After", str(seconds)))
        body["retry_after"] = seconds
    if err.headers:
        extra = {name.lower() for name in err.headers}
        headers = [h for h in headers if h[0].lower() not in extra]
        headers.extend(err.headers.items())
    return err.status, headers, json.dumps(body).encode() if err.body is None else err.body


def problem_response(err: ProblemError, service: str | None = None) -> web.Response:
    """The same answer as an aiohttp Response (the admin port)."""
    from aiohttp import web

    status, headers, body = problem_parts(err, service)
    return web.Response(status=status, body=body, headers=headers)
