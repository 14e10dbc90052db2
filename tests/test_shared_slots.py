"""gateway.shared policy and the shared bulkhead, over the in-process store: several
"processes" (SharedSlots) in one loop, the store's failures played with `down`."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

from gateway.config import SharedConfig, parse_config
from gateway.errors import Overloaded
from gateway.shared import LocalSlotStore, SharedSlots, policy
from gateway.upstream import SharedBulkhead

pytestmark = pytest.mark.anyio
TTL_S = 0.3


def shared_config(**overrides: Any) -> SharedConfig:
    values: dict[str, Any] = {"redis_url": "redis://unused", "lease_ttl_s": TTL_S}
    return SharedConfig(**{**values, "timeout_s": 0.05, **overrides})


@asynccontextmanager
async def processes(
    store: LocalSlotStore, count: int, *, limit: int, pending: int = 100, **config: Any
) -> AsyncIterator[list[SharedBulkhead]]:
    """`count` processes sharing `store`, each with a bulkhead for pool "u"."""
    async with anyio.create_task_group() as group:
        bulkheads = []
        for _ in range(count):
            slots = SharedSlots(store, shared_config(**config))
            await group.start(slots.run)
            gate = slots.gate("u", limit)
            bulkheads.append(SharedBulkhead(limit=limit, max_pending=pending, gate=gate))
        yield bulkheads
        group.cancel_scope.cancel()


async def test_processes_share_one_cap_and_a_release_wakes_another() -> None:
    store = LocalSlotStore(TTL_S)
    peak = active = served = 0

    async def request(bulkhead: SharedBulkhead) -> None:
        nonlocal peak, active, served
        await bulkhead.acquire()
        active += 1
        peak = max(peak, active)
        await anyio.sleep(0.02)
        active -= 1
        served += 1
        bulkhead.release()

    async with processes(store, 3, limit=2) as bulkheads:
        with anyio.fail_after(5):
            async with anyio.create_task_group() as group:
                for i in range(18):
                    group.start_soon(request, bulkheads[i % 3])
        await anyio.sleep(0.05)  # the last releases reach the store
        assert store.held("u") == 0
    assert (peak, served) == (2, 18)  # the cap used, never exceeded
    # 18 requests of 20 ms, 2 at a time: about 0.18 s if each freed slot is taken at once


async def test_the_queue_stays_earliest_deadline_first() -> None:
    store = LocalSlotStore(TTL_S)
    order: list[float] = []
    async with processes(store, 1, limit=1) as (bulkhead,):
        await bulkhead.acquire()

        async def wait(deadline: float) -> None:
            await bulkhead.acquire(deadline)
            order.append(deadline)
            bulkhead.release()

        async with anyio.create_task_group() as group:
            for deadline in (30.0, 10.0, 20.0):
                group.start_soon(wait, deadline)
                await anyio.sleep(0.01)
            bulkhead.release()
    assert order == [10.0, 20.0, 30.0]


async def test_a_long_holder_keeps_its_slot_past_the_ttl() -> None:
    store = LocalSlotStore(TTL_S)
    async with processes(store, 2, limit=1) as (first, second):
        await first.acquire()
        with anyio.move_on_after(TTL_S * 4) as waited:
            await second.acquire()
        assert waited.cancelled_caught  # renewed every TTL / 3: never up for grabs
        first.release()
        with anyio.fail_after(1):
            await second.acquire()
        second.release()


async def test_closed_refuses_new_requests_and_keeps_running_ones(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, "gateway.shared")
    store = LocalSlotStore(TTL_S)
    async with processes(store, 1, limit=4, on_failure="closed") as (bulkhead,):
        await bulkhead.acquire()
        store.down = True
        for _ in range(3):
            with pytest.raises(Overloaded) as refused:
                await bulkhead.acquire()
            assert refused.value.code == "shared_state_unavailable"
            assert refused.value.headers()["retry-after"] == "1"
        assert bulkhead.active == 1  # the running one was not cut
        store.down = False
        for _ in range(100):  # the renewal loop sees it back within a second
            if bulkhead.gate.admission() == "shared":
                break
            await anyio.sleep(0.02)
        await bulkhead.acquire()
        assert store.held("u") == 2  # the one held through the outage re-registered
    lost = [r for r in caplog.records if "shared state lost" in r.getMessage()]
    back = [r for r in caplog.records if "shared state back" in r.getMessage()]
    assert [r.levelname for r in lost] == ["WARNING"]  # once, however many calls failed
    assert [r.levelname for r in back] == ["INFO"]
    assert "on_failure=closed" in lost[0].getMessage()


async def test_open_admits_without_the_shared_cap() -> None:
    store = LocalSlotStore(TTL_S)
    async with processes(store, 2, limit=2, on_failure="open") as (first, second):
        await first.acquire()
        await first.acquire()
        store.down = True
        with anyio.fail_after(1):
            await second.acquire()
            await second.acquire()  # 4 at once: the shared cap is not enforced
        with anyio.move_on_after(0.1) as waited:
            await second.acquire()  # ... but the process's own cap still is
        assert waited.cancelled_caught
        assert second.active == 2


async def test_local_share_caps_each_process_at_its_share() -> None:
    store = LocalSlotStore(TTL_S)
    async with processes(store, 1, limit=5, expected_replicas=2) as (bulkhead,):
        store.down = True
        with anyio.fail_after(1):
            for _ in range(3):  # ceil(5 / 2)
                await bulkhead.acquire()
        with anyio.move_on_after(0.1) as waited:
            await bulkhead.acquire()
        assert waited.cancelled_caught
        store.down = False  # back: the shared cap (5) is this process's to use again
        with anyio.fail_after(2):
            await bulkhead.acquire()
        assert store.held("u") == 4


async def test_a_store_slower_than_timeout_s_is_down_within_one_call() -> None:
    class SlowStore(LocalSlotStore):
        async def take(self, pool: str, slots: Any, limit: int, count: Any = ()) -> Any:
            await anyio.sleep(1)
            return await super().take(pool, slots, limit, count)

    store = SlowStore(TTL_S)
    async with processes(store, 1, limit=4, expected_replicas=4) as (bulkhead,):
        started = anyio.current_time()
        with anyio.fail_after(1):
            await bulkhead.acquire()  # one call timed out: admitted under local_share
        assert anyio.current_time() - started < 0.5
        assert bulkhead.gate.admission() == "local"


def test_policy_is_pure_arithmetic() -> None:
    health = policy.Health()
    assert [health.observe(ok) for ok in (True, False, False, True)] == [
        None,
        "lost",
        None,
        "recovered",
    ]
    assert policy.admission("closed", up=True) == "shared"
    assert [policy.admission(mode, up=False) for mode in ("closed", "open", "local_share")] == [
        "closed",
        "open",
        "local",
    ]
    assert policy.local_limit(64, up=False, on_failure="local_share", processes=3) == 22
    assert policy.local_limit(64, up=False, on_failure="open", processes=3) == 64
    assert policy.renew_every_s(9) == 3
    assert policy.probe_every_s(30) == 1
    assert policy.poll_s(5) == 0.5
    assert policy.poll_s(0) == 0.001


def test_workers_without_shared_divide_every_cap() -> None:
    data: dict[str, Any] = {
        "upstreams": [
            {"name": "openai", "base_url": "http://a/v1", "max_connections": 64},
            {"name": "vllm", "base_url": "http://b/v1", "max_connections": 3, "max_pending": 5},
        ],
        "routes": [{"model": "m", "targets": [{"upstream": "openai"}]}],
    }
    config = parse_config(data, {})
    divided = policy.per_worker(config, 4)
    assert [(u.max_connections, u.max_pending) for u in divided.upstreams] == [(16, 64), (1, 2)]
    assert policy.per_worker_line(config, 4) == (
        "caps are per worker: upstream openai 64 -> 16, upstream vllm 3 -> 1 per worker "
        "(max_pending too); set shared.redis_url for one cap across workers"
    )
    assert policy.per_worker(config, 1) is config
    assert policy.per_worker_line(config, 1) is None
    with_shared = parse_config({**data, "shared": {"redis_url": "redis://r"}}, {})
    assert policy.per_worker(with_shared, 4) is with_shared  # one cap, through Redis
    assert policy.per_worker_line(with_shared, 4) is None
