"""The quota scripts against a real redis-server: the same answers as the in-process store,
every limit of a key in one step, on Redis's clock."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as redis

from gateway.config import KeyLimits, SharedConfig
from gateway.shared.quota_store import LocalQuotaStore, QuotaStore, RedisQuotaStore
from tests.conftest import RedisServer

pytestmark = pytest.mark.anyio


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[QuotaStore, QuotaStore]]:
    config = SharedConfig(redis_url=redis_server.url, key_prefix=f"q-{uuid.uuid4().hex[:8]}:")
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield LocalQuotaStore(), RedisQuotaStore(client, config)
    finally:
        await client.aclose()


async def test_requests_per_minute_burst_then_refused(stores: tuple[QuotaStore, ...]) -> None:
    limits = KeyLimits(requests_per_min=5)
    for store in stores:
        verdicts = [await store.admit("k", limits, 0, f"s{i}") for i in range(6)]
        assert [v.admitted for v in verdicts] == [True] * 5 + [False]
        refused = verdicts[-1]
        assert refused.refused_by == "requests"
        assert 11.0 < refused.retry_after_s <= 12.0  # 1 request / (5 per minute), less time run
        assert refused.requests is not None
        assert (refused.requests.limit, refused.requests.remaining) == (5, 0)


async def test_one_step_for_every_limit(stores: tuple[QuotaStore, ...]) -> None:
    limits = KeyLimits(requests_per_min=100, tokens_per_min=1000, max_concurrent=2)
    for store in stores:
        assert (await store.admit("k", limits, 700, "a")).admitted
        short = await store.admit("k", limits, 700, "b")  # tokens short
        assert short.refused_by == "tokens"
        assert short.requests is not None
        assert short.requests.remaining == 99  # the refused request took nothing
        assert (await store.admit("k", limits, 100, "c")).admitted
        full = await store.admit("k", limits, 100, "d")  # two in flight
        assert full.refused_by == "concurrent"
        await store.settle("k", limits, reserved=700, used=100, slot="a")  # 600 back, a ends
        again = await store.admit("k", limits, 100, "e")
        assert again.admitted
        assert again.tokens is not None
        assert 700 <= again.tokens.remaining <= 702  # 1000 - 100 - 100 - 100 (+ a refill)


async def test_settle_may_leave_a_debt(stores: tuple[QuotaStore, ...]) -> None:
    limits = KeyLimits(tokens_per_min=600)
    for store in stores:
        assert (await store.admit("k", limits, 100, "")).admitted
        await store.settle("k", limits, reserved=100, used=1200, slot="")
        refused = await store.admit("k", limits, 10, "")
        assert refused.refused_by == "tokens"
        assert refused.tokens is not None
        assert refused.tokens.remaining == 0
        assert 60.0 < refused.retry_after_s <= 61.0  # 600 of debt + 10, at 10 per second


async def test_keys_are_apart(stores: tuple[QuotaStore, ...]) -> None:
    limits = KeyLimits(requests_per_min=1)
    for store in stores:
        assert (await store.admit("a", limits, 0, "")).admitted
        assert not (await store.admit("a", limits, 0, "")).admitted
        assert (await store.admit("b", limits, 0, "")).admitted
