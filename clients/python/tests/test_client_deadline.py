"""`deadline()` and `remaining()` on their own: nesting, inheritance, interruption."""

from __future__ import annotations

import asyncio
import time

import anyio
import pytest

from gateway_client import DeadlineExceeded, deadline, remaining

from conftest import SLACK_S


def test_remaining_is_none_outside_a_deadline() -> None:
    assert remaining() is None


def test_deadline_exceeded_is_a_timeout_error() -> None:
    assert issubclass(DeadlineExceeded, TimeoutError)
    assert DeadlineExceeded("x", code="deadline_exceeded").code == "deadline_exceeded"


def test_remaining_counts_down_and_ends_with_the_block() -> None:
    with deadline(10):
        first = remaining()
        time.sleep(0.05)
        second = remaining()
        assert first is not None
        assert second is not None
        assert 9.5 < first <= 10
        assert second < first
    assert remaining() is None


def test_nested_deadlines_tighten_but_never_extend() -> None:
    with deadline(5):
        with deadline(1):
            inner = remaining()
            assert inner is not None
            assert inner <= 1
        with deadline(60):
            looser = remaining()
            assert looser is not None
            assert looser <= 5
        outer = remaining()
        assert outer is not None
        assert 1 < outer <= 5


def test_remaining_is_zero_once_passed_and_the_sync_form_does_not_throw_away_work() -> None:
    """Nothing can interrupt synchronous code: work that finishes late is not discarded."""
    with deadline(0.01):
        time.sleep(0.05)
        assert remaining() == 0.0


def test_a_deadline_is_entered_once() -> None:
    scope = deadline(1)
    with scope, pytest.raises(RuntimeError), scope:
        pass


def test_nan_is_refused() -> None:
    with pytest.raises(ValueError, match="NaN"):
        deadline(float("nan"))


@pytest.mark.anyio
async def test_any_awaitable_is_interrupted_at_the_deadline() -> None:
    """Not only LLM calls: the seed's vector-database lookup is bounded as well."""
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async with deadline(0.3):
            await asyncio.sleep(10)  # a stalled vector database
    assert 0.25 < time.monotonic() - started < 0.3 + SLACK_S


@pytest.mark.anyio
async def test_plain_with_inside_a_coroutine_interrupts_too() -> None:
    with pytest.raises(DeadlineExceeded), deadline(0.1):
        await anyio.sleep(10)


@pytest.mark.anyio
async def test_an_inner_looser_deadline_is_ended_by_the_outer_one() -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async with deadline(0.3), deadline(30):
            await anyio.sleep(10)
    assert time.monotonic() - started < 0.3 + SLACK_S


@pytest.mark.anyio
async def test_an_inner_tighter_deadline_ends_only_its_block() -> None:
    async with deadline(5):
        with pytest.raises(DeadlineExceeded):
            async with deadline(0.1):
                await anyio.sleep(10)
        await anyio.sleep(0.05)  # the outer block goes on
        left = remaining()
        assert left is not None
        assert left > 4


@pytest.mark.anyio
async def test_tasks_created_inside_inherit_the_deadline() -> None:
    async def budget_seen() -> float | None:
        return remaining()

    async with deadline(2):
        seen = await asyncio.create_task(budget_seen())
    assert seen is not None
    assert 1 < seen <= 2


@pytest.mark.anyio
async def test_awaited_tasks_are_cancelled_with_the_block() -> None:
    cancelled = asyncio.Event()

    async def stalls() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(DeadlineExceeded):
        async with deadline(0.1):
            await asyncio.gather(stalls(), stalls())
    assert cancelled.is_set()


@pytest.mark.anyio
async def test_a_block_that_finishes_in_time_returns_normally() -> None:
    async with deadline(1):
        await anyio.sleep(0.01)
    assert remaining() is None


@pytest.mark.anyio
async def test_an_outer_cancellation_is_not_mistaken_for_the_deadline() -> None:
    with anyio.CancelScope() as outer:
        async with deadline(10):
            outer.cancel()
            await anyio.sleep(1)
    assert outer.cancelled_caught
