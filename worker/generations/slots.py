"""A per-connection concurrency limit shared by every worker: a Redis semaphore of expiring leases.

Each holder adds a random token to the sorted set `kiln:slots:<scope>` with its expiry as the score;
a slot is free when fewer than `limit` unexpired tokens remain. The holder renews its token while it
works, so a worker killed with `kill -9` frees its slot by itself once the token expires. Expired
tokens are removed by the next acquire. Times come from the Redis server (TIME), not from the
workers' clocks.
"""

from __future__ import annotations

import asyncio
import secrets
from contextlib import suppress

import redis.asyncio as aioredis

from shared.logging import get_logger

log = get_logger(__name__)

KEY_PREFIX = "kiln:slots:"

# KEYS[1] set; ARGV token, limit, ttl. Adds (or renews) the token when it holds a slot already or one
# is free; 1 when it holds a slot now, else 0.
_ACQUIRE = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local ttl = tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
  redis.call('EXPIRE', KEYS[1], math.ceil(ttl) + 60)
  return 1
end
return 0
"""


def slot_key(scope: str) -> str:
    return f"{KEY_PREFIX}{scope}"


class SlotLease:
    """One held slot, renewed in the background until released."""

    def __init__(self, slots: ConnectionSlots, key: str, token: str, limit: int) -> None:
        self._slots = slots
        self.key = key
        self.token = token
        self._limit = limit
        self._renewer: asyncio.Task[None] | None = asyncio.ensure_future(self._renew())
        self.released = False

    async def _renew(self) -> None:
        interval = max(self._slots.ttl_seconds / 3, 0.05)
        while True:
            await asyncio.sleep(interval)
            try:
                held = await self._slots.try_hold(self.key, self.token, self._limit)
            except Exception as exc:  # Redis blip: the token lives on until its expiry; try again
                log.warning("could not renew a connection slot", error=str(exc))
                continue
            if not held:
                log.warning("a connection slot expired while held; the limit may be exceeded briefly")

    async def release(self) -> None:
        """Give the slot back (idempotent; a Redis error only delays the slot until it expires)."""
        if self.released:
            return
        self.released = True
        if self._renewer is not None:
            self._renewer.cancel()
            with suppress(asyncio.CancelledError):
                await self._renewer
            self._renewer = None
        try:
            await self._slots.redis.zrem(self.key, self.token)
        except Exception as exc:
            log.warning("could not release a connection slot; it frees when it expires", error=str(exc))


class ConnectionSlots:
    def __init__(self, redis: aioredis.Redis, ttl_seconds: float) -> None:
        self.redis = redis
        self.ttl_seconds = ttl_seconds
        self._acquire = redis.register_script(_ACQUIRE)

    async def try_hold(self, key: str, token: str, limit: int) -> bool:
        return bool(await self._acquire(keys=[key], args=[token, limit, self.ttl_seconds]))

    async def try_acquire(self, scope: str, limit: int) -> SlotLease | None:
        """A lease on one of `limit` slots of `scope`, or None at once when all are taken (never waits)."""
        key = slot_key(scope)
        token = secrets.token_hex(12)
        if not await self.try_hold(key, token, limit):
            return None
        return SlotLease(self, key, token, limit)

    async def holders(self, scope: str) -> int:
        """Unexpired leases of `scope` (for tests and operators)."""
        count = await self.redis.zcount(slot_key(scope), "(" + str(await self._now()), "+inf")
        return int(count)

    async def _now(self) -> float:
        seconds, micros = await self.redis.time()
        return float(seconds) + micros / 1_000_000
