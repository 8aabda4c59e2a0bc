"""The delivery worker: claims due deliveries from the store and POSTs them.

Each delivery is its own task, so one slow or failing target never holds up
another; at most `concurrency` run at once. A 2xx delivers; `410 Gone`
disables the endpoint (its deliveries wait for the admin to enable it);
anything else is retried on the schedule (with jitter, or after the
receiver's Retry-After), and after the schedule's last attempt the delivery
is dead. Outbound deliveries are signed per Standard Webhooks at each attempt,
so a retry carries a fresh timestamp.

Attempts go out on the sidecar's own HTTP/1.1 client (http/pool.py, the one the
egress uses): a keep-alive pool per origin, connecting through the address
guard (guard.py). Redirects are not followed; the answer's body is read and
dropped, up to `MAX_ANSWER_BODY` (past that the connection is closed instead).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import quote, urlsplit, urlunsplit

from ..core.headers import SERVER
from ..http.pool import ConnectError, Origin, Pool, UpstreamError, UpstreamReply
from ..policy.webhooks import DeliveryRetry, Webhooks
from .guard import AddressRefused, GuardedResolver, Listeners, check_literal
from .queue import Attempt, Direction, Due, Outcome, Queue, StoreUnavailable
from .signatures import Signer

log = logging.getLogger("sidecar.webhooks")

Clock = Callable[[], float]
_LOOK_AGAIN_AFTER = 1.0
# A receiver's Retry-After is obeyed up to this long.
MAX_RETRY_AFTER = 86400.0
MESSAGE_ID_HEADER = "X-Sidecar-Message-Id"
# An answer's body is only read to keep its connection: past this much, the
# connection is closed rather than read on (a receiver cannot make us hold it).
MAX_ANSWER_BODY = 1 << 20
# The attempt's own timeout bounds connecting too (as one total did with aiohttp):
# a pool's connect timeout, shared by the webhooks of one origin, never fires first.
_CONNECT_TIMEOUT = 3600.0
_IDLE_TIMEOUT = 30.0
# Never replayed to a local target: connection-level, or computed again by the client.
_NOT_FORWARDED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-authorization",
        "proxy-connection",
        "expect",
        MESSAGE_ID_HEADER.lower(),  # ours alone: a sender cannot choose it
    }
)


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    """How one webhook's deliveries are made, compiled from the policy."""

    schedule: tuple[float, ...]
    jitter: float
    timeout: float
    signer: Signer | None = None  # outbound only
    urls: Mapping[str, str] = field(default_factory=dict)  # outbound endpoint -> current URL
    # Outbound endpoints that may reach only public addresses (no allow_private).
    public_only: frozenset[str] = frozenset()


SettingsKey = tuple[Direction, str]
# Called after each attempt was recorded: metrics and spans observe from outside.
AttemptObserver = Callable[[Due, Attempt, Outcome], None]
AttemptEnd = Callable[[Attempt, Outcome], None]


class AttemptWatcher(Protocol):
    """Telemetry around each attempt: `begin` before the request (it may add trace
    headers to the ones about to be sent), the callable it returns once recorded."""

    def begin(self, due: Due, headers: dict[str, str]) -> AttemptEnd: ...


def compile_settings(webhooks: Webhooks | None) -> dict[SettingsKey, DeliverySettings]:
    """Per (direction, webhook name): what the worker needs; built at load, swapped on reload."""
    out: dict[SettingsKey, DeliverySettings] = {}
    if webhooks is None:
        return out

    def base(retry: DeliveryRetry) -> tuple[tuple[float, ...], float]:
        return tuple(retry.schedule), retry.jitter

    for name, hook in webhooks.inbound.items():
        schedule, jitter = base(hook.retry)
        out[Direction.inbound, name] = DeliverySettings(schedule, jitter, hook.timeout)
    for name, group in webhooks.outbound.items():
        schedule, jitter = base(group.retry)
        out[Direction.outbound, name] = DeliverySettings(
            schedule,
            jitter,
            group.timeout,
            signer=Signer(group.signing),
            urls={e.name: e.url for e in group.endpoints},
            public_only=frozenset(e.name for e in group.endpoints if not e.allow_private),
        )
    return out


def retry_after_seconds(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return min(float(value), MAX_RETRY_AFTER)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return min(max(0.0, when.timestamp() - now), MAX_RETRY_AFTER)


class DeliveryWorker:
    """Runs deliveries until stopped. `start()` / `stop()`, or `run_once()` in tests."""

    def __init__(
        self,
        store: Queue,
        settings: Mapping[SettingsKey, DeliverySettings],
        *,
        concurrency: int = 256,
        per_endpoint: int = 64,
        on_attempt: AttemptObserver | None = None,
        watcher: AttemptWatcher | None = None,
        clock: Clock = time.time,
        rand: Callable[[], float] = random.random,
        listeners: Listeners = lambda: (),
    ) -> None:
        self._store = store
        self._settings = settings
        self._concurrency = concurrency
        self._per_endpoint = per_endpoint
        self._on_attempt = on_attempt
        self._watcher = watcher
        self._clock = clock
        self._rand = rand
        # A pool per (public only, origin): the public-only ones connect through a
        # resolver that refuses non-public addresses (outbound endpoints), the others
        # through one that lets local ones through (inbound targets, allow_private).
        # Both refuse the sidecar's own listeners.
        self._pools: dict[tuple[bool, Origin], Pool] = {}
        self._resolvers = (
            GuardedResolver(public_only=False, listeners=listeners),
            GuardedResolver(public_only=True, listeners=listeners),
        )
        self._listeners = listeners
        self._running: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        store.on_new_deliveries = self.wake

    def configure(self, settings: Mapping[SettingsKey, DeliverySettings]) -> None:
        """A reload's new settings; attempts already running finish with the old ones."""
        self._settings = settings
        self.wake()

    def wake(self) -> None:
        self._wake.set()

    async def start(self) -> None:
        self._stopping = False
        self._loop_task = asyncio.create_task(self._loop(), name="webhook-delivery")

    async def stop(self) -> None:
        """Stop claiming; cancel attempts in flight (they stay pending, tried again later)."""
        self._stopping = True
        self._wake.set()
        tasks = [t for t in (self._loop_task, *self._running) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._loop_task = None
        with contextlib.suppress(StoreUnavailable):
            await self._store.release_claims()
        pools, self._pools = self._pools, {}
        for pool in pools.values():
            pool.close()

    def _pool(self, origin: Origin, public_only: bool) -> Pool:
        pool = self._pools.get((public_only, origin))
        if pool is None:
            pool = self._pools[public_only, origin] = Pool(
                origin,
                connect_timeout=_CONNECT_TIMEOUT,
                idle_timeout=_IDLE_TIMEOUT,
                resolver=self._resolvers[public_only],
            )
        return pool

    async def run_once(self) -> int:
        """Claim what is due now and wait for those attempts; how many were made."""
        due = await self._store.claim(self._concurrency, self._per_endpoint)
        await asyncio.gather(*(self._deliver(d) for d in due))
        return len(due)

    async def _loop(self) -> None:
        # The flag, not only the cancel: a library that swallows a CancelledError
        # (seen in the Redis client under load) must not keep the worker running.
        while not self._stopping:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception:
                # The store failed (disk full, closed): keep the worker alive, try later.
                log.exception("webhook delivery worker: claiming failed")
                await asyncio.sleep(_LOOK_AGAIN_AFTER)

    async def _step(self) -> None:
        """Claim what is due and free to run, then wait for the next reason to look again."""
        # One turn of the loop first: the attempts whose records committed together
        # (one store batch) all finish in it, and one claim fills all their slots
        # rather than a claim (and its round trips) per finished attempt.
        await asyncio.sleep(0)
        self._wake.clear()
        free = self._concurrency - len(self._running)
        claimed = await self._store.claim(free, self._per_endpoint) if free > 0 else []
        for due in claimed:
            task = asyncio.create_task(self._deliver(due))
            self._running.add(task)
            task.add_done_callback(self._done)
        if len(self._running) >= self._concurrency:
            await self._wake.wait()  # a finishing attempt wakes us
            return
        next_due = await self._store.next_due()
        delay = None if next_due is None else next_due - self._clock()
        if delay is not None and delay <= 0:
            if claimed:
                return  # more may be claimable now
            # Due, but its endpoints are at their per_endpoint limit: a finishing
            # attempt wakes us; the timeout covers a claim whose record failed.
            delay = _LOOK_AGAIN_AFTER
        # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a cancel that
        # arrives as the wake does (stop() cancels attempts, whose ends wake us).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await self._wake.wait()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._wake.set()

    def _request_headers(self, due: Due, settings: DeliverySettings | None) -> dict[str, str]:
        if due.direction is Direction.inbound:
            headers = {k: v for k, v in due.headers if k.lower() not in _NOT_FORWARDED}
            headers[MESSAGE_ID_HEADER] = due.message_id
            return headers
        headers = {"Content-Type": "application/json", "User-Agent": SERVER}
        if settings is not None and settings.signer is not None:
            headers.update(settings.signer.headers(due.message_id, int(self._clock()), due.body))
        return headers

    async def _deliver(self, due: Due) -> None:
        try:
            await self._attempt(due)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Its claim is released at the next start; nothing else may stop the worker.
            log.exception("webhook delivery %s of %s failed", due.delivery_id, due.message_id)

    async def _attempt(self, due: Due) -> None:
        if not due.url:
            return  # a subscription's (never due): its subscriber acknowledges it
        settings = self._settings.get((due.direction, due.source))
        headers = self._request_headers(due, settings)
        end = self._watcher.begin(due, headers) if self._watcher is not None else None
        started = self._clock()
        status: int | None = None
        error: str | None = None
        retry_after: float | None = None
        elapsed = 0.0
        if settings is None:
            error = f"webhook '{due.source}' is no longer configured"
            schedule: tuple[float, ...] = ()
            jitter = 0.0
        else:
            schedule, jitter = settings.schedule, settings.jitter
            url = settings.urls.get(due.endpoint, due.url)
            public_only = due.endpoint in settings.public_only
            clock = time.monotonic()
            try:
                check_literal(url, public_only=public_only, listeners=self._listeners())
                origin, target = _split(url)
                pool = self._pool(origin, public_only)
                async with asyncio.timeout(settings.timeout):
                    reply = await pool.request("POST", target, headers.items(), due.body)
                    try:
                        status = reply.status
                        if not 200 <= status < 300:
                            retry_after = retry_after_seconds(
                                reply.headers.get("Retry-After"), self._clock()
                            )
                        await _drop_body(reply)
                    finally:
                        reply.release()
            except TimeoutError:
                error = f"no answer within {settings.timeout:g}s"
            # A name per clause: compiled, one name would keep the first clause's type.
            except AddressRefused as refusal:
                error = f"refused: {refusal}"
            except ConnectError as failed:
                # The guard's refusal, raised in the pool's resolve: its cause (its
                # context, compiled: mypyc's `raise ... from` leaves __cause__ unset).
                refused = failed.__cause__ or failed.__context__
                error = (
                    f"refused: {refused}"
                    if isinstance(refused, AddressRefused)
                    else f"could not connect: {type(failed).__name__}"
                )
            except UpstreamError as broken:
                # Not the URL: an endpoint's path can be its credential (as Slack's are).
                error = f"could not connect: {type(broken).__name__}"
            except ValueError:
                error = "could not connect: not an http(s) URL"
            elapsed = time.monotonic() - clock
        attempt = Attempt(
            at=started,
            status_code=status,
            error=error,
            duration=elapsed,
            due=due.due or None,
        )
        outcome, next_attempt = self._outcome(due, attempt, schedule, jitter, retry_after)
        await self._store.finish(due, attempt, outcome, next_attempt)
        if end is not None:
            end(attempt, outcome)
        if self._on_attempt is not None:
            self._on_attempt(due, attempt, outcome)

    def _outcome(
        self,
        due: Due,
        attempt: Attempt,
        schedule: tuple[float, ...],
        jitter: float,
        retry_after: float | None,
    ) -> tuple[Outcome, float | None]:
        if attempt.ok:
            return Outcome.delivered, None
        if attempt.status_code == 410:
            log.warning("webhook endpoint %s/%s answered 410: disabled", due.source, due.endpoint)
            return Outcome.gone, None
        made = due.attempts + 1
        if made >= len(schedule):
            log.warning(
                "webhook message %s to %s/%s is dead after %d attempts",
                due.message_id,
                due.source,
                due.endpoint,
                made,
            )
            return Outcome.dead, None
        delay = schedule[made] * (1 + jitter * (2 * self._rand() - 1))
        if retry_after is not None:
            delay = retry_after
        return Outcome.retry, self._clock() + delay


@functools.lru_cache(maxsize=4096)
def _split(url: str) -> tuple[Origin, str]:
    """The origin a URL's pool connects to, and the request target sent there; a
    ValueError for one that is no http(s) URL. Parsed once per URL, not per attempt."""
    if not url.isascii():
        url = _ascii(url)
    parts = urlsplit(url)
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return Origin.parse(url), target


def _ascii(url: str) -> str:
    """A URL as it goes on the wire (what aiohttp's yarl did): an international name
    in IDNA, other characters of the path and query percent-encoded as UTF-8."""
    parts = urlsplit(url)
    host = (parts.hostname or "").encode("idna").decode("ascii")
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    keep = "/:@!$&'()*+,;=%?~-._"
    return urlunsplit(
        (parts.scheme, host, quote(parts.path, safe=keep), quote(parts.query, safe=keep), "")
    )


async def _drop_body(reply: UpstreamReply) -> None:
    """Read the answer's body to its end (so the connection is kept), not keeping it."""
    if reply.data is not None:
        return  # it came whole with the head
    read = 0
    async for data in reply.body:
        read += len(data)
        if read > MAX_ANSWER_BODY:
            return  # release() closes the connection: the rest is never read
