"""State that outlives a reload: limiter buckets, breakers, token caches, pools.

Each piece is keyed by (service, step, fingerprint of its parameters). A
reload that leaves a step's parameters alone gets the same object back; one
that changes them gets a fresh one. Pieces no longer used are retired (a
connection pool closes once its last in-flight call has finished).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from typing import Any, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

from ..policy.secrets import Secret

T = TypeVar("T")
Key = tuple[str, str, str]


@runtime_checkable
class Retirable(Protocol):
    def retire(self) -> None: ...


def fingerprint(params: object) -> str:
    """A stable digest of a step's parameters, secrets included (so rotation resets caches)."""

    def default(o: object) -> Any:
        if isinstance(o, Secret):
            return {"secret": hashlib.sha256(o.reveal().encode()).hexdigest()}
        if isinstance(o, BaseModel):
            return {k: getattr(o, k) for k in type(o).model_fields}
        return repr(o)

    text = json.dumps(params, default=default, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class Hooks:
    """Callbacks the steps' state reports to (metrics), one set per sidecar.

    Held by the store, not by a class, so two sidecars in one process (tests,
    embedding) never count each other's events. A hook must not raise.
    """

    def __init__(self) -> None:
        # (service, from_state, to_state) on every circuit-breaker transition.
        self.breaker_transition: list[Callable[[str, str, str], None]] = []
        # (service, operation, action: refused | reported) for a call that broke the
        # service's OpenAPI document; operation "_unknown" when it matched none.
        self.request_violation: list[Callable[[str, str, str], None]] = []
        # (service, operation, kind: status | content_type) for an answer the
        # document does not describe.
        self.response_drift: list[Callable[[str, str, str], None]] = []
        # (service, kind: delay | abort | reset | bandwidth | sse) for each injected fault.
        self.fault_injected: list[Callable[[str, str], None]] = []
        # (service, result: hit | miss | revalidated | stale | bypass) for each call of a
        # method a cache keeps.
        self.cache_lookup: list[Callable[[str, str], None]] = []
        # (service, count) when a memory cache drops entries to stay within its bounds.
        self.cache_evicted: list[Callable[[str, int], None]] = []
        # (service) when a cache's Redis backend failed a read or a write.
        self.cache_backend_error: list[Callable[[str], None]] = []
        # (service) for each GraphQL answer with errors that `count_errors` counted.
        self.graphql_errors: list[Callable[[str], None]] = []


class StateStore:
    def __init__(self, *, data_dir: str | None = None) -> None:
        self._items: dict[Key, Any] = {}
        self.hooks = Hooks()
        # Where durable state (budgets) is kept; None: in memory only (embedded, tests).
        self.data_dir = data_dir

    def begin(self) -> StateBuild:
        return StateBuild(self)

    def find(self, service: str, step: str) -> list[Any]:
        return [v for (s, st, _), v in self._items.items() if s == service and st == step]

    def close(self) -> None:
        for obj in self._items.values():
            if isinstance(obj, Retirable):
                obj.retire()
        self._items = {}


class StateBuild:
    """The state of one compile: kept pieces plus new ones, committed only on success."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._items: dict[Key, Any] = {}
        self.hooks = store.hooks
        self.data_dir = store.data_dir

    def get(self, service: str, step: str, params: object, factory: Callable[[], T]) -> T:
        key = (service, step, fingerprint(params))
        if key in self._items:
            return self._items[key]  # type: ignore[no-any-return]
        obj = self._store._items.get(key)
        if obj is None:
            obj = factory()
        self._items[key] = obj
        return obj

    def commit(self) -> None:
        old, self._store._items = self._store._items, self._items
        for key, obj in old.items():
            if key not in self._items and isinstance(obj, Retirable):
                obj.retire()

    def abort(self) -> None:
        for key, obj in self._items.items():
            if key not in self._store._items and isinstance(obj, Retirable):
                obj.retire()
