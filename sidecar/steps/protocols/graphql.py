"""GraphQL-aware services: limits and allow rules per operation, before anything is sent.

Requests to the service's GraphQL `path` are read: a POST's JSON body (one
request, or an array of them: a batch), an `application/graphql` body, or a
GET's `query`/`operationName`/`variables` parameters. Each operation is
measured (graphql_analysis.py) and refused with `400 graphql_limit` when it is
too deep, has too many aliases or costs too much (a batch's costs add up), or
with `403 forbidden` when no `allow` rule lets the agent run it. Introspection
(`__schema`, `__type`) is measured apart and allowed by `introspection`. A request
that carries only a persisted-query id has no text to check and passes,
unless `persisted_queries: false`. Other paths, HEAD and OPTIONS pass
untouched; the path is compared percent-decoded, so `/%67raphql` is checked too.
A WebSocket to the path, or offering graphql-transport-ws or graphql-ws on any
path, has every operation it starts checked the same way (graphql_ws.py),
without compression, so the sidecar can read the frames.

graphql-core is imported only when a service has `graphql:` configured.
"""

from __future__ import annotations

import json
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs

from ...core.call import Call, Handler, Reply
from ...core.problems import ProblemError
from ...core.reasons import Reason
from ...core.state import StateBuild
from ...policy.loaded import ServicePolicy
from ...policy.protocols import GraphQL, GraphQLRule
from ..operation import OPERATION, annotate, bad_request, endpoint, parse_json, read_body

if TYPE_CHECKING:
    from .graphql_analysis import Documents, Operation


# Methods that never carry an operation: a CORS preflight, a HEAD.
_PASSING = frozenset({"HEAD", "OPTIONS"})
_FIELDS = ("query", "operationName", "variables", "extensions")


class GraphQLStep:
    def __init__(self, *, service: str, config: GraphQL, documents: Documents) -> None:
        self.service = service
        self.path = config.path
        self.config = config
        self.rules: tuple[GraphQLRule, ...] | None = (
            tuple(config.allow) if config.allow is not None else None
        )
        self.documents = documents

    async def __call__(self, call: Call, next: Handler) -> Reply:
        if call.upgrade:
            return await self._socket(call, next)
        if endpoint(call.target) != self.path or call.method in _PASSING:
            return await next(call)
        query = call.target.partition("?")[2]
        if call.method == "GET":
            params = parse_qs(query)
            if "query" not in params and "extensions" not in params:
                return await next(call)  # not an operation: a GraphiQL page, a health check
            requests = [self._from_params(params)]
        else:
            # POST, and any other method with a body a server might run.
            requests = await self._from_body(call, query)
        operations = [self._check(call.agent, request) for request in requests]
        checked = [op for op in operations if op is not None]
        if checked:
            self._check_total_cost(checked)
        labels = tuple(
            op.label if op is not None else f"persisted:{_name(request)}"
            for op, request in zip(operations, requests, strict=True)
        )
        label = ",".join(labels)
        attributes: dict[str, str | int | bool] = {"graphql.operation.label": label}
        if len(operations) == 1 and operations[0] is not None:
            attributes["graphql.operation.type"] = operations[0].type
            attributes["graphql.operation.name"] = operations[0].name
        if len(operations) > 1:
            attributes["graphql.batch.size"] = len(operations)
        if None in operations:
            attributes["graphql.persisted_query"] = True
        annotate(call, attributes)
        token = OPERATION.set(labels)
        try:
            return await next(call)
        finally:
            OPERATION.reset(token)

    async def _socket(self, call: Call, next: Handler) -> Reply:
        """A WebSocket handshake to the endpoint, or offering a GraphQL subprotocol on any
        path (servers often take subscriptions elsewhere): the tunnel the upstream's
        101 opens gets a judge."""
        from .graphql_ws import SUBPROTOCOLS, OperationJudge
        from .websocket import FilteredTunnel

        offered = {
            p.strip().lower()
            for value in call.headers.getall("Sec-WebSocket-Protocol", ())
            for p in value.split(",")
        }
        if endpoint(call.target) != self.path and not offered & SUBPROTOCOLS:
            return await next(call)
        # permessage-deflate would hide the operations from the sidecar.
        call.headers.popall("Sec-WebSocket-Extensions", None)
        reply = await next(call)
        if reply.status == 101:
            judge = OperationJudge(self, call.agent, reply.headers.get("Sec-WebSocket-Protocol"))
            call.tunnel_filter = lambda tunnel: FilteredTunnel(tunnel, judge)
        return reply

    def check_operation(self, agent: str | None, request: dict[str, Any]) -> None:
        """Refuse (ProblemError) an operation request the policy does not let `agent` run."""
        self._check(agent, request)

    async def _from_body(self, call: Call, query: str) -> list[dict[str, Any]]:
        body = await read_body(call, service=self.service, what="GraphQL")
        content_type = call.headers.get("Content-Type", "").partition(";")[0].strip().lower()
        in_url = [key for key in parse_qs(query) if key in _FIELDS]
        # Some servers (express-graphql) prefer the URL's `query` to the body's: an
        # operation given in both places could be checked in one and run from the other.
        if "query" in in_url or (in_url and content_type != "application/graphql"):
            raise self._bad(
                f"`{in_url[0]}` is in the URL of a {call.method}: send the request's fields "
                "in its body only"
            )
        if content_type == "application/graphql":
            try:
                text = body.decode()
            except UnicodeDecodeError:
                raise self._bad("the body is not UTF-8 text") from None
            request = self._from_params(parse_qs(query))
            request["query"] = text
            return [request]
        document = parse_json(body, service=self.service, what="GraphQL")
        if isinstance(document, dict):
            return [document]
        if isinstance(document, list) and document and all(isinstance(d, dict) for d in document):
            return document
        raise self._bad(
            "the body must be a JSON object with a `query` (or a non-empty array of them)"
        )

    def _from_params(self, params: dict[str, list[str]]) -> dict[str, Any]:
        request: dict[str, Any] = {}
        for key, values in params.items():
            if len(values) > 1 and key in _FIELDS:
                # Servers differ on which one they read: refuse rather than guess.
                raise self._bad(f"the `{key}` parameter is given {len(values)} times")
        for key in ("query", "operationName"):
            if key in params:
                request[key] = params[key][0]
        for key in ("variables", "extensions"):
            if key in params:
                try:
                    request[key] = json.loads(params[key][0])
                except (ValueError, RecursionError):
                    raise self._bad(f"the `{key}` parameter is not valid JSON") from None
        return request

    def _check(self, agent: str | None, request: dict[str, Any]) -> Operation | None:
        """The request's operation, measured and allowed; None for a persisted-query id."""
        text = request.get("query")
        name = request.get("operationName")
        variables = request.get("variables")
        extensions = request.get("extensions")
        if text is None:
            if isinstance(extensions, dict) and "persistedQuery" in extensions:
                if not self.config.persisted_queries:
                    raise ProblemError(
                        Reason.forbidden,
                        f"Service '{self.service}' does not accept persisted-query ids: their "
                        "operation cannot be checked. Send the query text.",
                        service=self.service,
                    )
                return None
            raise self._bad("the request has no `query`")
        if not isinstance(text, str):
            raise self._bad("`query` must be a string")
        if name is not None and not isinstance(name, str):
            raise self._bad("`operationName` must be a string or null")
        if variables is not None and not isinstance(variables, dict):
            raise self._bad("`variables` must be a JSON object or null")

        from .graphql_analysis import InvalidOperation, TooComplex, measure

        try:
            operation = measure(self.documents.parse(text), name, variables or {})
        except InvalidOperation as err:
            raise self._bad(str(err)) from None
        except TooComplex as err:
            raise self._limit(f"The GraphQL request is refused: {err}.") from None
        self._allow(agent, operation)
        if operation.introspection:
            self._introspection(agent, operation)
        self._check_limits(operation)
        return operation

    def _introspection(self, agent: str | None, operation: Operation) -> None:
        from .graphql_analysis import INTROSPECTION_MAX_DEPTH

        setting = self.config.introspection
        if setting == "deny" or (
            isinstance(setting, list) and not any(fnmatchcase(agent or "", g) for g in setting)
        ):
            caller = f"Agent '{agent}'" if agent else "A caller without an agent id"
            raise ProblemError(
                Reason.forbidden,
                f"{caller} may not introspect the schema of service '{self.service}' (its "
                f"{operation.describe()} selects __schema or __type): graphql.introspection "
                "of the policy does not allow it.",
                service=self.service,
            )
        if operation.introspection_depth > INTROSPECTION_MAX_DEPTH:
            raise self._limit(
                f"The introspection in the {operation.describe()} is "
                f"{operation.introspection_depth} fields deep; the sidecar allows at most "
                f"{INTROSPECTION_MAX_DEPTH}. Send a standard introspection query."
            )

    def _allow(self, agent: str | None, operation: Operation) -> None:
        rules = self.rules
        if rules is None:
            return
        who = agent or ""
        for rule in rules:
            if (
                operation.type in rule.types
                and any(fnmatchcase(who, glob) for glob in rule.agents)
                and any(fnmatchcase(operation.name, glob) for glob in rule.operations)
            ):
                return
        caller = f"Agent '{agent}'" if agent else "A caller without an agent id"
        raise ProblemError(
            Reason.forbidden,
            f"{caller} may not run the {operation.describe()} on service '{self.service}': "
            "no graphql.allow rule of the policy lets it.",
            service=self.service,
        )

    def _check_limits(self, op: Operation) -> None:
        config = self.config
        what = op.describe()
        if config.max_depth is not None and op.depth > config.max_depth:
            raise self._limit(
                f"The {what} is {op.depth} fields deep; service '{self.service}' allows at "
                f"most {config.max_depth}. Ask for less nested data."
            )
        if config.max_aliases is not None and op.aliases > config.max_aliases:
            raise self._limit(
                f"The {what} uses {op.aliases} aliases; service '{self.service}' allows at "
                f"most {config.max_aliases}. Split it into several requests."
            )
        if config.max_cost is not None and op.cost > config.max_cost:
            raise self._limit(
                f"The {what} has an estimated cost of {op.cost}; service '{self.service}' "
                f"allows at most {config.max_cost}. Ask for smaller pages (first/last/limit) "
                "or fewer fields."
            )

    def _check_total_cost(self, operations: list[Operation]) -> None:
        limit = self.config.max_cost
        total = sum(op.cost for op in operations)
        if limit is not None and len(operations) > 1 and total > limit:
            raise self._limit(
                f"The batch of {len(operations)} GraphQL operations has an estimated cost of "
                f"{total} together; service '{self.service}' allows at most {limit} per "
                "request. Send fewer operations at once."
            )

    def _limit(self, detail: str) -> ProblemError:
        return ProblemError(Reason.graphql_limit, detail, service=self.service)

    def _bad(self, flaw: str) -> ProblemError:
        return bad_request(
            f"Service '{self.service}' reads every GraphQL request, and this one is not "
            f"usable: {flaw.rstrip('.')}.",
            service=self.service,
        )


def _name(request: dict[str, Any]) -> str:
    name = request.get("operationName")
    return name if isinstance(name, str) else ""


def build(service: ServicePolicy, *, state: StateBuild) -> GraphQLStep | None:
    config = service.spec.graphql
    if config is None:
        return None
    from .graphql_analysis import Documents

    # One cache for every service: a document parses the same wherever it is sent.
    documents = state.get("*", "graphql-documents", None, Documents)
    return GraphQLStep(service=service.name, config=config, documents=documents)
