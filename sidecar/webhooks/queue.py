"""The webhook queue's contract: what intake, delivery, subscriptions and the admin use.

One queue serves both directions: a message is the event as received (headers,
body); each of its targets gets a delivery (pending, delivered or dead) with
its attempts. `Queue` is the protocol every caller is typed against; two
stores implement it:

- `SqliteStore` (sqlite_store.py): one file in the data directory, one process;
- `RedisStore` (redis_store.py): Redis Streams, shared by several replicas.

The contract both keep: an event acknowledged to its sender or agent survives
`kill -9`, so `accept` returns only once the event is stored (committed and
fsynced, or written to Redis); a delivery is attempted at least once, never
lost. A store that cannot be reached raises `StoreUnavailable`, whatever it is
built on, so its callers answer 503 without knowing which one runs.

This module loads neither sqlite3 nor redis: a sidecar loads the one its policy names.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# The delivery of an inbound event that agents subscribe to (`subscribe: true`): no
# URL, never claimed by the delivery worker (its next_attempt is NULL), delivered
# when the subscriber acknowledges it (webhooks/events.py).
SUBSCRIPTION = "_events"


class Direction(enum.StrEnum):
    inbound = "inbound"
    outbound = "outbound"


class DeliveryStatus(enum.StrEnum):
    pending = "pending"
    delivered = "delivered"
    dead = "dead"


class MessageStatus(enum.StrEnum):
    routed = "routed"
    unrouted = "unrouted"  # no route matched: kept, visible, never dropped silently


class Outcome(enum.Enum):
    delivered = "delivered"
    retry = "retry"  # failed; try again at next_attempt
    dead = "dead"  # failed on the last attempt of the schedule
    gone = "gone"  # 410: the endpoint is disabled, the delivery waits for it


@dataclass(frozen=True, slots=True)
class Target:
    endpoint: str  # outbound: the endpoint's name; inbound: the target URL
    url: str


@dataclass(frozen=True, slots=True)
class Accepted:
    message_id: str
    duplicate: bool  # already accepted within the dedup window: nothing new stored
    routed: bool = True  # False: no target wanted it, kept as unrouted


@dataclass(frozen=True, slots=True)
class Due:
    """A claimed delivery, with what its attempt needs."""

    delivery_id: int
    message_id: str
    direction: Direction
    source: str
    endpoint: str
    url: str
    attempts: int  # made before this one
    event_type: str | None
    headers: list[tuple[str, str]]
    body: bytes
    created: float = 0.0  # when the message was accepted
    due: float = 0.0  # when this attempt was scheduled for


@dataclass(frozen=True, slots=True)
class Pending:
    """An event waiting for its subscriber's acknowledgement, in arrival order."""

    delivery_id: int
    message_id: str
    event_type: str | None
    headers: list[tuple[str, str]]
    body: bytes
    created: float


@dataclass(frozen=True, slots=True)
class Attempt:
    at: float  # when it started
    status_code: int | None
    error: str | None
    duration: float
    due: float | None = None  # when it was scheduled for (None: recorded before this was kept)

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300

    @property
    def failure(self) -> str | None:
        """What a failed attempt leaves as its delivery's last error (None: it succeeded)."""
        return None if self.ok else (self.error or f"HTTP {self.status_code}")


@dataclass(frozen=True, slots=True)
class EndpointStats:
    direction: Direction
    source: str
    endpoint: str
    depth: int  # pending deliveries
    oldest_pending_age: float | None  # seconds since the oldest pending message arrived
    successes: int  # delivered
    failures: int  # failed attempts
    dead: int
    disabled: bool


@dataclass(frozen=True, slots=True)
class QueueDepth:
    direction: Direction
    source: str
    endpoint: str
    depth: int
    oldest_pending_age: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    direction: Direction
    source: str
    endpoint: str
    message_id: str
    event_type: str | None
    created: float
    last_error: str | None


@dataclass(frozen=True, slots=True)
class Overview:
    endpoints: list[EndpointStats]
    unrouted: dict[str, int]  # inbound webhook -> messages no route matched


@dataclass(frozen=True, slots=True)
class DeliveryView:
    endpoint: str
    url: str
    status: DeliveryStatus
    attempts: list[Attempt]
    next_attempt: float | None
    last_error: str | None


@dataclass(frozen=True, slots=True)
class MessageView:
    id: str
    direction: Direction
    source: str
    event_type: str | None
    status: MessageStatus
    created: float
    deliveries: list[DeliveryView]


class _RandomHex:
    """8 random bytes as hex per call, read from the OS 256 ids at a time: one
    getrandom() per event cost more than the rest of the id. Event loop only."""

    def __init__(self) -> None:
        self._hex = ""
        self._at = 0

    def take(self) -> str:
        if self._at >= len(self._hex):
            self._hex = secrets.token_hex(8 * 256)
            self._at = 0
        self._at += 16
        return self._hex[self._at - 16 : self._at]


_random_hex = _RandomHex()


def new_message_id(now: float) -> str:
    # Time first, so ids sort by arrival in the admin view and in the table.
    return f"msg_{int(now * 1000):012x}{_random_hex.take()}"


class StoreUnavailable(Exception):
    """The queue cannot be reached (closed, disk or database error, Redis down):
    nothing was stored. Its text never holds a URL or a password."""


class StoreClosed(StoreUnavailable):
    pass


class Queue(Protocol):
    """The durable queue of webhook deliveries.

    Intake (inbound.py, outbound.py, the alert receivers) calls `accept`; the
    delivery worker (delivery.py) `claim`, `next_due`, `finish` and
    `release_claims`; subscriptions (events.py) `pending` and `ack`; the admin
    port and the console `overview`, `depths`, `message`, `dead_letters`,
    `retry` and `enable`. Every method may raise `StoreUnavailable`.
    """

    # Called after a change that made deliveries due (accepted, retried, enabled):
    # wakes the delivery worker and the subscribers. Set by whoever serves them.
    on_new_deliveries: Callable[[], None] | None

    def configure(self, *, claim_idle: float, retention: float | None) -> None:
        """A reload's store settings: how long a replica's claim may sit idle before
        another takes it (Redis), how long delivered messages are kept (None: kept)."""
        ...

    async def close(self) -> None: ...

    async def accept(
        self,
        *,
        direction: Direction,
        source: str,
        event_type: str | None,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        targets: Sequence[Target],
        dedup_id: str | None = None,
        dedup_window: float = 0.0,
        first_attempt_in: float = 0.0,
    ) -> Accepted:
        """Store a message and one pending delivery per target; returns once durable.

        Each delivery is first due `first_attempt_in` from now (the schedule's
        first delay); a subscription's (url "") is never due, its subscriber
        reads it. With a dedup_id seen for this source within `dedup_window`,
        nothing is stored and the first message's id comes back as a duplicate.
        No targets: the message is kept as unrouted.
        """
        ...

    async def claim(self, limit: int, per_endpoint: int) -> list[Due]:
        """Up to `limit` due deliveries of enabled endpoints, earliest first, claimed
        for this process; no endpoint gets more than `per_endpoint` in flight."""
        ...

    async def next_due(self) -> float | None:
        """When to look again for due deliveries (None: nothing is waiting)."""
        ...

    async def finish(
        self, due: Due, attempt: Attempt, outcome: Outcome, next_attempt: float | None = None
    ) -> None:
        """Record an attempt of a claimed delivery and what follows from it (delivered,
        retried at `next_attempt`, dead, or its endpoint disabled); releases the claim."""
        ...

    async def release_claims(self) -> None:
        """Release every claim of this process: its worker stopped, the attempts were
        cancelled, they are to be made again."""
        ...

    async def enable(self, source: str, endpoint: str) -> bool:
        """Enable an endpoint disabled by a 410; its waiting deliveries are due at once.
        False: it was not disabled."""
        ...

    async def retry(self, message_id: str) -> int | None:
        """Make a message's dead and pending deliveries due now, with the schedule from
        its start: how many; None: no such message."""
        ...

    async def overview(self) -> Overview: ...

    async def depths(self) -> list[QueueDepth]:
        """Per endpoint with pending deliveries: how many, and the oldest one's age."""
        ...

    async def message(self, message_id: str) -> MessageView | None:
        """One message with each delivery and every attempt made."""
        ...

    async def dead_letters(self, limit: int = 50) -> list[DeadLetter] | None:
        """The newest dead deliveries (what a replay takes); None: this store keeps no
        index of them (Redis)."""
        ...

    async def pending(self, source: str, after: int | None, limit: int) -> list[Pending]:
        """The subscription's unacknowledged events of `source` after delivery `after`,
        in arrival order."""
        ...

    async def ack(self, source: str, message_id: str) -> int | None:
        """Mark this subscribed event and every earlier one of `source` delivered: how
        many were still pending; None: `source` has no such subscribed event."""
        ...
