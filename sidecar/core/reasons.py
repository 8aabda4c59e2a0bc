"""Why the sidecar answers for itself: one enum for every protocol it speaks.

The value is the name agents and operators see: the X-Sidecar-Error header and the
problem document's `reason` on HTTP (core/problems.py, with each reason's status and
title), a webhook refusal's (webhooks/answers.py), the `reason` a database refusal
reports beside its SQLSTATE (databases/), and the metrics' `reason` label. A StrEnum:
a member is its name wherever a string is read (headers, JSON, labels), and a name a
test or an older caller writes as a string is the same key.

Kept out of problems.py, which mypyc compiles: an Enum stays a plain Python class.
"""

from __future__ import annotations

import enum


class Reason(enum.StrEnum):
    no_route = "no_route"
    bad_request = "bad_request"
    method_not_allowed = "method_not_allowed"
    rate_limited = "rate_limited"
    # services.<name>.budget: a token or cost budget is spent until its window resets.
    budget_exhausted = "budget_exhausted"
    circuit_open = "circuit_open"
    upstream_paused = "upstream_paused"
    upstream_timeout = "upstream_timeout"
    upstream_unreachable = "upstream_unreachable"
    request_too_large = "request_too_large"
    auth_failed = "auth_failed"
    unauthenticated = "unauthenticated"
    forbidden = "forbidden"
    # services.<name>.validate: the call breaks, or is missing from, the OpenAPI document.
    invalid_request = "invalid_request"
    unknown_operation = "unknown_operation"
    internal_error = "internal_error"
    # Admin port only: a browser page's request to a state-changing endpoint.
    forbidden_origin = "forbidden_origin"
    http_version_not_supported = "http_version_not_supported"
    graphql_limit = "graphql_limit"
    # services.<name>.faults: an abort the policy asked for; its status is the policy's.
    fault_injected = "fault_injected"
    # services.<name>.mode: mock, and no mock answer matches the call.
    no_mock = "no_mock"
    # services.<name>.mode: replay, and no recording matches the call.
    no_recording = "no_recording"
    # services.<name>.files (docs/files.md): no such file; a write's precondition failed;
    # a range past the file's end; an agent's quota (or the volume) is full.
    not_found = "not_found"
    precondition_failed = "precondition_failed"
    range_not_satisfiable = "range_not_satisfiable"
    quota_exceeded = "quota_exceeded"
    # services.<name>.translate: the upstream's 2xx answer is not the JSON its API sends.
    untranslatable_answer = "untranslatable_answer"
    # Webhooks only: the queue could not store or read an event.
    store_unavailable = "store_unavailable"
