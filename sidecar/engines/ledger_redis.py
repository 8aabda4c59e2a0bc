"""Budget spend kept in Redis (`budget: {backend: redis://...}`), shared by sidecars.

One key per budget key and window (`sidecar:budget:<key>:<window start>`),
a float that INCRBYFLOAT adds to atomically, so any number of sidecars charge
the same budget. It expires a day after its window ended. How durable a charge
is, is Redis's persistence setting (AOF with `appendfsync always` for the
same promise as the data dir's SQLite file).

Every admission reads the key (one round trip): a budget is shared only if
no sidecar trusts an old copy. The client and its short leash (250 ms, a
second's rest after a failure) are the rate limiter's (limits_redis.py).
"""

from __future__ import annotations

from redis.asyncio import Redis

from .ledger import LedgerDown
from .limits_redis import BackendDown, RedisBackend

_EXPIRE_AFTER = 86400


class RedisLedger:
    def __init__(self, backend: RedisBackend) -> None:
        self.backend = backend

    @staticmethod
    def _key(key: str, window: int) -> str:
        return f"sidecar:budget:{key}:{window}"

    def cached(self, key: str, window: int) -> float | None:
        return None

    async def spent(self, key: str, window: int, until: int) -> float:
        name = self._key(key, window)

        async def read(client: Redis) -> float:
            value = await client.get(name)
            return float(value) if value is not None else 0.0

        try:
            return await self.backend.command(read)
        except BackendDown:
            raise LedgerDown from None

    async def add(self, key: str, window: int, until: int, amount: float) -> None:
        name = self._key(key, window)

        async def write(client: Redis) -> None:
            async with client.pipeline(transaction=True) as pipe:
                pipe.incrbyfloat(name, amount)
                pipe.expireat(name, until + _EXPIRE_AFTER)
                await pipe.execute()

        try:
            await self.backend.command(write)
        except BackendDown:
            raise LedgerDown from None
