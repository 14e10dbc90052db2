"""HTTP transports that carry the deadline to the gateway and bring its errors back.

A `DeadlineTransport` (sync) or `AsyncDeadlineTransport` wraps the HTTP library's own transport
(the one the `openai` SDK uses: see `_http`). For each request made inside `deadline()` it

- sends `X-Request-Timeout-Ms`: the whole milliseconds left at send time, so the gateway (and
  every upstream after it) works to the caller's budget and answers a clear 504 a margin
  before the caller's clock runs out;
- bounds each HTTP timeout (connect, write, pool, read) by what is left, so even the
  synchronous form, which nothing else can interrupt, never waits past the deadline for a
  gateway that does not answer; such a timeout becomes `DeadlineExceeded`;
- checks the deadline again between chunks of the response body;
- refuses to send once the deadline has passed.

Inside or outside a deadline, it turns the gateway's own error codes (a 503/504 body, or the
final `data: {"error": ...}` event of a stream that had started) into the errors of `_errors`.
The pure steps (`stamp`, `ErrorEventScanner`, ...) are shared; only the I/O is written twice.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from gateway_client._deadline import current_deadline
from gateway_client._errors import RequestDeadlineExceeded, error_for
from gateway_client._http import httpx

TIMEOUT_HEADER = "X-Request-Timeout-Ms"
_PHASES = ("connect", "read", "write", "pool")


@dataclass(frozen=True)
class Budget:
    """What the deadline meant for one request: its absolute end (`None`: no deadline) and
    which timeout phases it bounded (tighter than the client's own timeout)."""

    at: float | None = None
    bounded: frozenset[str] = frozenset()

    def check(self) -> None:
        if self.at is not None and time.monotonic() >= self.at:
            raise RequestDeadlineExceeded("the deadline passed while the response was being read")


def stamp(request: httpx.Request) -> Budget:
    """Add the deadline header and tighten the request's timeouts to the current deadline."""
    at = current_deadline()
    if at is None or math.isinf(at):
        return Budget()
    left = at - time.monotonic()
    milliseconds = math.floor(left * 1000)
    if milliseconds <= 0:
        raise RequestDeadlineExceeded("the deadline passed before the request was sent")
    mine = request.headers.get(TIMEOUT_HEADER)
    if mine is not None and mine.strip().isdigit():
        milliseconds = min(milliseconds, int(mine))  # the caller's own, tighter hint stands
    request.headers[TIMEOUT_HEADER] = str(milliseconds)
    timeouts: dict[str, float | None] = dict(request.extensions.get("timeout") or {})
    bounded = set()
    for phase in _PHASES:
        configured = timeouts.get(phase)
        if configured is None or configured > left:
            timeouts[phase] = left
            bounded.add(phase)
    request.extensions["timeout"] = timeouts
    return Budget(at, frozenset(bounded))


def timeout_error(exc: httpx.TimeoutException, budget: Budget) -> RequestDeadlineExceeded | None:
    """`DeadlineExceeded` when the HTTP timeout that fired was the deadline's, else `None`."""
    phase = (
        "connect"
        if isinstance(exc, httpx.ConnectTimeout)
        else "write"
        if isinstance(exc, httpx.WriteTimeout)
        else "pool"
        if isinstance(exc, httpx.PoolTimeout)
        else "read"
    )
    if phase not in budget.bounded:
        return None
    doing = {
        "connect": "connecting to the gateway",
        "read": "waiting for the gateway",
        "write": "sending the request",
        "pool": "waiting for a free connection",
    }[phase]
    return RequestDeadlineExceeded(f"the deadline passed while {doing}")


def may_be_gateway_error(response: httpx.Response) -> bool:
    return response.status_code in (503, 504) and "json" in response.headers.get("content-type", "")


def status_error(
    response: httpx.Response, request: httpx.Request, budget: Budget
) -> Exception | None:
    """The error for a gateway error body already read into `response`, or `None`."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return None
    return error_for(
        error=error,
        request=request,
        headers=response.headers,
        status_code=response.status_code,
        in_deadline=budget.at is not None,
    )


class ErrorEventScanner:
    """Passes a server-sent event stream through, line by line, and spots a final
    `data: {"error": {...}}` event whose code this package maps.

    `feed` returns the bytes to hand on (whole lines only) and the error to raise after them.
    """

    def __init__(self, request: httpx.Request, headers: Mapping[str, str], budget: Budget):
        self._request = request
        self._headers = headers
        self._budget = budget
        self._buffer = b""

    def feed(self, chunk: bytes) -> tuple[bytes, Exception | None]:
        self._buffer += chunk
        end = self._buffer.rfind(b"\n") + 1
        if end == 0:
            return b"", None
        lines, self._buffer = self._buffer[:end], self._buffer[end:]
        if b"error" not in lines:
            return lines, None
        start = 0
        for line in lines.splitlines(keepends=True):
            if line.startswith(b"data:") and (error := self._error(line[5:])) is not None:
                return lines[:start], error
            start += len(line)
        return lines, None

    def flush(self) -> bytes:
        rest, self._buffer = self._buffer, b""
        return rest

    def _error(self, data: bytes) -> Exception | None:
        try:
            event = json.loads(data)
        except ValueError:
            return None
        error = event.get("error") if isinstance(event, dict) else None
        if not isinstance(error, dict):
            return None
        return error_for(
            error=error,
            request=self._request,
            headers=self._headers,
            status_code=None,
            in_deadline=self._budget.at is not None,
        )


def is_event_stream(response: httpx.Response) -> bool:
    return response.headers.get("content-type", "").startswith("text/event-stream")


class AsyncDeadlineTransport(httpx.AsyncBaseTransport):
    """Wraps an async transport (default: the HTTP library's own) as the module says."""

    def __init__(self, inner: httpx.AsyncBaseTransport | None = None, **kwargs: Any) -> None:
        self._inner = inner if inner is not None else httpx.AsyncHTTPTransport(**kwargs)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        budget = stamp(request)
        try:
            response = await self._inner.handle_async_request(request)
            if may_be_gateway_error(response):
                await response.aread()
                if (error := status_error(response, request, budget)) is not None:
                    raise error
                return response
        except httpx.TimeoutException as exc:
            if (exceeded := timeout_error(exc, budget)) is not None:
                raise exceeded from exc
            raise
        if budget.at is not None or is_event_stream(response):
            assert isinstance(response.stream, httpx.AsyncByteStream)
            response.stream = _AsyncGuardedStream(response.stream, request, response, budget)
        return response

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Guard:
    """What both guarded streams do per chunk: check the deadline, pass the bytes on, and turn
    a gateway's final SSE error event (or a read timeout) into the error it means."""

    def __init__(self, request: httpx.Request, response: httpx.Response, budget: Budget) -> None:
        self._budget = budget
        self._scanner = (
            ErrorEventScanner(request, response.headers, budget)
            if is_event_stream(response)
            else None
        )

    def _pass(self, chunk: bytes) -> tuple[bytes, Exception | None]:
        """The bytes to hand on, and the error to raise after them (a final error event)."""
        self._budget.check()
        if self._scanner is None:
            return chunk, None
        return self._scanner.feed(chunk)

    def _rest(self) -> bytes:
        return self._scanner.flush() if self._scanner is not None else b""

    def _timeout(self, exc: httpx.TimeoutException) -> BaseException:
        return timeout_error(exc, self._budget) or exc


class _AsyncGuardedStream(_Guard, httpx.AsyncByteStream):
    def __init__(
        self,
        inner: httpx.AsyncByteStream,
        request: httpx.Request,
        response: httpx.Response,
        budget: Budget,
    ) -> None:
        super().__init__(request, response, budget)
        self._inner = inner

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._inner:
                passed, error = self._pass(chunk)
                if passed:
                    yield passed
                if error is not None:
                    raise error
            if rest := self._rest():
                yield rest
        except httpx.TimeoutException as exc:
            if (mapped := self._timeout(exc)) is not exc:
                raise mapped from exc
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class DeadlineTransport(httpx.BaseTransport):
    """Wraps a synchronous transport (default: the HTTP library's own) as the module says."""

    def __init__(self, inner: httpx.BaseTransport | None = None, **kwargs: Any) -> None:
        self._inner = inner if inner is not None else httpx.HTTPTransport(**kwargs)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        budget = stamp(request)
        try:
            response = self._inner.handle_request(request)
            if may_be_gateway_error(response):
                response.read()
                if (error := status_error(response, request, budget)) is not None:
                    raise error
                return response
        except httpx.TimeoutException as exc:
            if (exceeded := timeout_error(exc, budget)) is not None:
                raise exceeded from exc
            raise
        if budget.at is not None or is_event_stream(response):
            assert isinstance(response.stream, httpx.SyncByteStream)
            response.stream = _SyncGuardedStream(response.stream, request, response, budget)
        return response

    def close(self) -> None:
        self._inner.close()


class _SyncGuardedStream(_Guard, httpx.SyncByteStream):
    def __init__(
        self,
        inner: httpx.SyncByteStream,
        request: httpx.Request,
        response: httpx.Response,
        budget: Budget,
    ) -> None:
        super().__init__(request, response, budget)
        self._inner = inner

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._inner:
                passed, error = self._pass(chunk)
                if passed:
                    yield passed
                if error is not None:
                    raise error
            if rest := self._rest():
                yield rest
        except httpx.TimeoutException as exc:
            if (mapped := self._timeout(exc)) is not exc:
                raise mapped from exc
            raise

    def close(self) -> None:
        self._inner.close()
