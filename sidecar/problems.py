"""The sidecar's own answers: RFC 9457 problem+json with an X-Sidecar-Error reason.

An agent, often an LLM reading the text, must be able to tell the sidecar's
refusals from the upstream's answers and know what to do next.
"""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Final

from .headers import SERVER

if TYPE_CHECKING:
    from aiohttp import web

PROBLEM_TYPE: Final = "https://agent-sidecar.dev/errors/"

# reason -> (status, title)
REASONS: Final[dict[str, tuple[int, str]]] = {
    "no_route": (404, "No route"),
    "bad_request": (400, "Bad request"),
    "method_not_allowed": (405, "Method not allowed"),
    "rate_limited": (429, "Rate limited by the sidecar"),
    # services.<name>.budget: a token or cost budget is spent until its window resets.
    "budget_exhausted": (429, "Budget exhausted"),
    "circuit_open": (503, "Circuit open"),
    "upstream_paused": (503, "Upstream asked for a pause"),
    "upstream_timeout": (504, "Upstream timeout"),
    "upstream_unreachable": (502, "Upstream unreachable"),
    "request_too_large": (413, "Request too large"),
    "auth_failed": (502, "Credential unavailable"),
    "unauthenticated": (401, "Agent identity required"),
    "forbidden": (403, "Not allowed by the sidecar's policy"),
    # services.<name>.validate: the call breaks, or is missing from, the OpenAPI document.
    "invalid_request": (422, "Request does not match the API's OpenAPI document"),
    "unknown_operation": (404, "No such operation in the API's OpenAPI document"),
    "internal_error": (500, "Sidecar internal error"),
    # Admin port only: a browser page's request to a state-changing endpoint.
    "forbidden_origin": (403, "Cross-origin request refused"),
    "http_version_not_supported": (505, "HTTP version not supported"),
    "graphql_limit": (400, "GraphQL operation over a limit"),
    # services.<name>.faults: an abort the policy asked for; its status is the policy's.
    "fault_injected": (503, "Fault injected by the sidecar"),
    # services.<name>.mode: mock, and no mock answer matches the call.
    "no_mock": (501, "No mock answer"),
    # services.<name>.mode: replay, and no recording matches the call.
    "no_recording": (501, "No recording"),
    # services.<name>.translate: the upstream's 2xx answer is not the JSON its API sends.
    "untranslatable_answer": (502, "Upstream answer could not be translated"),
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
    }
    if err.extra:
        for key, value in err.extra.items():
            document.setdefault(key, value)  # the standard members cannot be overridden
    return document


def problem_parts(
    err: ProblemError, service: str | None = None
) -> tuple[int, list[tuple[str, str]], bytes]:
    """Status, headers and body of the sidecar's answer, for any data plane to write."""
    body = problem_document(err, service)
    headers = [
        ("Content-Type", err.content_type),
        ("X-Sidecar-Error", err.reason),
        ("Server", SERVER),
    ]
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
