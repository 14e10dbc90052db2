"""gateway.shared stores: the same lease contract, held by the in-process store and by the
Lua scripts against a real redis-server."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import anyio
import pytest
import redis.asyncio as redis

from gateway.config import SharedConfig
from gateway.shared import LocalSlotStore, SlotStore, StoreUnavailable
from gateway.shared.redis_store import RedisSlotStore
from tests.conftest import RedisServer

pytestmark = pytest.mark.anyio
TTL_S = 0.3
_prefixes = itertools.count()


@pytest.fixture(params=["local", "redis"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[SlotStore]:
    if request.param == "local":
        yield LocalSlotStore(TTL_S)
        return
    server: RedisServer = request.getfixturevalue("redis_server")
    config = SharedConfig(
        redis_url=server.url, key_prefix=f"t{next(_prefixes)}:", lease_ttl_s=TTL_S, timeout_s=0.1
    )
    redis_store = RedisSlotStore(config)
    yield redis_store
    await redis_store.aclose()


async def test_take_grants_up_to_the_limit(store: SlotStore) -> None:
    first = await store.take("u", ["a", "b"], limit=3)
    assert list(first.slots) == ["a", "b"]
    second = await store.take("u", ["c", "d"], limit=3)
    assert list(second.slots) == ["c"]  # a prefix of those asked for
    assert 0 < second.retry_in_s <= TTL_S  # when the earliest lease runs out
    full = await store.take("u", ["e"], limit=3)
    assert list(full.slots) == []
    other = await store.take("v", ["a"], limit=1)  # pools are apart
    assert list(other.slots) == ["a"]


async def test_given_back_slots_free_and_are_announced(store: SlotStore) -> None:
    heard: list[str] = []
    first = anyio.Event()

    def on_freed(pool: str) -> None:
        heard.append(pool)
        first.set()

    await store.take("u", ["a"], limit=1)
    async with anyio.create_task_group() as group:
        group.start_soon(store.watch_freed, on_freed)
        await anyio.sleep(0.05)  # subscribed
        await store.give_back({"u": ["a"]})
        await store.give_back({"u": ["a"], "v": ["b"]})  # frees nothing, says nothing
        with anyio.fail_after(2):
            await first.wait()
        await anyio.sleep(0.05)
        group.cancel_scope.cancel()
    assert heard == ["u"]
    assert list((await store.take("u", ["b"], limit=1)).slots) == ["b"]


async def test_an_unrenewed_lease_expires_and_a_renewed_one_does_not(store: SlotStore) -> None:
    await store.take("u", ["kept", "dropped"], limit=2)
    for _ in range(4):  # past the TTL several times over
        await anyio.sleep(TTL_S / 3)
        await store.renew({"u": ["kept"]})
    taken = await store.take("u", ["new", "newer"], limit=2)
    assert list(taken.slots) == ["new"]  # "dropped" expired; "kept" still counts


async def test_renew_registers_leases_the_store_lost(store: SlotStore) -> None:
    await store.renew({"u": ["a", "b"], "v": ["c"]})  # as after Redis restarted empty
    assert list((await store.take("u", ["x"], limit=2)).slots) == []
    assert list((await store.take("u", ["x"], limit=3)).slots) == ["x"]
    assert list((await store.take("v", ["y"], limit=1)).slots) == []
    await store.renew({})  # nothing held: nothing to do


async def test_the_redis_keys_expire_with_their_leases(redis_server: RedisServer) -> None:
    config = SharedConfig(redis_url=redis_server.url, key_prefix="expiry:", lease_ttl_s=TTL_S)
    store = RedisSlotStore(config)
    client = redis.Redis.from_url(redis_server.url)
    try:
        await store.take("u", ["a"], limit=1)
        ttl_ms = await client.pttl("expiry:slots:u")
        assert 0 < ttl_ms <= TTL_S * 1000  # an abandoned gateway leaves nothing behind
        await store.renew({"u": ["a"]})
        assert await client.zscore("expiry:slots:u", "a") is not None
    finally:
        await store.aclose()
        await client.aclose()


async def test_an_unreachable_redis_is_store_unavailable(unaccepting_port: int) -> None:
    refused = RedisSlotStore(SharedConfig(redis_url="redis://127.0.0.1:1/0", timeout_s=0.2))
    hanging = RedisSlotStore(
        SharedConfig(redis_url=f"redis://127.0.0.1:{unaccepting_port}/0", timeout_s=0.2)
    )
    for store in (refused, hanging):
        with anyio.fail_after(2), pytest.raises(StoreUnavailable):
            await store.take("u", ["a"], limit=1)
        with anyio.fail_after(2), pytest.raises(StoreUnavailable):
            await store.watch_freed(lambda pool: None)
        await store.aclose()


async def test_give_back_takes_many_slots_of_many_pools_in_one_call(store: SlotStore) -> None:
    await store.take("u", ["a", "b", "c"], limit=3)
    await store.take("v", ["d"], limit=1)
    await store.give_back({"u": ["a", "b"], "v": ["d"]})
    assert list((await store.take("u", ["x", "y", "z"], limit=3)).slots) == ["x", "y"]
    assert list((await store.take("v", ["w"], limit=1)).slots) == ["w"]


async def test_take_says_how_many_are_held_in_its_pool_and_the_pools_asked(
    store: SlotStore,
) -> None:
    await store.take("v", ["x", "y"], limit=5)
    taken = await store.take("u", ["a", "b"], limit=3, count=["v", "w"])
    assert dict(taken.held) == {"u": 2, "v": 2, "w": 0}  # what a balancer weighs, same call
    await store.give_back({"v": ["x"]})
    assert dict((await store.take("u", [], limit=3, count=["v"])).held) == {"u": 2, "v": 1}
    await anyio.sleep(TTL_S + 0.05)  # leases of a dead holder do not count once expired
    assert dict((await store.take("w", [], limit=1, count=["u"])).held) == {"w": 0, "u": 0}
