"""Why the sidecar answers for itself: one set of reasons for every protocol it speaks.

The value is the name agents and operators see: the X-Sidecar-Error header and the
problem document's `reason` on HTTP (core/problems.py, with each reason's status and
title), a webhook refusal's (webhooks/answers.py), the `reason` a database refusal
reports beside its SQLSTATE (databases/), and the metrics' `reason` label.

Plain str constants on a class, not an Enum: the compiled hot path (problems.py, the
listener) then only ever holds exact str objects (a StrEnum member there left the
mypyc-compiled test process with a corrupted heap), and mypy still refuses a
misspelt reason (`Reason.rate_limitted` is no attribute).
"""

from __future__ import annotations

from typing import Final


class Reason:
    """Every reason, by its name."""

    no_route: Final = "no_route"
    bad_request: Final = "bad_request"
    method_not_allowed: Final = "method_not_allowed"
    rate_limited: Final = "rate_limited"
    # services.<name>.budget: a token or cost budget is spent until its window resets.
    budget_exhausted: Final = "budget_exhausted"
    circuit_open: Final = "circuit_open"
    upstream_paused: Final = "upstream_paused"
    upstream_timeout: Final = "upstream_timeout"
    upstream_unreachable: Final = "upstream_unreachable"
    request_too_large: Final = "request_too_large"
    auth_failed: Final = "auth_failed"
    unauthenticated: Final = "unauthenticated"
    forbidden: Final = "forbidden"
    # services.<name>.validate: the call breaks, or is missing from, the OpenAPI document.
    invalid_request: Final = "invalid_request"
    unknown_operation: Final = "unknown_operation"
    internal_error: Final = "internal_error"
    # Admin port only: a browser page's request to a state-changing endpoint.
    forbidden_origin: Final = "forbidden_origin"
    http_version_not_supported: Final = "http_version_not_supported"
    graphql_limit: Final = "graphql_limit"
    # services.<name>.faults: an abort the policy asked for; its status is the policy's.
    fault_injected: Final = "fault_injected"
    # services.<name>.mode: mock, and no mock answer matches the call.
    no_mock: Final = "no_mock"
    # services.<name>.mode: replay, and no recording matches the call.
    no_recording: Final = "no_recording"
    # services.<name>.files (docs/files.md): no such file; a write's precondition failed;
    # a range past the file's end; an agent's quota (or the volume) is full.
    not_found: Final = "not_found"
    precondition_failed: Final = "precondition_failed"
    range_not_satisfiable: Final = "range_not_satisfiable"
    quota_exceeded: Final = "quota_exceeded"
    # services.<name>.translate: the upstream's 2xx answer is not the JSON its API sends.
    untranslatable_answer: Final = "untranslatable_answer"
    # Webhooks only: the queue could not store or read an event.
    store_unavailable: Final = "store_unavailable"
