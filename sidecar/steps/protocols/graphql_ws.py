"""GraphQL over WebSocket: each operation an agent starts is judged as an HTTP one is.

Both subprotocols GraphQL servers speak are read: `graphql-transport-ws`
(the graphql-ws library; an operation starts with `subscribe`) and the older
`graphql-ws` (subscriptions-transport-ws; `start`). Each such message's payload
(`query`, `operationName`, `variables`, `extensions`) goes through the service's
GraphQL checks (graphql.py: allow rules, depth, aliases, cost, persisted
queries). A refused operation never reaches the server: the agent gets that
subprotocol's `error` message for the operation's id, with the sidecar's
sentence, and the connection stays open for the next. Other messages
(connection_init, ping, complete, ...) pass untouched; a message with a key
twice in one object (servers differ on which one they read) closes the
connection with 4400, as graphql-ws closes for an invalid message.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from ...core.problems import ProblemError
from ..operation import _DuplicateKey, _unique_keys
from .websocket import Verdict


class GraphQLStep(Protocol):
    """What the tunnel needs of the GraphQL step (graphql.py's is one), kept a protocol
    so that graphql.py, which makes the tunnel, is not imported back from here."""

    @property
    def service(self) -> str: ...

    def check_operation(self, agent: str | None, request: dict[str, Any]) -> None: ...


TRANSPORT_WS = "graphql-transport-ws"
LEGACY_WS = "graphql-ws"
SUBPROTOCOLS = frozenset({TRANSPORT_WS, LEGACY_WS})

# The messages that start an operation, in either subprotocol.
_STARTS = frozenset({"subscribe", "start"})


class OperationJudge:
    """The `judge` of one WebSocket connection of an agent to a GraphQL service."""

    __slots__ = ("agent", "protocol", "step")

    def __init__(self, step: GraphQLStep, agent: str | None, protocol: str | None) -> None:
        self.step = step
        self.agent = agent
        self.protocol = protocol

    def __call__(self, data: bytes) -> Verdict:
        try:
            message = json.loads(data, object_pairs_hook=_unique_keys)
        except _DuplicateKey:
            return 4400
        except (ValueError, RecursionError):
            return None  # not JSON: the server refuses it as it would without the sidecar
        if not isinstance(message, dict) or message.get("type") not in _STARTS:
            return None
        request = message.get("payload")
        if not isinstance(request, dict):
            return None  # no operation to run: the server refuses it
        try:
            self.step.check_operation(self.agent, request)
        except ProblemError as err:
            return self._error(message.get("id"), err)
        return None

    def _error(self, operation_id: Any, err: ProblemError) -> bytes:
        error = {
            "message": err.detail,
            "extensions": {"reason": err.reason, "service": self.step.service},
        }
        # graphql-transport-ws sends a list of GraphQL errors; the older protocol one.
        payload: Any = error if self.protocol == LEGACY_WS else [error]
        message = {"id": operation_id, "type": "error", "payload": payload}
        return json.dumps(message, separators=(",", ":")).encode()
