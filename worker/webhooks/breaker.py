"""A circuit breaker per webhook receiver, shared by every worker through Redis.

After KILN_WEBHOOKS_BREAKER_FAILURES consecutive failed attempts to one receiver (an endpoint, or the
origin of a generation's own `webhookUrl`) its breaker opens: for KILN_WEBHOOKS_BREAKER_COOLDOWN_SECONDS
its deliveries are postponed without a request and without using up an attempt. Then it is half-open:
one attempt at a time goes through as a probe; a success closes the breaker, a failure opens it again.
A dead receiver so costs one request per cool-down instead of one per delivery per retry.

State is the hash `kiln:webhooks:breaker:<receiver>` (failures, open_until, probe_until); times come
from the Redis server (TIME), not the workers' clocks.
"""

from __future__ import annotations

import hashlib

import httpx
import redis.asyncio as aioredis

KEY_PREFIX = "kiln:webhooks:breaker:"
# A closed breaker forgets a few old failures after this long without another.
FAILURES_TTL_SECONDS = 86_400

# KEYS[1] breaker; ARGV probe_seconds. Returns "0" when the attempt may go (closed, or this is the
# half-open probe), else the seconds to wait.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local open_until = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0')
if open_until == 0 then
  return '0'
end
if now < open_until then
  return tostring(open_until - now)
end
local probe_until = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or '0')
if now < probe_until then
  return tostring(probe_until - now)
end
redis.call('HSET', KEYS[1], 'probe_until', tostring(now + tonumber(ARGV[1])))
return '0'
"""

# KEYS[1] breaker; ARGV threshold, cooldown, ttl. Counts a failure; opens (or re-opens) the breaker
# at the threshold or when it was open already (a failed probe).
_FAIL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
local was_open = tonumber(redis.call('HGET', KEYS[1], 'open_until') or '0') > 0
if was_open or failures >= tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'open_until', tostring(now + tonumber(ARGV[2])))
  redis.call('HDEL', KEYS[1], 'probe_until')
end
redis.call('EXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) + tonumber(ARGV[3])))
return failures
"""


def receiver_key(endpoint_id: object | None, url: str) -> str:
    """One breaker per endpoint; a generation's own URL shares one with its origin (scheme, host, port)."""
    if endpoint_id is not None:
        return f"{KEY_PREFIX}endpoint:{endpoint_id}"
    try:
        parsed = httpx.URL(url)
        origin = f"{parsed.scheme}://{parsed.host}:{parsed.port or ''}"
    except Exception:
        origin = url
    return f"{KEY_PREFIX}origin:{hashlib.sha256(origin.encode()).hexdigest()[:32]}"


class ReceiverBreakers:
    def __init__(
        self, redis: aioredis.Redis, *, failures: int, cooldown_seconds: float, probe_seconds: float
    ) -> None:
        self.redis = redis
        self.failures = failures
        self.cooldown_seconds = cooldown_seconds
        self.probe_seconds = probe_seconds  # a probe that never reports back frees the way after this
        self._admit = redis.register_script(_ADMIT)
        self._fail = redis.register_script(_FAIL)

    async def wait_before(self, key: str) -> float:
        """0 when an attempt may go now (it may be the half-open probe), else seconds to postpone it."""
        return float(await self._admit(keys=[key], args=[self.probe_seconds]))

    async def succeeded(self, key: str) -> None:
        await self.redis.delete(key)

    async def failed(self, key: str) -> None:
        await self._fail(keys=[key], args=[self.failures, self.cooldown_seconds, FAILURES_TTL_SECONDS])
