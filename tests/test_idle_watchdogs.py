"""The idle watchdogs of one loop: one timer over a heap, stalls due together ended in batches
with the loop turning between them, a touched stream left alone, a stopped one never fired.
(The end-to-end idle guard, through real sockets, is in test_timeouts.py.)"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable

import anyio
import pytest
import uvloop

from gateway.upstream_reader import IdleWatchdog, IdleWatchdogs


def _recorder(fired: list[int], index: int) -> Callable[[Exception], bool]:
    def interrupt(error: Exception) -> bool:
        fired.append(index)
        return True  # as a stream waiting for its upstream's next chunk

    return interrupt


def test_stalls_due_together_end_in_batches_with_the_loop_turning_between() -> None:
    """On uvloop, as the gateway runs: its clock is read once per loop turn, so watchdogs
    started in one turn are due at the same instant."""

    async def main() -> tuple[list[int], list[int], list[IdleWatchdog]]:
        loop = asyncio.get_running_loop()
        fired: list[int] = []
        dogs = [IdleWatchdog(anyio.CancelScope(), 0.05, _recorder(fired, i)) for i in range(100)]
        turns: list[int] = []  # how many had fired, seen by a callback run every loop turn

        def probe() -> None:
            turns.append(len(fired))
            if len(fired) < len(dogs) and len(turns) < 1_000_000:
                loop.call_soon(probe)

        loop.call_soon(probe)
        await asyncio.sleep(0.2)
        return fired, turns, dogs

    fired, turns, dogs = uvloop.run(main())
    assert sorted(fired) == list(range(100))
    assert all(dog.fired for dog in dogs)
    counts = sorted(set(turns))  # e.g. [0, 32, 64, 96, 100]
    steps = [b - a for a, b in itertools.pairwise(counts)]
    assert max(steps) <= IdleWatchdogs.BATCH, counts  # at most BATCH a turn
    assert len(steps) >= 100 // IdleWatchdogs.BATCH, counts  # other callbacks ran between


@pytest.mark.anyio
async def test_a_touched_stream_is_left_alone_and_a_stopped_one_never_fires() -> None:
    fired: list[int] = []
    touched = IdleWatchdog(anyio.CancelScope(), 0.1, _recorder(fired, 0))
    stopped = IdleWatchdog(anyio.CancelScope(), 0.1, _recorder(fired, 1))
    idle = IdleWatchdog(anyio.CancelScope(), 0.1, _recorder(fired, 2))
    stopped.stop()
    for _ in range(4):
        await asyncio.sleep(0.05)
        touched.touch()
    assert fired == [2]  # only the idle one, once, at its deadline
    assert not touched.fired
    assert not stopped.fired
    assert idle.fired
    await asyncio.sleep(0.15)
    assert fired == [2, 0]  # untouched since: its deadline came
    assert touched.fired
    touched.stop()
    idle.stop()
    assert idle.max_gap >= 0.1


@pytest.mark.anyio
async def test_a_stream_not_waiting_for_its_upstream_is_cancelled_by_its_scope() -> None:
    with anyio.CancelScope() as scope:
        IdleWatchdog(scope, 0.05, lambda error: False)  # busy writing to a slow client
        await asyncio.sleep(5)
    assert scope.cancelled_caught


@pytest.mark.anyio
async def test_streams_that_end_early_do_not_pile_up_in_the_heap() -> None:
    watchdogs = IdleWatchdogs.of(asyncio.get_running_loop())
    before = len(watchdogs)
    for _ in range(5000):  # each ends long before its idle_s (300 s)
        IdleWatchdog(anyio.CancelScope(), 300, lambda error: True).stop()
    assert len(watchdogs) - before < 2500  # at most about 2 x COMPACT_AT stale entries
    live = IdleWatchdog(anyio.CancelScope(), 300, lambda error: True)
    assert len(watchdogs) - before < 2501
    live.stop()
