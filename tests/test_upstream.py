"""The bulkhead (FIFO, bounded, cancellation-safe) and the transport error mapping."""

from __future__ import annotations

import aiohttp
import anyio
import anyio.lowlevel
import pytest

from gateway.errors import BudgetExceeded, Overloaded, UpstreamFailed
from gateway.sse import SSEProtocolError
from gateway.upstream import UPSTREAM_ERRORS, Bulkhead, map_transport_error

pytestmark = pytest.mark.anyio


async def test_admits_up_to_the_limit_then_queues_fifo() -> None:
    bulkhead = Bulkhead(limit=2, max_pending=5)
    await bulkhead.acquire()
    await bulkhead.acquire()
    order: list[int] = []

    async def wait(n: int) -> None:
        await bulkhead.acquire()
        order.append(n)

    async with anyio.create_task_group() as group:
        for n in range(3):
            group.start_soon(wait, n)
            await anyio.wait_all_tasks_blocked()
        assert bulkhead.pending == 3
        for _ in range(3):
            bulkhead.release()
            await anyio.wait_all_tasks_blocked()
    assert order == [0, 1, 2]
    assert bulkhead.active == 2
    assert bulkhead.pending == 0


async def test_sheds_when_the_queue_is_full() -> None:
    bulkhead = Bulkhead(limit=1, max_pending=0)
    await bulkhead.acquire()
    with pytest.raises(Overloaded) as caught:
        await bulkhead.acquire()
    assert caught.value.code == "upstream_saturated"
    assert caught.value.headers()["retry-after"]


async def test_cancelled_waiter_leaves_the_queue() -> None:
    bulkhead = Bulkhead(limit=1, max_pending=1)
    await bulkhead.acquire()
    with anyio.move_on_after(0.05) as scope:
        await bulkhead.acquire()
    assert scope.cancelled_caught
    assert bulkhead.pending == 0
    bulkhead.release()
    assert bulkhead.active == 0


async def test_slot_is_never_lost_when_a_waiter_is_cancelled_as_it_is_served() -> None:
    """Release and cancel at the same moment: whoever ends up with the slot gives it back."""
    bulkhead = Bulkhead(limit=1, max_pending=2)
    await bulkhead.acquire()
    served: list[str] = []

    async def use(name: str, scope: anyio.CancelScope) -> None:
        with scope:
            await bulkhead.acquire()
            try:
                served.append(name)
                await anyio.lowlevel.checkpoint()
            finally:
                bulkhead.release()

    first_scope = anyio.CancelScope()
    async with anyio.create_task_group() as group:
        group.start_soon(use, "first", first_scope)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(use, "second", anyio.CancelScope())
        await anyio.wait_all_tasks_blocked()
        bulkhead.release()  # hands the slot to `first`...
        first_scope.cancel()  # ...which is cancelled in the same instant
    assert "second" in served
    assert (bulkhead.active, bulkhead.pending) == (0, 0)


def _refused() -> aiohttp.ClientConnectorError:
    key = aiohttp.client_reqrep.ConnectionKey("h", 1, False, True, None, None, None)
    return aiohttp.ClientConnectorError(key, ConnectionRefusedError(111, "refused"))


@pytest.mark.parametrize(
    ("exc", "kind", "code"),
    [
        (aiohttp.ConnectionTimeoutError("t"), BudgetExceeded, "upstream_connect_timeout"),
        (_refused(), UpstreamFailed, "upstream_connect_error"),
        (aiohttp.ServerDisconnectedError(), UpstreamFailed, "upstream_protocol_error"),
        (aiohttp.ClientPayloadError("cut"), UpstreamFailed, "upstream_protocol_error"),
        (aiohttp.ClientOSError(104, "reset"), UpstreamFailed, "upstream_protocol_error"),
        (SSEProtocolError("long"), UpstreamFailed, "upstream_protocol_error"),
        (ValueError("json"), UpstreamFailed, "upstream_protocol_error"),
    ],
)
def test_transport_errors_map_to_the_most_specific(
    exc: Exception, kind: type[Exception], code: str
) -> None:
    mapped = map_transport_error(exc)
    assert isinstance(mapped, kind)
    assert mapped.code == code


def test_our_own_timeouts_are_never_taken_for_transport_errors() -> None:
    """aiohttp's timeouts subclass TimeoutError, as BudgetExceeded does: only the client
    library's own classes may be mapped, or an idle timeout would become a 502."""
    assert not isinstance(BudgetExceeded("idle", "x"), UPSTREAM_ERRORS)
    assert isinstance(aiohttp.ConnectionTimeoutError("t"), UPSTREAM_ERRORS)


async def test_waiters_are_served_earliest_deadline_first() -> None:
    bulkhead = Bulkhead(limit=1, max_pending=5)
    await bulkhead.acquire()
    order: list[float] = []

    async def wait(deadline: float) -> None:
        await bulkhead.acquire(deadline)
        order.append(deadline)
        bulkhead.release()

    async with anyio.create_task_group() as group:
        for deadline in (60.0, 2.0, 30.0, 2.0):
            group.start_soon(wait, deadline)
            await anyio.wait_all_tasks_blocked()
        bulkhead.release()
    assert order == [2.0, 2.0, 30.0, 60.0]
    assert (bulkhead.active, bulkhead.pending) == (0, 0)


async def test_a_full_queue_estimates_when_a_slot_frees() -> None:
    bulkhead = Bulkhead(limit=1, max_pending=3)
    for _ in range(10):  # ten slots freed within a few milliseconds: a fast queue
        await bulkhead.acquire()
        bulkhead.release()
    await bulkhead.acquire()

    async def wait() -> None:
        await bulkhead.acquire()

    with anyio.move_on_after(1):
        async with anyio.create_task_group() as group:
            for _ in range(3):
                group.start_soon(wait)
            await anyio.wait_all_tasks_blocked()
            with pytest.raises(Overloaded) as caught:
                await bulkhead.acquire()
            group.cancel_scope.cancel()
    assert caught.value.retry_after_s == 1  # moves fast: the floor, not a constant guess
    slow = Bulkhead(limit=1, max_pending=0)
    slow._released.extend([0.0, anyio.current_time()])  # two releases, far apart
    await slow.acquire()
    with pytest.raises(Overloaded) as caught:
        await slow.acquire()
    assert caught.value.retry_after_s > 1


async def test_a_pool_waiter_takes_the_first_slot_to_free_and_leaves_the_other_lines() -> None:
    a, b = Bulkhead(limit=1, max_pending=4), Bulkhead(limit=1, max_pending=4)
    await a.acquire()
    await b.acquire()
    got: list[Bulkhead] = []

    async def wait() -> None:
        got.append(await Bulkhead.first_free([a, b]))

    async with anyio.create_task_group() as group:
        group.start_soon(wait)
        await anyio.wait_all_tasks_blocked()
        assert (a.pending, b.pending) == (1, 1)  # in both lines at once
        b.release()  # b frees first: the waiter is b's now, and left a's line
    assert got == [b]
    assert (a.active, a.pending, b.active, b.pending) == (1, 0, 1, 0)
    a.release()  # no one waits: a's slot is free again
    assert a.active == 0
    assert await Bulkhead.first_free([a, b]) is a  # room: taken at once


async def test_a_pool_waiter_cancelled_as_it_is_served_passes_the_slot_on() -> None:
    a, b = Bulkhead(limit=1, max_pending=4), Bulkhead(limit=1, max_pending=4)
    await a.acquire()
    await b.acquire()
    scope = anyio.CancelScope()
    after: list[Bulkhead] = []

    async def first() -> None:
        with scope:
            held = await Bulkhead.first_free([a, b])
            try:
                await anyio.lowlevel.checkpoint()
            finally:
                held.release()

    async def second() -> None:
        await a.acquire()
        after.append(a)

    async with anyio.create_task_group() as group:
        group.start_soon(first)
        await anyio.wait_all_tasks_blocked()
        group.start_soon(second)
        await anyio.wait_all_tasks_blocked()
        a.release()  # hands a's slot to the pool waiter...
        scope.cancel()  # ...cancelled in the same instant: the slot goes to the next in line
    assert after == [a]
    assert (a.active, a.pending, b.active, b.pending) == (1, 0, 1, 0)


async def test_a_pool_waiter_is_shed_when_every_line_is_full() -> None:
    a, b = Bulkhead(limit=1, max_pending=0), Bulkhead(limit=1, max_pending=0)
    await a.acquire()
    await b.acquire()
    with pytest.raises(Overloaded) as caught:
        await Bulkhead.first_free([a, b])
    assert caught.value.code == "upstream_saturated"
