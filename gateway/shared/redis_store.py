"""Slot leases in Redis: one sorted set per pool, `{prefix}slots:{pool}`, of slot ids scored
by when their lease expires, in milliseconds of Redis's own clock (`TIME`), so no process's
clock matters. Each operation is one atomic Lua script (Redis's advice for check-and-set);
`Script` sends EVALSHA and loads the script again after a Redis restart. Releases are
published on `{prefix}freed` so waiting processes try again within milliseconds.

The client is redis-py's asyncio client with hiredis parsing, without its own retries: a
failed call is reported at once, and `shared.on_failure` decides what follows.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence

import redis.asyncio as redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.config import SharedConfig
from gateway.shared.store import StoreUnavailable, Taken

# KEYS[1] the pool's set, KEYS[2..] other pools' sets to count; ARGV[1] the limit, ARGV[2] the
# TTL in ms, ARGV[3..] slot ids wanted. Returns {slots granted (the first ones asked for), ms
# until the earliest lease expires, then the live leases of each of KEYS}.
_TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local free = tonumber(ARGV[1]) - redis.call('ZCARD', KEYS[1])
local granted = 0
for i = 3, #ARGV do
  if granted >= free then break end
  redis.call('ZADD', KEYS[1], now + ttl, ARGV[i])
  granted = granted + 1
end
if granted > 0 then redis.call('PEXPIRE', KEYS[1], ttl) end
local wait = 0
if granted < #ARGV - 2 then
  local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  if first[2] then wait = tonumber(first[2]) - now end
end
local result = {granted, wait}
for i, key in ipairs(KEYS) do
  result[#result + 1] = redis.call('ZCOUNT', key, '(' .. now, '+inf')
end
return result
"""

# KEYS the pools' sets; ARGV[1] the TTL in ms, ARGV[i + 1] the space-separated slot ids held
# in KEYS[i]. Every lease is set to expire TTL from now, added again if it was lost.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  for slot in string.gmatch(ARGV[i + 1], '%S+') do
    redis.call('ZADD', key, now + ttl, slot)
  end
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""

# KEYS the pools' sets; ARGV[1] the channel, ARGV[2i] the name of KEYS[i]'s pool, ARGV[2i+1]
# the space-separated slot ids given back in it. A pool is announced once, if a slot freed.
_GIVE_BACK = """
for i, key in ipairs(KEYS) do
  local freed = 0
  for slot in string.gmatch(ARGV[2 * i + 1], '%S+') do
    freed = freed + redis.call('ZREM', key, slot)
  end
  if freed > 0 then redis.call('PUBLISH', ARGV[1], ARGV[2 * i]) end
end
return 0
"""


class RedisSlotStore:
    def __init__(self, config: SharedConfig) -> None:
        self._prefix = config.key_prefix
        self._ttl_ms = max(1, round(config.lease_ttl_s * 1000))
        self._channel = f"{config.key_prefix}freed"
        self._client = redis.Redis.from_url(
            config.redis_url,
            socket_timeout=config.timeout_s,  # a backstop: each call is also timed by its caller
            socket_connect_timeout=config.timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        self._take = self._client.register_script(_TAKE)
        self._renew = self._client.register_script(_RENEW)
        self._give_back = self._client.register_script(_GIVE_BACK)

    @property
    def client(self) -> redis.Redis:
        """The one connection pool to Redis, shared by every user of the store (quotas too)."""
        return self._client

    def _key(self, pool: str) -> str:
        return f"{self._prefix}slots:{pool}"

    async def take(
        self, pool: str, slots: Sequence[str], limit: int, count: Sequence[str] = ()
    ) -> Taken:
        pools = [pool, *count]
        try:
            granted, wait_ms, *held = await self._take(
                keys=[self._key(name) for name in pools], args=[limit, self._ttl_ms, *slots]
            )
        except RedisError as error:
            raise StoreUnavailable(_describe(error)) from error
        counts = {name: int(n) for name, n in zip(pools, held, strict=True)}
        return Taken(slots[: int(granted)], max(0, int(wait_ms)) / 1000, counts)

    async def renew(self, held: Mapping[str, Collection[str]]) -> None:
        pools = [pool for pool, slots in held.items() if slots]
        if not pools:
            return
        args: list[str | int] = [self._ttl_ms, *(" ".join(held[pool]) for pool in pools)]
        try:
            await self._renew(keys=[self._key(pool) for pool in pools], args=args)
        except RedisError as error:
            raise StoreUnavailable(_describe(error)) from error

    async def give_back(self, released: Mapping[str, Collection[str]]) -> None:
        pools = [pool for pool, slots in released.items() if slots]
        if not pools:
            return
        args = [self._channel]
        for pool in pools:
            args += [pool, " ".join(released[pool])]
        try:
            await self._give_back(keys=[self._key(pool) for pool in pools], args=args)
        except RedisError as error:
            raise StoreUnavailable(_describe(error)) from error

    async def watch_freed(self, on_freed: Callable[[str], None]) -> None:
        pubsub = self._client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            async for message in pubsub.listen():
                if message["type"] == "message":
                    on_freed(str(message["data"]))
        except RedisError as error:
            raise StoreUnavailable(_describe(error)) from error
        finally:
            await pubsub.aclose()

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except RedisError as error:
            raise StoreUnavailable(_describe(error)) from error

    async def aclose(self) -> None:
        await self._client.aclose()


def _describe(error: RedisError) -> str:
    """What went wrong, without the URL (redis-py's messages name host and port, never the
    password)."""
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
