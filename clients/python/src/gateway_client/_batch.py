"""Partial results from a batch of awaitables under one budget: the seed's `asyncio.gather`
and `asyncio.as_completed` patterns, done so that one stalled call cannot hold the batch.

Each awaitable runs in its own task under `deadline()` with the batch's absolute deadline
(the earlier of `seconds` and any enclosing deadline), at most `limit` at a time. At the
deadline the stragglers are reported as `DeadlineExceeded` and cancelled (their HTTP
requests close, so the gateway stops their upstream work); awaitables that never got a turn
are closed unstarted and come back the same way. Nothing is left uncancelled once the
iteration ends.

The batch ends at its deadline, not when the stragglers have finished unwinding: unwinding a
cancelled call costs CPU (a LangChain chain runs its error callbacks), and a hundred at once
took one 20 to 50 ms turn of the event loop on two busy cores. So the batch's own timer is set
a hair before the stragglers' (its wake-up is queued first), it reports them without awaiting
anything more, and they finish unwinding as soon as the caller next awaits.

asyncio only (the tasks are asyncio tasks): LangChain and `openai` run on asyncio.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from types import TracebackType
from typing import Generic, TypeVar

import anyio

from gateway_client._deadline import DeadlineExceeded, DeadlineScope, current_deadline

T = TypeVar("T")

Outcome = tuple[int, T | BaseException]

# Stopping early (before the deadline): how long the cancelled rest get to finish (close their
# connections) before they are left to end on their own. Never past the deadline.
_CLEANUP_GRACE_S = 0.25
# How much earlier than the stragglers' own cancel scopes the batch's timer fires, so that its
# wake-up runs before their unwinding (timers due together fire in time order). Under an
# enclosing deadline that comes first, it fires that much later instead: that deadline's block
# ends the batch and raises, as it would around any other await.
_FIRST_S = 0.0001


async def gather_within(
    seconds: float, *awaitables: Awaitable[T], limit: int | None = None
) -> list[T | BaseException]:
    """Await all of `awaitables` for at most `seconds`; return, in input order, each one's
    value or exception (`DeadlineExceeded` for those cut off by the deadline)."""
    outcomes: dict[int, T | BaseException] = {}
    async with as_completed_within(seconds, awaitables, limit=limit) as completions:
        async for index, outcome in completions:
            outcomes[index] = outcome
    return [outcomes[index] for index in range(len(awaitables))]


def as_completed_within(
    seconds: float, awaitables: Iterable[Awaitable[T]], limit: int | None = None
) -> Completions[T]:
    """Iterate `(index, value_or_exception)` as each of `awaitables` finishes, for at most
    `seconds`; those cut off by the deadline come last, as `DeadlineExceeded`.

    `async for index, outcome in as_completed_within(5, calls): ...`. To stop early and cancel
    the rest at once, iterate inside `async with as_completed_within(...) as completions:` (or
    call `aclose()`); otherwise they are cancelled at the deadline anyway.
    """
    if math.isnan(seconds):
        raise ValueError("as_completed_within() needs a number of seconds, not NaN")
    if limit is not None and limit < 1:
        raise ValueError("limit must be at least 1")
    now = time.monotonic()
    outer = current_deadline()
    if outer is not None and outer <= now + seconds:
        return Completions(list(awaitables), at=outer, wake_at=outer + _FIRST_S, limit=limit)
    at = now + seconds
    return Completions(list(awaitables), at=at, wake_at=at - _FIRST_S, limit=limit)


class Completions(Generic[T]):
    """The async iterator `as_completed_within` returns; also an async context manager."""

    def __init__(
        self, awaitables: list[Awaitable[T]], *, at: float, wake_at: float, limit: int | None
    ) -> None:
        self._awaitables = awaitables
        self._at = at
        self._wake_at = wake_at
        self._limit = limit
        self._tasks: list[asyncio.Task[T]] = []
        self._finished: asyncio.Queue[int] | None = None
        self._reported: set[int] = set()
        self._closed = False

    def __aiter__(self) -> AsyncIterator[Outcome[T]]:
        return self

    async def __anext__(self) -> Outcome[T]:
        if self._closed or len(self._reported) == len(self._awaitables):
            raise StopAsyncIteration
        try:
            index = await self._next_index(self._start())
        except BaseException:
            await self.aclose()
            raise
        self._reported.add(index)
        return index, self._outcome(index)

    async def aclose(self) -> None:
        """Cancel what is still running and wait (briefly, shielded, never past the deadline)
        for it to finish."""
        self._closed = True
        pending = [task for task in self._tasks if not task.done()]
        for task in pending:
            task.cancel()
        grace = min(_CLEANUP_GRACE_S, self._at - time.monotonic())
        if pending and grace > 0:
            with anyio.move_on_after(grace, shield=True):
                await asyncio.wait(pending)
        for awaitable in self._awaitables[len(self._tasks) :]:
            _close_unstarted(awaitable)

    async def __aenter__(self) -> Completions[T]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    def _start(self) -> asyncio.Queue[int]:
        if self._finished is not None:
            return self._finished
        finished: asyncio.Queue[int] = asyncio.Queue()
        self._finished = finished
        semaphore = asyncio.Semaphore(self._limit) if self._limit is not None else None
        for index, awaitable in enumerate(self._awaitables):
            task = asyncio.ensure_future(_run(awaitable, self._at, semaphore))
            task.add_done_callback(functools.partial(_report, finished, index))
            self._tasks.append(task)
        return finished

    async def _next_index(self, finished: asyncio.Queue[int]) -> int:
        """The next task to finish, or at the deadline one that has not (first in input
        order). Past the deadline nothing here awaits: each await would hand the loop to the
        stragglers' unwinding, once per outcome still to report."""
        left = self._wake_at - time.monotonic()
        if left > 0:
            with anyio.move_on_after(left):
                while (index := await finished.get()) in self._reported:
                    pass
                return index
        while not finished.empty():
            if (index := finished.get_nowait()) not in self._reported:
                return index
        return next(i for i in range(len(self._tasks)) if i not in self._reported)

    def _outcome(self, index: int) -> T | BaseException:
        task = self._tasks[index]
        if not task.done():
            task.cancel()
            return DeadlineExceeded("the batch's deadline passed")
        if task.cancelled():
            return asyncio.CancelledError()
        error = task.exception()
        return error if error is not None else task.result()


async def _run(awaitable: Awaitable[T], at: float, semaphore: asyncio.Semaphore | None) -> T:
    started = False
    try:
        with DeadlineScope.at(at):
            if semaphore is None:
                started = True
                return await awaitable
            async with semaphore:
                started = True
                return await awaitable
    finally:
        if not started:
            _close_unstarted(awaitable)


def _report(finished: asyncio.Queue[int], index: int, task: asyncio.Task[object]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved here: an outcome nobody waits for any more is not an error
    finished.put_nowait(index)


def _close_unstarted(awaitable: Awaitable[object]) -> None:
    """Close a coroutine that will never run, so Python does not warn it was never awaited."""
    if inspect.iscoroutine(awaitable):
        awaitable.close()
