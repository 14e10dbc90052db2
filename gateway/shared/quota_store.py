"""Key quotas kept in a store: every limit of a key decided in one step (gateway.tenants).

    QuotaStore        the interface: admit a request over all of a key's limits at once,
                      settle it when it ends (tokens given back or taken, its concurrency
                      lease dropped)
    LocalQuotaStore   in this process's memory, on the event loop's clock: gateways without
                      `shared`, and each process's share while Redis is down (local_share)
    RedisQuotaStore   in Redis, through the slot store's own client: per key a hash
                      `{prefix}quota:{name}` of two buckets (level and time of each) and the
                      sorted set `{prefix}slots:key:{name}` of its requests in flight, leases
                      like an upstream's slots (renewed and expired the same way). Admission
                      is one Lua script timed by Redis's `TIME`; so is settlement.

The arithmetic is `gateway.tenants.buckets`'s, written again in Lua; the tests hold the two
to the same answers against a real redis-server.
"""

from __future__ import annotations

import math
from typing import Protocol

import redis.asyncio as redis
from redis.exceptions import RedisError

from gateway.config import KeyLimits, SharedConfig
from gateway.deadline import clock
from gateway.shared.store import StoreUnavailable
from gateway.tenants import buckets
from gateway.tenants.buckets import Limit, Standing, TenantState, Verdict


class QuotaStore(Protocol):
    async def admit(self, name: str, limits: KeyLimits, tokens: int, slot: str) -> Verdict:
        """Take 1 request and `tokens` (clamped to the bucket) and a concurrency lease `slot`
        if every limit allows, all in one step; else nothing."""

    async def settle(
        self, name: str, limits: KeyLimits, *, reserved: int, used: int, slot: str
    ) -> None:
        """The request ended: `reserved - used` tokens go back (negative: taken), its lease
        goes."""


class LocalQuotaStore:
    def __init__(self) -> None:
        self._states: dict[str, TenantState] = {}

    def state(self, name: str, limits: KeyLimits) -> TenantState:
        state = self._states.get(name)
        if state is None:
            state = self._states[name] = TenantState.new(limits, clock())
        return state

    async def admit(self, name: str, limits: KeyLimits, tokens: int, slot: str) -> Verdict:
        return self.admit_now(name, limits, tokens)

    async def settle(
        self, name: str, limits: KeyLimits, *, reserved: int, used: int, slot: str
    ) -> None:
        self.settle_now(name, limits, reserved=reserved, used=used)

    def admit_now(self, name: str, limits: KeyLimits, tokens: int) -> Verdict:
        return buckets.admit(self.state(name, limits), limits, tokens, clock())

    def settle_now(self, name: str, limits: KeyLimits, *, reserved: int, used: int) -> None:
        buckets.settle(self.state(name, limits), reserved, used, clock())


# A bucket's level now, from its stored level and time (ms of Redis's clock), refilled at
# capacity per minute; a missing bucket is full. Shared by both scripts.
_LEVEL = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function level(cap, l, at)
  if not l then return cap end
  return math.min(cap, tonumber(l) + math.max(0, now - tonumber(at)) * cap / 60000)
end
local function keep(rpm, rl, tpm, tl)
  local full = 0
  if rpm > 0 then full = math.max(full, (rpm - rl) * 60000 / rpm) end
  if tpm > 0 then full = math.max(full, (tpm - tl) * 60000 / tpm) end
  redis.call('PEXPIRE', KEYS[1], math.ceil(full) + 1000)
end
"""

# KEYS[1] the key's buckets, KEYS[2] its leases; ARGV rpm, tpm (0: no such limit), the tokens
# to reserve, max_concurrent (0: none), the lease id, its TTL in ms. Returns {refused by
# (0 none, 1 requests, 2 tokens, 3 concurrent), ms to wait, request level, token level}.
_ADMIT = (
    _LEVEL
    + """
local rpm, tpm, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local conc, ttl = tonumber(ARGV[4]), tonumber(ARGV[6])
local s = redis.call('HMGET', KEYS[1], 'rl', 'ra', 'tl', 'ta')
local rl, tl = 0, 0
if rpm > 0 then rl = level(rpm, s[1], s[2]) end
if tpm > 0 then tl = level(tpm, s[3], s[4]) end
local refused, wait = 0, 0
if conc > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= conc then refused, wait = 3, 1000 end
end
if rpm > 0 and rl < 1 then
  local w = (1 - rl) * 60000 / rpm
  if w > wait then refused, wait = 1, w end
end
if tpm > 0 and tl < cost then
  local w = (cost - tl) * 60000 / tpm
  if w > wait then refused, wait = 2, w end
end
if refused == 0 then
  if rpm > 0 then rl = rl - 1 end
  if tpm > 0 then tl = tl - cost end
  if rpm > 0 or tpm > 0 then
    redis.call('HSET', KEYS[1], 'rl', tostring(rl), 'ra', tostring(now), 'tl', tostring(tl),
      'ta', tostring(now))
    keep(rpm, rl, tpm, tl)
  end
  if conc > 0 then
    redis.call('ZADD', KEYS[2], now + ttl, ARGV[5])
    redis.call('PEXPIRE', KEYS[2], ttl)
  end
end
return {refused, tostring(wait), tostring(rl), tostring(tl)}
"""
)

# KEYS as _ADMIT's; ARGV rpm, tpm, tokens to give back (negative: to take), the lease id ('':
# none).
_SETTLE = (
    _LEVEL
    + """
local rpm, tpm, delta = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] ~= '' then redis.call('ZREM', KEYS[2], ARGV[4]) end
if tpm > 0 and delta ~= 0 then
  local s = redis.call('HMGET', KEYS[1], 'rl', 'ra', 'tl', 'ta')
  local rl = 0
  if rpm > 0 then rl = level(rpm, s[1], s[2]) end
  local tl = math.min(tpm, level(tpm, s[3], s[4]) + delta)
  redis.call('HSET', KEYS[1], 'rl', tostring(rl), 'ra', tostring(now), 'tl', tostring(tl),
    'ta', tostring(now))
  keep(rpm, rl, tpm, tl)
end
return 0
"""
)

_REFUSED: dict[int, Limit] = {1: "requests", 2: "tokens", 3: "concurrent"}


class RedisQuotaStore:
    def __init__(self, client: redis.Redis, config: SharedConfig) -> None:
        self._prefix = config.key_prefix
        self._ttl_ms = max(1, round(config.lease_ttl_s * 1000))
        self._admit = client.register_script(_ADMIT)
        self._settle = client.register_script(_SETTLE)

    def _keys(self, name: str) -> list[str]:
        return [f"{self._prefix}quota:{name}", f"{self._prefix}slots:{lease_pool(name)}"]

    async def admit(self, name: str, limits: KeyLimits, tokens: int, slot: str) -> Verdict:
        rpm, tpm = limits.requests_per_min or 0, limits.tokens_per_min or 0
        args = [rpm, tpm, buckets.reserved_cost(limits, tokens), limits.max_concurrent or 0]
        try:
            refused, wait_ms, rl, tl = await self._admit(
                keys=self._keys(name), args=[*args, slot, self._ttl_ms]
            )
        except RedisError as error:
            raise StoreUnavailable(_describe(error)) from error
        return Verdict(
            admitted=int(refused) == 0,
            refused_by=_REFUSED.get(int(refused)),
            retry_after_s=float(wait_ms) / 1000,
            requests=_standing(rpm, float(rl)),
            tokens=_standing(tpm, float(tl)),
        )

    async def settle(
        self, name: str, limits: KeyLimits, *, reserved: int, used: int, slot: str
    ) -> None:
        rpm, tpm = limits.requests_per_min or 0, limits.tokens_per_min or 0
        try:
            await self._settle(keys=self._keys(name), args=[rpm, tpm, reserved - used, slot])
        except RedisError as error:
            raise StoreUnavailable(_describe(error)) from error


def lease_pool(name: str) -> str:
    """The pool of a key's concurrency leases, beside the upstreams' pools."""
    return f"key:{name}"


def _standing(capacity: int, level: float) -> Standing | None:
    if capacity <= 0:
        return None
    reset_s = (capacity - level) * 60 / capacity
    return Standing(capacity, max(0, math.floor(level)), reset_s)


def _describe(error: RedisError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
