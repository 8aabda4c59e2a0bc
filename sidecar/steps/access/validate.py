"""OpenAPI validation: a call is matched to its operation of the service's document and
its path and query parameters, headers and JSON body are checked before it is sent.

`validate.requests: enforce` answers a call that breaks the document with 422
invalid_request, listing each error with its JSON pointer and the schema's own
message; `report` counts and logs it and sends it unchanged. `unknown_operations:
forbid` answers a call that matches no operation with 404 unknown_operation.
`responses: report` compares the upstream's status and Content-Type with the
operation's responses and counts drift; the answer itself is never changed
(response bodies are not validated).

Everything is compiled with the policy (sidecar/openapi/): a call costs a walk
of the path tree and the compiled validators of its one operation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from ...core.call import Call, Handler, Reply, make_replayable, take_whole
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...openapi import Operation, Spec, Violation
from ...policy.loaded import ServicePolicy
from ...policy.models import QueryAuth
from ...policy.openapi import Validate
from ..credentials import auth

log = logging.getLogger("sidecar.validate")

# The largest body read to be validated; a larger one (or one of unknown length) cannot
# be checked, which `enforce` refuses and `report` counts.
VALIDATE_LIMIT = 16 << 20
# An agent (often an LLM) reads the list: the first errors say enough.
MAX_ERRORS = 20
UNKNOWN = "_unknown"

Hook = list[Callable[[str, str, str], None]]


class _Fields:
    """The call's fields for check_request, decoding only those it reads: decoding
    them all (call.headers) cost a validated call more than its JSON schema."""

    __slots__ = ("_call",)

    def __init__(self, call: Call) -> None:
        self._call = call

    def get(self, name: str) -> str | None:
        return self._call.header(name)

    def getall(self, name: str, default: None) -> list[str] | None:
        return self._call.headers.getall(name, default)


class OpenAPICheck:
    def __init__(
        self,
        *,
        service: str,
        spec: Spec,
        config: Validate,
        violations: Hook,
        drift: Hook,
        injected: frozenset[tuple[str, str]] = frozenset(),
    ) -> None:
        self.service = service
        # The credential's parameter: the auth step adds it after this check.
        self.injected = injected
        self.spec = spec
        self.enforce = config.requests == "enforce"
        self.check_requests = config.requests != "off"
        self.check_responses = config.responses == "report"
        self.forbid_unknown = config.unknown_operations == "forbid"
        self._violations = violations
        self._drift = drift

    async def __call__(self, call: Call, next: Handler) -> Reply:
        target = call.target
        mark = target.find("?")
        path, query = (target, "") if mark < 0 else (target[:mark], target[mark + 1 :])
        found = self.spec.match(call.method, path)
        operation = found.operation if found is not None else None
        if operation is None:
            if self.forbid_unknown:
                self._count(self._violations, UNKNOWN, "refused")
                raise self._unknown(call.method, path, found.methods if found else ())
            return await next(call)
        if self.check_requests:
            body: bytes | None = None
            unreadable = False
            if operation.body is not None:
                # Bytes or None once replayable; most bodies are taken at once.
                if take_whole(call, VALIDATE_LIMIT) or await make_replayable(call, VALIDATE_LIMIT):
                    body = call.body if isinstance(call.body, bytes) else None
                else:
                    unreadable = True
            errors = operation.check_request(
                path_params=found.path_params if found else {},
                query=query,
                headers=_Fields(call),
                content_type=call.header("Content-Type") if operation.body is not None else None,
                body=body,
                check_body=not unreadable,
                injected=self.injected,
            )
            if unreadable:
                errors.append(
                    Violation(
                        "body",
                        None,
                        "",
                        "the body could not be validated: it was sent without Content-Length "
                        f"or is larger than {VALIDATE_LIMIT >> 20} MiB",
                    )
                )
            if errors:
                self._refuse_or_report(operation, errors)
        reply = await next(call)
        if self.check_responses:
            status = reply.status
            has_body = (
                call.method != "HEAD"
                and status >= 200
                and status not in (204, 304)
                and reply.content_length != 0
            )
            kind = operation.response_drift(status, reply.headers.get("Content-Type"), has_body)
            if kind is not None:
                self._count(self._drift, operation.label, kind)
                log.debug(
                    "service %s: %s answered %d (%s), which its OpenAPI document does not describe",
                    self.service,
                    operation.label,
                    status,
                    reply.headers.get("Content-Type"),
                )
        return reply

    def _refuse_or_report(self, operation: Operation, errors: list[Violation]) -> None:
        shown = "; ".join(str(e) for e in errors[:3])
        more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
        if not self.enforce:
            self._count(self._violations, operation.label, "reported")
            if log.isEnabledFor(logging.WARNING):
                log.warning(
                    "service %s: a call to %s breaks the OpenAPI document (sent anyway): %s%s",
                    self.service,
                    operation.label,
                    shown,
                    more,
                )
            return
        self._count(self._violations, operation.label, "refused")
        raise ProblemError(
            Reason.invalid_request,
            f"The call to {operation.label} ({operation.method} {operation.template}) breaks "
            f"the OpenAPI document of service '{self.service}', so the sidecar did not send "
            f"it: {shown}{more}. Fix the request as `errors` lists and send it again.",
            service=self.service,
            extra={
                "operation": operation.label,
                "errors": [e.as_dict() for e in errors[:MAX_ERRORS]],
            },
        )

    def _unknown(self, method: str, path: str, methods: tuple[str, ...]) -> ProblemError:
        if methods:
            detail = (
                f"The OpenAPI document of service '{self.service}' has no {method} operation "
                f"at this path, only {', '.join(methods)}; the sidecar refuses calls the "
                "document does not describe (validate.unknown_operations: forbid)."
            )
        else:
            detail = (
                f"The OpenAPI document of service '{self.service}' describes no path like "
                f"'{path[:200]}'; the sidecar refuses calls the document does not describe "
                "(validate.unknown_operations: forbid). Check the path against the API's "
                "reference."
            )
        return ProblemError(Reason.unknown_operation, detail, service=self.service)

    def _count(self, hook: Hook, operation: str, label: str) -> None:
        for callback in hook:
            callback(self.service, operation, label)


def build(service: ServicePolicy, *, state: StateBuild) -> OpenAPICheck | None:
    spec = service.openapi
    if spec is None:
        return None
    config = service.spec.validation or Validate()
    if (
        config.requests == "off"
        and config.responses == "off"
        and config.unknown_operations == "allow"
    ):
        return None
    injected: set[tuple[str, str]] = set()
    credential = auth.header_name(service)
    if credential is not None:
        injected.add(("header", credential.lower()))
    if isinstance(service.spec.auth, QueryAuth):
        injected.add(("query", service.spec.auth.name))
    return OpenAPICheck(
        service=service.name,
        injected=frozenset(injected),
        spec=spec,
        config=config,
        violations=state.hooks.request_violation,
        drift=state.hooks.response_drift,
    )
