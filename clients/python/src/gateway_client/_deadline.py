"""One absolute deadline for a block of work, shared by everything that runs inside it.

`deadline(seconds)` keeps an absolute time (on `time.monotonic()`) in a context variable, so
every function called inside and every task created inside sees it (`remaining()`), and every
request made through this package's HTTP clients carries what is left of it. Nested deadlines
take the earliest: an inner one can tighten the budget, never extend it.

In async code (entered with `async with`, or with plain `with` inside a coroutine) the block is
also an anyio cancel scope on the current task: at the deadline whatever it awaits is cancelled
(an HTTP request closes its connection, so the gateway sees the disconnect and stops the
upstream) and the block raises `DeadlineExceeded`. In synchronous code nothing can interrupt a
running call: the deadline bounds each request made inside instead (see `_transport`).
"""

from __future__ import annotations

import math
import time
from contextvars import ContextVar, Token
from types import TracebackType

import anyio

_DEADLINE: ContextVar[float | None] = ContextVar("gateway_client.deadline", default=None)


class DeadlineExceeded(TimeoutError):
    """The deadline of the enclosing `deadline()` block passed.

    `code` is the gateway's error code when the gateway said so (`deadline_exceeded`,
    `upstream_ttft_timeout`, ...), and `None` when the client's own clock ran out.
    """

    def __init__(self, message: str = "the deadline passed", *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


def current_deadline() -> float | None:
    """The absolute deadline (`time.monotonic()` clock) in force here, or `None`."""
    return _DEADLINE.get()


def remaining() -> float | None:
    """Seconds left before the current deadline (0.0 once it has passed), `None` outside one."""
    at = _DEADLINE.get()
    if at is None:
        return None
    return max(0.0, at - time.monotonic())


def deadline(seconds: float) -> DeadlineScope:
    """A block that must finish within `seconds` (or the enclosing deadline, if earlier).

    Use `async with deadline(5): ...` in async code and `with deadline(5): ...` in synchronous
    code. Past the deadline the block raises `DeadlineExceeded`.
    """
    if math.isnan(seconds):
        raise ValueError("deadline() needs a number of seconds, not NaN")
    return DeadlineScope(seconds)


class DeadlineScope:
    """What `deadline()` returns: a context manager for `with` and `async with`, entered once."""

    def __init__(self, seconds: float, *, at: float | None = None) -> None:
        self._seconds = seconds
        self._fixed_at = at
        self._at = math.inf
        self._budget = seconds
        self._token: Token[float | None] | None = None
        self._scope: anyio.CancelScope | None = None
        self._entered = False

    @classmethod
    def at(cls, at: float) -> DeadlineScope:
        """A scope ending at the absolute time `at` (`time.monotonic()`), or earlier if the
        enclosing deadline does."""
        return cls(at - time.monotonic(), at=at)

    def __repr__(self) -> str:
        return f"deadline({self._seconds:g})"

    def __enter__(self) -> DeadlineScope:
        if self._entered:
            raise RuntimeError("a deadline() block can be entered only once")
        self._entered = True
        now = time.monotonic()
        requested = self._fixed_at if self._fixed_at is not None else now + self._seconds
        outer = _DEADLINE.get()
        self._at = requested if outer is None else min(outer, requested)
        self._budget = max(0.0, self._at - now)
        self._token = _DEADLINE.set(self._at)
        if _in_async_task():
            scope = anyio.CancelScope(deadline=anyio.current_time() + (self._at - now))
            scope.__enter__()
            self._scope = scope
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        scope, self._scope = self._scope, None
        try:
            if scope is not None:
                scope.__exit__(exc_type, exc, traceback)
        finally:
            if self._token is not None:
                _DEADLINE.reset(self._token)
                self._token = None
        # The scope is cancelled only by its deadline, and swallows only that cancellation
        # (an enclosing scope's passes on to that scope): it becomes DeadlineExceeded.
        if scope is not None and scope.cancelled_caught:
            raise DeadlineExceeded(
                f"the deadline passed (a budget of {self._budget:.3g} s)"
            ) from None

    async def __aenter__(self) -> DeadlineScope:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, traceback)


def _in_async_task() -> bool:
    """Whether this code runs in an async task (asyncio or trio) rather than plain threads."""
    try:
        anyio.get_current_task()
    except RuntimeError:
        return False
    return True
