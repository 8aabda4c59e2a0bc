"""The webhook queue in Redis, shared by several replicas: Redis Streams.

One of the two implementations of queue.Queue (the other: sqlite_store.py), so
inbound, outbound, the delivery worker and the admin port do not know which one runs.

- A message is a hash, each delivery a hash with its attempts in a list.
- A delivery that is due now is an entry of one stream, read through one
  consumer group: each entry goes to one replica (its consumer). The
  replica acknowledges (and deletes) the entry only once the attempt's
  outcome is written, so a replica killed mid-delivery leaves the entry in
  its pending list; another replica takes it over with XAUTOCLAIM once it
  has been idle for `claim_idle`. A live replica touches its entries in
  flight every third of that, so a slow delivery is not taken from it.
- A delivery waiting for its next attempt sits in a sorted set by due time;
  claiming first moves what is due into the stream.
- Every change of a delivery is one Lua script: atomic, so a crash between
  two writes never leaves a delivery both queued and done.

Durability is Redis's: an event is acknowledged once Redis has it in
memory. For the SQLite contract (nothing acknowledged lost to a power cut)
run Redis with `appendonly yes` and `appendfsync always`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError, ResponseError

from .queue import (
    SUBSCRIPTION,
    Accepted,
    Attempt,
    DeadLetter,
    DeliveryStatus,
    DeliveryView,
    Direction,
    Due,
    EndpointStats,
    MessageStatus,
    MessageView,
    Outcome,
    Overview,
    Pending,
    QueueDepth,
    StoreClosed,
    StoreUnavailable,
    Target,
    new_message_id,
)

log = logging.getLogger("sidecar.webhooks")

Clock = Callable[[], float]
GROUP = "deliverers"
TIMEOUT = 5.0  # seconds, connecting and each reply
CONNECTIONS = 64  # to Redis at most; more calls wait their turn
# How often a replica looks at the shared stream when nothing woke it: events
# accepted by another replica are found within this.
POLL = 1.0
# A replica holds this many entries per endpoint over its per_endpoint share, in order;
# one read beyond that goes back to the queue for this long.
HOLD = 256
# A held delivery is kept as taken up to this body size; a larger one is taken again.
HELD_BODY = 64 * 1024
DEFER = 0.5
_PROMOTE_BATCH = 256

# Keys: P..':msg:'..id (hash), P..':msg:'..id..':d' (list of delivery ids),
# P..':d:'..id (hash), P..':d:'..id..':a' (list of attempts as JSON),
# P..':due' (stream), P..':delayed' (zset id->due time), P..':endpoints' (set of
# endpoint keys E = JSON [direction, source, endpoint]), P..':pending:'..E
# (zset id->message created), P..':stats:'..E (hash), P..':disabled' (set of
# JSON [source, endpoint]), P..':parked:'..JSON [source, endpoint] (set of ids),
# P..':unrouted' (hash source->count), P..':dedup:'..source..':'..id (string).

_ACCEPT = """
local P = ARGV[1]
local mid = ARGV[2]
local source = ARGV[4]
local created = ARGV[9]
if ARGV[10] ~= '' then
  local key = P .. ':dedup:' .. source .. ':' .. ARGV[10]
  if not redis.call('SET', key, mid, 'NX', 'PX', ARGV[11]) then
    return {redis.call('GET', key), 1}
  end
end
redis.call('HSET', P .. ':msg:' .. mid, 'direction', ARGV[3], 'source', source,
  'event_type', ARGV[5], 'status', ARGV[6], 'headers', ARGV[7], 'body', ARGV[8],
  'created', created)
local n = tonumber(ARGV[12])
if n == 0 then
  redis.call('HINCRBY', P .. ':unrouted', source, 1)
end
for i = 0, n - 1 do
  local endpoint = ARGV[14 + 2 * i]
  local id = redis.call('INCR', P .. ':seq')
  local ep = cjson.encode({ARGV[3], source, endpoint})
  redis.call('HSET', P .. ':d:' .. id, 'message_id', mid, 'direction', ARGV[3],
    'source', source, 'endpoint', endpoint, 'url', ARGV[15 + 2 * i], 'status', 'pending',
    'attempts', 0, 'next_attempt', created, 'created', created)
  redis.call('RPUSH', P .. ':msg:' .. mid .. ':d', id)
  redis.call('SADD', P .. ':endpoints', ep)
  redis.call('ZADD', P .. ':pending:' .. ep, created, id)
  if ARGV[15 + 2 * i] == '' then
    -- A subscription's: waits in arrival order for its subscriber's acknowledgement.
    redis.call('ZADD', P .. ':sub:' .. source, id, id)
  elseif ARGV[13] ~= created then
    -- The schedule's first delay: waits with the retries.
    redis.call('HSET', P .. ':d:' .. id, 'next_attempt', ARGV[13])
    redis.call('ZADD', P .. ':delayed', ARGV[13], id)
  else
    redis.call('XADD', P .. ':due', '*', 'd', id)
  end
end
return {mid, 0}
"""

# ARGV: P, source, message id, endpoint name of subscriptions. Marks the message's
# subscription delivery and every earlier one delivered; -1: no such delivery.
_ACK = """
local P = ARGV[1]
local sub = P .. ':sub:' .. ARGV[2]
local upto = nil
for _, id in ipairs(redis.call('LRANGE', P .. ':msg:' .. ARGV[3] .. ':d', 0, -1)) do
  local d = redis.call('HMGET', P .. ':d:' .. id, 'source', 'endpoint')
  if d[1] == ARGV[2] and d[2] == ARGV[4] then upto = tonumber(id) end
end
if not upto then return -1 end
local ep = cjson.encode({'inbound', ARGV[2], ARGV[4]})
local ids = redis.call('ZRANGEBYSCORE', sub, '-inf', upto)
local retention = tonumber(ARGV[5])
for _, id in ipairs(ids) do
  redis.call('HSET', P .. ':d:' .. id, 'status', 'delivered', 'next_attempt', '')
  redis.call('HINCRBY', P .. ':d:' .. id, 'attempts', 1)
  redis.call('ZREM', P .. ':pending:' .. ep, id)
  redis.call('ZREM', sub, id)
  if retention > 0 then
    -- As _FINISH does: a message all of whose deliveries are done expires.
    local mkey = P .. ':msg:' .. redis.call('HGET', P .. ':d:' .. id, 'message_id')
    local others = redis.call('LRANGE', mkey .. ':d', 0, -1)
    local done = true
    for _, other in ipairs(others) do
      if redis.call('HGET', P .. ':d:' .. other, 'status') ~= 'delivered' then done = false end
    end
    if done then
      local created = tonumber(redis.call('HGET', mkey, 'created'))
      local left = math.max(1, math.floor(created * 1000 + retention - tonumber(ARGV[6])))
      redis.call('PEXPIRE', mkey, left)
      redis.call('PEXPIRE', mkey .. ':d', left)
      for _, other in ipairs(others) do
        redis.call('PEXPIRE', P .. ':d:' .. other, left)
        redis.call('PEXPIRE', P .. ':d:' .. other .. ':a', left)
      end
    end
  end
end
if #ids > 0 then redis.call('HINCRBY', P .. ':stats:' .. ep, 'delivered', #ids) end
return #ids
"""

_PROMOTE = """
local P = ARGV[1]
local ids = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', ARGV[2], 'LIMIT', 0, ARGV[3])
for _, id in ipairs(ids) do
  redis.call('ZREM', P .. ':delayed', id)
  redis.call('XADD', P .. ':due', '*', 'd', id)
end
local first = redis.call('ZRANGE', P .. ':delayed', 0, 0, 'WITHSCORES')
if first[2] then return {#ids, first[2]} end
return {#ids, false}
"""

# ARGV: P, entry id, delivery id. Returns the delivery and its message, or a
# reason it is not to be attempted (the entry is then acknowledged and deleted).
_TAKE = """
local P = ARGV[1]
local function drop()
  redis.call('XACK', P .. ':due', ARGV[4], ARGV[2])
  redis.call('XDEL', P .. ':due', ARGV[2])
end
local d = redis.call('HMGET', P .. ':d:' .. ARGV[3], 'message_id', 'direction', 'source',
  'endpoint', 'url', 'attempts', 'status', 'next_attempt')
if not d[1] or d[7] ~= 'pending' then drop() return {'skip'} end
local key = cjson.encode({d[3], d[4]})
if redis.call('SISMEMBER', P .. ':disabled', key) == 1 then
  redis.call('SADD', P .. ':parked:' .. key, ARGV[3])
  drop()
  return {'parked'}
end
local m = redis.call('HMGET', P .. ':msg:' .. d[1], 'event_type', 'headers', 'body', 'created')
if not m[3] then drop() return {'skip'} end
return {'ok', d[1], d[2], d[3], d[4], d[5], d[6], m[1], m[2], m[3], m[4], d[8]}
"""

# ARGV: P, entry id, delivery id, group, attempt JSON, ok, outcome, next attempt,
# last error, retention ms (0: keep).
_FINISH = """
local P = ARGV[1]
local dkey = P .. ':d:' .. ARGV[3]
redis.call('XACK', P .. ':due', ARGV[4], ARGV[2])
redis.call('XDEL', P .. ':due', ARGV[2])
local d = redis.call('HMGET', dkey, 'message_id', 'direction', 'source', 'endpoint', 'status')
if not d[1] then return 0 end
local ep = cjson.encode({d[2], d[3], d[4]})
redis.call('RPUSH', dkey .. ':a', ARGV[5])
if ARGV[6] ~= '1' then redis.call('HINCRBY', P .. ':stats:' .. ep, 'failures', 1) end
if d[5] ~= 'pending' then return 0 end
redis.call('HINCRBY', dkey, 'attempts', 1)
redis.call('HSET', dkey, 'last_error', ARGV[9])
local outcome = ARGV[7]
if outcome == 'delivered' or outcome == 'dead' then
  redis.call('HSET', dkey, 'status', outcome, 'next_attempt', '')
  redis.call('ZREM', P .. ':pending:' .. ep, ARGV[3])
  redis.call('HINCRBY', P .. ':stats:' .. ep, outcome, 1)
  local retention = tonumber(ARGV[10])
  if outcome == 'delivered' and retention > 0 then
    local mkey = P .. ':msg:' .. d[1]
    local ids = redis.call('LRANGE', mkey .. ':d', 0, -1)
    for _, id in ipairs(ids) do
      if redis.call('HGET', P .. ':d:' .. id, 'status') ~= 'delivered' then return 1 end
    end
    local created = tonumber(redis.call('HGET', mkey, 'created'))
    local left = math.max(1, math.floor(created * 1000 + retention - tonumber(ARGV[11])))
    redis.call('PEXPIRE', mkey, left)
    redis.call('PEXPIRE', mkey .. ':d', left)
    for _, id in ipairs(ids) do
      redis.call('PEXPIRE', P .. ':d:' .. id, left)
      redis.call('PEXPIRE', P .. ':d:' .. id .. ':a', left)
    end
  end
elseif outcome == 'gone' then
  local key = cjson.encode({d[3], d[4]})
  redis.call('SADD', P .. ':disabled', key)
  redis.call('SADD', P .. ':parked:' .. key, ARGV[3])
  redis.call('HSET', dkey, 'next_attempt', ARGV[8])
else
  redis.call('HSET', dkey, 'next_attempt', ARGV[8])
  redis.call('ZADD', P .. ':delayed', ARGV[8], ARGV[3])
end
return 1
"""

# ARGV: P, group, then entry ids and delivery ids in pairs, then 'at' time:
# put entries back for anyone to take (a stopped worker, a deferred claim).
_REQUEUE = """
local P = ARGV[1]
local at = ARGV[3]
for i = 4, #ARGV, 2 do
  redis.call('XACK', P .. ':due', ARGV[2], ARGV[i])
  redis.call('XDEL', P .. ':due', ARGV[i])
  if at == '' then
    redis.call('XADD', P .. ':due', '*', 'd', ARGV[i + 1])
  else
    redis.call('ZADD', P .. ':delayed', at, ARGV[i + 1])
  end
end
return 1
"""

_ENABLE = """
local P = ARGV[1]
local key = ARGV[2]
local was = redis.call('SREM', P .. ':disabled', key)
local ids = redis.call('SMEMBERS', P .. ':parked:' .. key)
redis.call('DEL', P .. ':parked:' .. key)
for _, id in ipairs(ids) do
  redis.call('HSET', P .. ':d:' .. id, 'next_attempt', ARGV[3])
  redis.call('XADD', P .. ':due', '*', 'd', id)
end
return was
"""

_RETRY = """
local P = ARGV[1]
local mkey = P .. ':msg:' .. ARGV[2]
if redis.call('EXISTS', mkey) == 0 then return -1 end
local count = 0
for _, id in ipairs(redis.call('LRANGE', mkey .. ':d', 0, -1)) do
  local dkey = P .. ':d:' .. id
  local d = redis.call('HMGET', dkey, 'status', 'direction', 'source', 'endpoint', 'created')
  if d[1] ~= 'delivered' then
    count = count + 1
    local ep = cjson.encode({d[2], d[3], d[4]})
    redis.call('HSET', dkey, 'status', 'pending', 'attempts', 0, 'next_attempt', ARGV[3])
    if d[1] == 'dead' then
      redis.call('HINCRBY', P .. ':stats:' .. ep, 'dead', -1)
      redis.call('ZADD', P .. ':pending:' .. ep, d[5], id)
      redis.call('XADD', P .. ':due', '*', 'd', id)
    elseif redis.call('ZREM', P .. ':delayed', id) == 1 then
      redis.call('XADD', P .. ':due', '*', 'd', id)
    end
  end
end
return count
"""


async def _create_group(redis: Redis, prefix: str) -> None:
    try:
        await redis.xgroup_create(f"{prefix}:due", GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


def _unavailable(error: BaseException) -> StoreUnavailable:
    # The error's class only: a connection error's text may name the URL.
    return StoreUnavailable(f"redis: {type(error).__name__}")


def _consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _due(delivery_id: int, row: Any) -> Due | None:
    """A `_TAKE` answer as the Due it claimed; None: not to be attempted."""
    if _text(row[0]) != "ok":
        return None
    return Due(
        delivery_id=delivery_id,
        message_id=_text(row[1]),
        direction=Direction(_text(row[2])),
        source=_text(row[3]),
        endpoint=_text(row[4]),
        url=_text(row[5]),
        attempts=int(row[6]),
        event_type=_text(row[7]) or None,
        headers=[(k, v) for k, v in json.loads(row[8])],
        body=bytes(row[9]),
        created=float(row[10]),
        due=float(row[11]) if row[11] else 0.0,
    )


class _Pipelined:
    """Script calls made in one turn of the event loop, sent in one pipeline at its end.

    One round trip and one pooled connection for every event accepted and every
    attempt recorded in the turn, instead of one each: under load they queued for
    the pool's connections. Each script runs on its own (not a transaction): one
    failing fails only its caller, with StoreUnavailable; each caller hears back
    only once Redis answered its own script.
    """

    def __init__(self, redis: Redis, check: Callable[[], None]) -> None:
        self._redis = redis
        self._check = check
        self._queued: list[tuple[Any, list[Any], asyncio.Future[Any]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    async def call(self, script: Any, args: list[Any]) -> Any:
        self._check()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queued.append((script, args, future))
        if len(self._queued) == 1:
            loop.call_soon(self._send)
        return await future

    def _send(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.create_task(self._run(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def drain(self) -> None:
        await asyncio.gather(*self._sending, return_exceptions=True)

    async def _run(self, batch: list[tuple[Any, list[Any], asyncio.Future[Any]]]) -> None:
        results: list[Any]
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for script, args, _ in batch:
                    await script(args=args, client=pipe)
                results = await pipe.execute(raise_on_error=False)
        except RedisError as exc:
            results = [exc] * len(batch)
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(_unavailable(result))
            else:
                future.set_result(result)


class RedisStore:
    """The queue in Redis. Open with `await RedisStore.open(url, ...)`."""

    def __init__(
        self,
        redis: Redis,
        *,
        prefix: str,
        claim_idle: float,
        retention: float | None,
        clock: Clock,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._clock = clock
        self.claim_idle = claim_idle
        self.retention = retention
        self.consumer = _consumer_name()
        self._closed = False
        # delivery id -> stream entry id, of the deliveries this replica has in flight.
        self._inflight: dict[int, str] = {}
        # Per endpoint at its per_endpoint share: delivery id -> (stream entry id, the
        # delivery as taken) of the entries read meanwhile, in the order read (the order
        # they came due). Kept as taken: while an entry is in this replica's pending list
        # nothing but a 410 changes its delivery (a retry or an enable moves only
        # deliveries that are not in the stream), and a 410 here sends them back
        # (`finish`); picking one for a free slot costs no second take. Not kept (None)
        # past HELD_BODY bytes: taken again when picked, so a hold is never 256 large bodies.
        self._held: dict[tuple[str, str], collections.OrderedDict[int, tuple[str, Due | None]]] = {}
        self._endpoints: dict[int, tuple[str, str]] = {}
        # Endpoints whose hold overflowed at the last read, and until when reads are
        # bounded by the room left in their holds (`_room`).
        self._full: set[tuple[str, str]] = set()
        # (monotonic) When idle entries of stopped replicas were last looked for.
        self._last_takeover = -POLL
        self._quiet_until = 0.0
        self._last_touch = 0.0
        self._heartbeat: asyncio.Task[None] | None = None
        self.on_new_deliveries: Callable[[], None] | None = None
        # Accepts and attempt records of one turn of the loop, sent in one pipeline.
        self._scripts = _Pipelined(redis, self._check)
        self._accept = redis.register_script(_ACCEPT)
        self._promote = redis.register_script(_PROMOTE)
        self._take = redis.register_script(_TAKE)
        self._finish = redis.register_script(_FINISH)
        self._requeue = redis.register_script(_REQUEUE)
        self._enable = redis.register_script(_ENABLE)
        self._retry = redis.register_script(_RETRY)
        self._ack = redis.register_script(_ACK)

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        prefix: str = "sidecar:webhooks",
        claim_idle: float = 60.0,
        retention: float | None = None,
        clock: Clock = time.time,
    ) -> RedisStore:
        # A pool that waits for a free connection: the default one fails the call
        # past 100 in use, and intake plus the attempts in flight go past that.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=CONNECTIONS,
            timeout=TIMEOUT,
            socket_timeout=TIMEOUT,
            socket_connect_timeout=TIMEOUT,
        )
        redis: Redis = Redis(connection_pool=pool)
        try:
            await _create_group(redis, prefix)
        except BaseException:
            await redis.aclose()
            raise
        store = cls(redis, prefix=prefix, claim_idle=claim_idle, retention=retention, clock=clock)
        store._heartbeat = asyncio.create_task(store._beat(), name="webhook-redis-heartbeat")
        return store

    def configure(self, *, claim_idle: float, retention: float | None) -> None:
        self.claim_idle = claim_idle
        self.retention = retention

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._heartbeat is not None:
                self._heartbeat.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._heartbeat
            # What was already sent (accepts, attempt records) completes first.
            await self._scripts.drain()
            await self._redis.aclose()

    async def _beat(self) -> None:
        """Touch the entries in flight every third of claim_idle, on its own clock:
        the worker may wait a long time for slow attempts without claiming anything."""
        while not self._closed:
            await asyncio.sleep(self.claim_idle / 3)
            try:
                await self._touch(self._clock())
            except StoreUnavailable:
                log.warning("webhook queue: Redis unreachable, deliveries in flight not touched")

    def _check(self) -> None:
        if self._closed:
            raise StoreClosed("the webhook store is closed")

    async def _call(self, script: Any, args: Sequence[Any]) -> Any:
        self._check()
        try:
            return await script(args=[self._prefix, *args])
        except RedisError as exc:
            raise _unavailable(exc) from None

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
        now = self._clock()
        message_id = new_message_id(now)
        status = MessageStatus.routed if targets else MessageStatus.unrouted
        dedup = dedup_id if dedup_id is not None and dedup_window > 0 else ""
        args: list[Any] = [
            message_id,
            direction.value,
            source,
            event_type or "",
            status.value,
            json.dumps(list(headers)),
            body,
            repr(now),
            dedup,
            max(1, int(dedup_window * 1000)),
            len(targets),
            repr(now + first_attempt_in) if first_attempt_in > 0 else repr(now),
        ]
        for target in targets:
            args += [target.endpoint, target.url]
        found, duplicate = await self._scripts.call(self._accept, [self._prefix, *args])
        accepted = Accepted(_text(found), duplicate=bool(duplicate), routed=bool(targets))
        if targets and not accepted.duplicate and self.on_new_deliveries is not None:
            self.on_new_deliveries()
        return accepted

    async def claim(self, limit: int, per_endpoint: int) -> list[Due]:
        """Due deliveries for this replica: what is due moves into the stream, then
        the entries held for a free slot go first, then entries a crashed replica
        left idle are taken over, then new ones read."""
        self._check()
        now = self._clock()
        await self._touch(now)
        if limit <= 0:
            return []
        await self._call(self._promote, [repr(now), _PROMOTE_BATCH])
        busy: dict[tuple[str, str], int] = {}
        for pair in self._endpoints.values():
            busy[pair] = busy.get(pair, 0) + 1
        claimed: list[Due] = []
        # Held entries first, oldest first: they came due before anything still unread.
        picks: list[tuple[str, int]] = []  # those held without their delivery: take again
        for pair, held in self._held.items():
            free = per_endpoint - busy.get(pair, 0)
            while held and free > 0 and len(claimed) + len(picks) < limit:
                delivery_id, (entry_id, ready) = held.popitem(last=False)
                busy[pair] = busy.get(pair, 0) + 1
                if ready is None:
                    picks.append((entry_id, delivery_id))
                else:
                    self._claimed(ready, entry_id, claimed)
                free -= 1
        for (entry_id, _), taken in zip(picks, await self._take_all(picks), strict=True):
            if taken is not None:
                self._claimed(taken, entry_id, claimed)
        room = self._room(now, limit - len(claimed))
        if room <= 0:
            return claimed
        deferred: list[Any] = []
        read = [
            (entry_id, delivery_id)
            for entry_id, delivery_id in await self._read(room)
            # Ours, in flight or held, idle past claim_idle: still ours.
            if delivery_id not in self._inflight
            and not any(delivery_id in h for h in self._held.values())
        ]
        for (entry_id, delivery_id), due in zip(read, await self._take_all(read), strict=True):
            if due is None:
                continue
            pair = (due.source, due.endpoint)
            if busy.get(pair, 0) >= per_endpoint:
                held = self._held.setdefault(pair, collections.OrderedDict())
                if len(held) < HOLD:
                    # Kept, in the order read, for this endpoint's next free slot: put
                    # back in the queue it would lose its place to every later entry.
                    held[delivery_id] = (entry_id, due if len(due.body) <= HELD_BODY else None)
                else:
                    deferred += [entry_id, delivery_id]
                    self._full.add(pair)
                continue
            busy[pair] = busy.get(pair, 0) + 1
            self._claimed(due, entry_id, claimed)
        if deferred:
            # Over what this replica holds for the endpoint: back to the queue, for
            # this or another replica.
            self._quiet_until = now + DEFER
            await self._call(self._requeue, [GROUP, repr(now + DEFER), *deferred])
        return claimed

    def _room(self, now: float, room: int) -> int:
        """How many new entries to read, of `room` free slots.

        After a read sent entries back because an endpoint's hold was full, reading on
        at every claim would take (message and all) and send back that endpoint's later
        entries again and again. Until DEFER has passed (when those are due again, and
        another endpoint's entries behind them are read as before): nothing while every
        such hold is more than half full, then only what fits in them.
        """
        if not self._full:
            return room
        if now >= self._quiet_until:
            self._full.clear()
            return room
        space = [HOLD - len(self._held.get(pair, ())) for pair in self._full]
        if all(free < HOLD // 2 for free in space):
            return 0
        return min(room, sum(space))

    def _claimed(self, due: Due, entry_id: str, into: list[Due]) -> None:
        self._inflight[due.delivery_id] = entry_id
        self._endpoints[due.delivery_id] = (due.source, due.endpoint)
        into.append(due)

    async def _read(self, room: int) -> list[tuple[str, int]]:
        """Stream entries for this replica: idle ones of a stopped replica, then new ones."""
        key = f"{self._prefix}:due"
        entries: list[tuple[str, int]] = []
        try:
            now = time.monotonic()  # real time, whatever clock the queue's times use
            # At most once a POLL: what a stopped replica left has been idle for
            # claim_idle already, a second more is nothing; at every claim, the look
            # was a round trip per claim for what is almost never there.
            if now - self._last_takeover >= min(POLL, self.claim_idle / 3):
                self._last_takeover = now
                stolen: Any = await self._redis.xautoclaim(
                    key, GROUP, self.consumer, int(self.claim_idle * 1000), "0-0", count=room
                )
                for entry_id, fields in stolen[1]:
                    if fields:  # a deleted entry comes back empty
                        entries.append((_text(entry_id), int(fields[b"d"])))
                if stolen[1]:
                    log.info(
                        "webhook deliveries taken over from a stopped replica: %d",
                        len(stolen[1]),
                    )
                room -= len(entries)
            if room > 0:
                read: Any = await self._redis.xreadgroup(
                    GROUP, self.consumer, {key: ">"}, count=room
                )
                for _, items in read or ():
                    for entry_id, fields in items:
                        entries.append((_text(entry_id), int(fields[b"d"])))
        except ResponseError as exc:
            if "NOGROUP" in str(exc):
                # Redis lost the stream (restarted without persistence, flushed):
                # make it again, so the deliveries accepted from now on flow.
                log.warning("webhook queue: the Redis stream was gone; created it again")
                with contextlib.suppress(RedisError):
                    await _create_group(self._redis, self._prefix)
            raise _unavailable(exc) from None
        except RedisError as failed:  # not `exc`: compiled, a name keeps its first type
            raise _unavailable(failed) from None
        return entries

    async def _take_all(self, entries: list[tuple[str, int]]) -> list[Due | None]:
        """Each stream entry's delivery as it is now (None: not to be attempted), in
        one pipelined round trip: one per delivery made a claim of 64 take 64."""
        if not entries:
            return []
        self._check()
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for entry_id, delivery_id in entries:
                    await self._take(args=[self._prefix, entry_id, delivery_id, GROUP], client=pipe)
                rows = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None
        return [_due(d, row) for (_, d), row in zip(entries, rows, strict=True)]

    async def _touch(self, now: float) -> None:
        """Reset the idle time of this replica's entries in flight or held: they are alive."""
        ours: list[Any] = [*self._inflight.values()]
        for held in self._held.values():
            ours.extend(entry_id for entry_id, _ in held.values())
        if not ours or now - self._last_touch < self.claim_idle / 3:
            return
        self._last_touch = now
        try:
            await self._redis.xclaim(
                f"{self._prefix}:due",
                GROUP,
                self.consumer,
                0,
                ours,
                justid=True,
            )
        except RedisError as exc:
            raise _unavailable(exc) from None

    async def next_due(self) -> float | None:
        self._check()
        now = self._clock()
        try:
            first = await self._redis.zrange(f"{self._prefix}:delayed", 0, 0, withscores=True)
        except RedisError as exc:
            raise _unavailable(exc) from None
        # Other replicas add to the stream too, and entries in flight need touching.
        poll = now + min(POLL, self.claim_idle / 3)
        return min(float(first[0][1]), poll) if first else poll

    async def finish(
        self, due: Due, attempt: Attempt, outcome: Outcome, next_attempt: float | None = None
    ) -> None:
        entry_id = self._inflight.pop(due.delivery_id, "0-0")
        self._endpoints.pop(due.delivery_id, None)
        error = attempt.failure
        record = json.dumps(
            {
                "at": attempt.at,
                "status_code": attempt.status_code,
                "error": attempt.error,
                "duration": attempt.duration,
                "due": attempt.due,
            }
        )
        when = next_attempt if next_attempt is not None else attempt.at
        retention = int((self.retention or 0) * 1000)
        await self._scripts.call(
            self._finish,
            [
                self._prefix,
                entry_id,
                due.delivery_id,
                GROUP,
                record,
                "1" if attempt.ok else "0",
                outcome.value,
                repr(when),
                error or "",
                retention,
                int(self._clock() * 1000),
            ],
        )
        if outcome is Outcome.gone:
            # The endpoint is disabled now: what this replica holds for it goes back to
            # the stream, where taking it parks it with the others.
            held = self._held.pop((due.source, due.endpoint), None)
            if held:
                pairs: list[Any] = []
                for delivery_id, (held_entry, _) in held.items():
                    pairs += [held_entry, delivery_id]
                await self._call(self._requeue, [GROUP, "", *pairs])

    async def release_claims(self) -> None:
        pairs: list[Any] = []
        for delivery_id, entry_id in self._inflight.items():
            pairs += [entry_id, delivery_id]
        for held in self._held.values():
            for delivery_id, (entry_id, _) in held.items():
                pairs += [entry_id, delivery_id]
        if not pairs:
            return
        self._inflight.clear()
        self._endpoints.clear()
        self._held.clear()
        await self._call(self._requeue, [GROUP, "", *pairs])

    async def enable(self, source: str, endpoint: str) -> bool:
        key = json.dumps([source, endpoint], separators=(",", ":"))
        enabled = bool(await self._call(self._enable, [key, repr(self._clock())]))
        if enabled and self.on_new_deliveries is not None:
            self.on_new_deliveries()
        return enabled

    async def retry(self, message_id: str) -> int | None:
        count = int(await self._call(self._retry, [message_id, repr(self._clock())]))
        if count < 0:
            return None
        if count and self.on_new_deliveries is not None:
            self.on_new_deliveries()
        return count

    async def _endpoint_rows(self) -> list[tuple[str, list[Any]]]:
        """Per endpoint key: pending count, oldest pending, stats, disabled."""
        self._check()
        p = self._prefix
        try:
            keys = sorted(_text(k) for k in await self._redis.smembers(f"{p}:endpoints"))
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                _, source, endpoint = json.loads(key)
                pipe.zcard(f"{p}:pending:{key}")
                pipe.zrange(f"{p}:pending:{key}", 0, 0, withscores=True)
                pipe.hgetall(f"{p}:stats:{key}")
                pipe.sismember(
                    f"{p}:disabled", json.dumps([source, endpoint], separators=(",", ":"))
                )
            results = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None
        return [(key, results[4 * i : 4 * i + 4]) for i, key in enumerate(keys)]

    async def depths(self) -> list[QueueDepth]:
        now = self._clock()
        out = []
        for key, (count, oldest, _, _) in await self._endpoint_rows():
            if count:
                direction, source, endpoint = json.loads(key)
                age = max(0.0, now - float(oldest[0][1])) if oldest else 0.0
                out.append(QueueDepth(Direction(direction), source, endpoint, int(count), age))
        return out

    async def overview(self) -> Overview:
        now = self._clock()
        stats = []
        for key, (count, oldest, counts, disabled) in await self._endpoint_rows():
            direction, source, endpoint = json.loads(key)
            c = {_text(k): int(v) for k, v in counts.items()}
            stats.append(
                EndpointStats(
                    direction=Direction(direction),
                    source=source,
                    endpoint=endpoint,
                    depth=int(count),
                    oldest_pending_age=max(0.0, now - float(oldest[0][1])) if oldest else None,
                    successes=c.get("delivered", 0),
                    failures=c.get("failures", 0),
                    dead=c.get("dead", 0),
                    disabled=bool(disabled),
                )
            )
        try:
            unrouted = await self._redis.hgetall(f"{self._prefix}:unrouted")
        except RedisError as exc:
            raise _unavailable(exc) from None
        return Overview(stats, {_text(k): int(v) for k, v in unrouted.items()})

    async def dead_letters(self, limit: int = 50) -> list[DeadLetter] | None:
        return None  # no index of them: a delivery's status lives in its own hash

    async def message(self, message_id: str) -> MessageView | None:
        self._check()
        p = self._prefix
        try:
            m = await self._redis.hgetall(f"{p}:msg:{message_id}")
            if not m:
                return None
            ids = [_text(i) for i in await self._redis.lrange(f"{p}:msg:{message_id}:d", 0, -1)]
            pipe = self._redis.pipeline(transaction=False)
            for delivery_id in ids:
                pipe.hgetall(f"{p}:d:{delivery_id}")
                pipe.lrange(f"{p}:d:{delivery_id}:a", 0, -1)
            results = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None
        deliveries = []
        for i in range(len(ids)):
            d = {_text(k): _text(v) for k, v in results[2 * i].items()}
            if not d:
                continue  # expired by the retention a moment before the message itself
            attempts = [Attempt(**json.loads(a)) for a in results[2 * i + 1]]
            deliveries.append(
                DeliveryView(
                    endpoint=d["endpoint"],
                    url=d["url"],
                    status=DeliveryStatus(d["status"]),
                    attempts=attempts,
                    next_attempt=float(d["next_attempt"]) if d.get("next_attempt") else None,
                    last_error=d.get("last_error") or None,
                )
            )
        fields = {_text(k): v for k, v in m.items()}
        return MessageView(
            id=message_id,
            direction=Direction(_text(fields["direction"])),
            source=_text(fields["source"]),
            event_type=_text(fields["event_type"]) or None,
            status=MessageStatus(_text(fields["status"])),
            created=float(fields["created"]),
            deliveries=deliveries,
        )

    async def pending(self, source: str, after: int | None, limit: int) -> list[Pending]:
        """The subscription's unacknowledged events of `source` after delivery `after`."""
        self._check()
        p = self._prefix
        low = "-inf" if after is None else f"({after}"
        try:
            ids = await self._redis.zrangebyscore(f"{p}:sub:{source}", low, "+inf", 0, limit)
            if not ids:
                return []
            async with self._redis.pipeline(transaction=False) as pipe:
                for delivery_id in ids:
                    pipe.hget(f"{p}:d:{_text(delivery_id)}", "message_id")
                mids = [_text(m) for m in await pipe.execute() if m is not None]
            async with self._redis.pipeline(transaction=False) as pipe:
                for mid in mids:
                    pipe.hmget(f"{p}:msg:{mid}", "event_type", "headers", "body", "created")
                messages = await pipe.execute()
        except RedisError as exc:
            raise _unavailable(exc) from None
        out = []
        for delivery_id, mid, m in zip(ids, mids, messages, strict=False):
            if m[2] is None:
                continue  # removed by retention meanwhile
            out.append(
                Pending(
                    delivery_id=int(_text(delivery_id)),
                    message_id=mid,
                    event_type=_text(m[0]) or None,
                    headers=[(k, v) for k, v in json.loads(m[1])],
                    body=bytes(m[2]),
                    created=float(m[3]),
                )
            )
        return out

    async def ack(self, source: str, message_id: str) -> int | None:
        """Mark this event and every earlier one of the subscription delivered."""
        retention = int((self.retention or 0) * 1000)
        now = int(self._clock() * 1000)
        acked = int(await self._call(self._ack, [source, message_id, SUBSCRIPTION, retention, now]))
        return None if acked < 0 else acked
