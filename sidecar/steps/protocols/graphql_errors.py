"""`graphql.count_errors`: a GraphQL answer that reports errors counts as a failure.

GraphQL servers answer most failures (a resolver that threw, a backend that is
down) with `200 OK` and an `errors` array, so a breaker that reads statuses
only would never open. This step reads a 2xx JSON answer of the GraphQL
endpoint (`application/json` or `application/graphql-response+json`, up to
LIMIT bytes) and, when it (or any answer of a batch) has a non-empty `errors`
array, hands it on as a `CountedFailure`: the breaker counts a failure,
`sidecar_graphql_errors` counts it, and the agent's span gets `error.type:
graphql_errors`, `graphql.errors` and an error status. The agent gets the
answer's bytes unchanged. A larger answer, or one of another type (an SSE or
multipart stream of a subscription or @defer), is relayed unread and counts
by its status only.

It sits inside the breaker and the timeout (so reading is bounded by
`timeout.total`), once per attempt, and only where `count_errors` is on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Callable
from typing import Any

from multidict import CIMultiDict

from ...core.call import Call, Handler, Reply, ReplyView, StaticReply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ..operation import annotate, endpoint
from ..resilience.outcomes import CountedFailure

# Largest answer read to look for errors; GraphQL JSON answers are rarely larger.
LIMIT = 1 << 20
FAILURE = "graphql_errors"
_JSON = frozenset({"application/json", "application/graphql-response+json"})
_PASSING = frozenset({"HEAD", "OPTIONS"})


def errors_in(data: bytes) -> int:
    """How many errors a GraphQL answer (or batch of answers) reports; 0 when not JSON."""
    try:
        document = json.loads(data)
    except (ValueError, RecursionError):
        return 0
    answers: list[Any] = document if isinstance(document, list) else [document]
    count = 0
    for answer in answers:
        errors = answer.get("errors") if isinstance(answer, dict) else None
        if isinstance(errors, list):
            count += len(errors)
    return count


class GraphQLErrors:
    def __init__(self, *, service: str, path: str, counted: list[Callable[[str], None]]) -> None:
        self.service = service
        self.path = path
        self.counted = counted

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if call.method in _PASSING or endpoint(call.target) != self.path:
            return await next(call)
        reply = await next(call)
        body = reply.body
        if not 200 <= reply.status < 300 or body is None:
            return reply
        kind = reply.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        length = reply.content_length
        if kind not in _JSON or (length is not None and length > LIMIT):
            return reply
        chunks: list[bytes] = []
        size = 0
        iterator = aiter(body)
        try:
            async for chunk in iterator:
                chunks.append(chunk)
                size += len(chunk)
                if size > LIMIT:
                    # Too large to hold (no Content-Length said so): relayed as it comes.
                    return ReplyView(reply, body=_rest(chunks, iterator))
        except ProblemError:
            reply.release()
            raise
        except Exception:
            # The upstream broke off its answer (steps see no pool errors by type): as a
            # reset before the head, for retry and the breaker alike.
            reply.release()
            raise ProblemError(
                Reason.upstream_unreachable,
                f"The upstream of service '{self.service}' closed the connection before its "
                "whole answer; try again later.",
                service=self.service,
                cause="reset",
            ) from None
        except BaseException:
            reply.release()
            raise
        reply.release()
        data = b"".join(chunks)
        headers = CIMultiDict(reply.headers)
        headers.popall("Transfer-Encoding", None)
        headers["Content-Length"] = str(len(data))
        count = errors_in(data)
        if not count:
            return StaticReply(reply.status, headers, data, reason=reply.reason)
        annotate(call, {"graphql.errors": count, "error.type": FAILURE})
        for hook in self.counted:
            hook(self.service)
        return CountedFailure(reply.status, headers, data, reason=reply.reason, failure=FAILURE)


async def _rest(head: list[bytes], tail: AsyncIterable[bytes]) -> AsyncIterator[bytes]:
    for chunk in head:
        yield chunk
    async for chunk in tail:
        yield chunk


def build(service: ServicePolicy, *, state: StateBuild) -> GraphQLErrors | None:
    config = service.spec.graphql
    if config is None or not config.count_errors:
        return None
    return GraphQLErrors(service=service.name, path=config.path, counted=state.hooks.graphql_errors)
