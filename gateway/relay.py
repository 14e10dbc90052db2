"""One request's upstream exchange: attempts within the deadline, then the relay to the client.

    with deadline scope:                       the whole request: total_s and client hints
        for each (target, try) while budget:   retry/fallback only before the commit
            wait in the upstream's queue       a deadline here is `upstream_pool_timeout`
            with attempt scope:                attempt_s
                send, await headers            connect_s is the HTTP client's; the rest scopes
                with ttft scope: first event   counted in content events, not bytes
                commit status + headers
                with idle scope: each event    idle_s per gap between content events
    after the commit, a failure is one terminal SSE error event, then the stream ends

Every upstream response is closed in `finally`, shielded and bounded; every queue slot is
released. Nothing here takes a `timeout=`: phases read the request's `RequestBudget`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Mapping
from typing import Any

import aiohttp
import anyio

from gateway import jsonbody
from gateway.config import Route, Target
from gateway.deadline import timeout_header_ms
from gateway.errors import BudgetExceeded, GatewayError, UpstreamFailed, UpstreamStatus
from gateway.inflight import Exchange
from gateway.responses import ResponseWriter
from gateway.routing import attempt_plan, failure_condition
from gateway.sse import Event, SSEDecoder, error_event
from gateway.upstream import UPSTREAM_ERRORS, Upstream, map_transport_error

log = logging.getLogger("gateway.relay")

_MAX_ERROR_BODY = 1024 * 1024
_GRACE_S = 1.0  # for the last words to a client after the budget is spent


class Relay:
    def __init__(
        self,
        *,
        exchange: Exchange,
        route: Route,
        path: str,
        body: bytes,
        payload: dict[str, Any],
        upstreams: Mapping[str, Upstream],
        writer: ResponseWriter,
        headers: Mapping[str, str],
    ) -> None:
        self.exchange = exchange
        self.route = route
        self.path = path
        self.body = body  # as the client sent it: forwarded with only `model` swapped
        self.payload = payload
        self.upstreams = upstreams
        self.writer = writer
        self.headers = headers  # sent on every response: X-Request-Id

    async def run(self) -> GatewayError | None:
        """Serve the request; answer every failure; return it (None when all went well, or
        when the client went away and there is no one to answer)."""
        exchange = self.exchange
        failure: GatewayError | None = None
        with anyio.CancelScope(deadline=exchange.budget.deadline.at) as deadline_scope:
            exchange.scope = deadline_scope
            try:
                await self._attempts()
            except GatewayError as error:
                failure = error
        exchange.scope = None
        if exchange.disconnected:
            return None
        if deadline_scope.cancelled_caught:
            if exchange.phase == "queued":
                failure = BudgetExceeded("pool", "Timed out waiting for an upstream connection.")
            else:
                failure = BudgetExceeded("total", "The request's deadline passed.")
        exchange.phase = "done"
        if failure is not None:
            with anyio.move_on_after(_GRACE_S) as grace:
                exchange.scope = grace
                await self._answer_failure(failure)
            exchange.scope = None
        return failure

    async def _attempts(self) -> None:
        deadline = self.exchange.budget.deadline
        last: GatewayError | None = None
        for target, number in attempt_plan(self.route):
            if last is not None:
                if failure_condition(last) not in self.route.retry.retry_on:
                    break
                backoff = self.route.retry.backoff_s * 2 ** (number - 2) if number > 1 else 0.0
                if deadline.remaining() <= backoff:
                    break
                await anyio.sleep(backoff)
            try:
                await self._attempt(self.upstreams[target.upstream], target)
                return
            except GatewayError as error:
                if self.exchange.committed:
                    raise
                last = error
        assert last is not None  # every route has a target, tried at least once
        raise last

    async def _attempt(self, upstream: Upstream, target: Target) -> None:
        exchange = self.exchange
        exchange.attempts += 1
        exchange.upstream = upstream.name
        exchange.phase = "queued"
        queued_at = anyio.current_time()
        await upstream.bulkhead.acquire()
        try:
            started = anyio.current_time()
            exchange.queue_s += started - queued_at
            attempt_end = started + exchange.budget.attempt_s
            if attempt_end >= exchange.budget.deadline.at:  # the deadline comes first anyway
                await self._exchange_with(upstream, target, started)
                return
            with anyio.CancelScope(deadline=attempt_end) as scope:
                await self._exchange_with(upstream, target, started)
            if scope.cancelled_caught:
                raise BudgetExceeded("attempt", "The attempt ran past the route's attempt_s.")
        finally:
            upstream.bulkhead.release()

    async def _exchange_with(self, upstream: Upstream, target: Target, started: float) -> None:
        exchange = self.exchange
        budget = exchange.budget
        attempt_end = min(started + budget.attempt_s, budget.deadline.at)
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if exchange.stream else "application/json",
            "x-request-id": exchange.request_id,
            "x-request-timeout-ms": timeout_header_ms(attempt_end - started - budget.margin_s),
        }
        body = jsonbody.with_model(self.body, self.payload, target.model)
        response: aiohttp.ClientResponse | None = None
        try:
            exchange.phase = "connecting"
            if not exchange.stream:  # the whole answer is the token: the attempt bounds it
                response = await self._send(upstream, body, headers, started)
                await self._relay_whole(response)
                return
            # The first token is due `ttft_s` after the attempt starts, whatever holds it up
            # (connect, headers, keep-alives); no scope needed if the deadline comes first.
            first_due = started + budget.ttft_s
            with anyio.CancelScope(
                deadline=first_due if first_due < attempt_end else math.inf
            ) as first_scope:
                response = await self._send(upstream, body, headers, started)
                events = _ContentEvents(response)
                first = await events.next_batch()
            if first_scope.cancelled_caught:
                raise BudgetExceeded("ttft", f"No first token within ttft_s ({budget.ttft_s:g}s).")
            if first is None:
                raise UpstreamFailed(
                    "The upstream ended the stream before any event.",
                    code="upstream_protocol_error",
                )
            await self._relay_stream(first, events)
        except UPSTREAM_ERRORS as exc:
            raise map_transport_error(exc) from exc
        finally:
            if response is not None:
                upstream.close(response)

    async def _send(
        self, upstream: Upstream, body: bytes, headers: dict[str, str], started: float
    ) -> aiohttp.ClientResponse:
        """Send the attempt; its response once the headers are in, or its error status."""
        exchange = self.exchange
        response = await upstream.send(self.path, body, headers)
        exchange.upstream_s = anyio.current_time() - started
        exchange.phase = "waiting_first_token"
        if response.status >= 400:
            try:
                error_body = await _read_limited(response)
            finally:
                upstream.close(response)
            raise UpstreamStatus(response.status, error_body, response.headers)
        return response

    async def _relay_whole(self, response: aiohttp.ClientResponse) -> None:
        exchange = self.exchange
        body = await response.read()
        jsonbody.loads(body)  # garbage from upstream is a 502, not a 200 the SDK chokes on
        exchange.ttft_s = anyio.current_time() - exchange.arrival
        exchange.committed = exchange.finishing = True
        content_type = response.headers.get("content-type", "application/json")
        await self.writer.whole(200, self._success_headers(content_type), body)

    async def _relay_stream(self, first: list[Event], events: _ContentEvents) -> None:
        """Commit on the first content event, then pass each chunk's events on as one write;
        `idle_s` bounds every gap, kept by one lazily re-armed timer, not a scope per event."""
        exchange = self.exchange
        idle_s = exchange.budget.idle_s
        now = anyio.current_time()
        exchange.last_content_at = now
        exchange.ttft_s = now - exchange.arrival
        await self.writer.start(200, self._success_headers("text/event-stream"))
        exchange.committed = True
        exchange.phase = "streaming"
        batch: list[Event] | None = first
        with anyio.CancelScope() as idle_scope:
            watchdog = _IdleWatchdog(idle_scope, idle_s)
            try:
                while batch is not None:
                    done = _until_done(batch)
                    exchange.finishing = done is not None
                    if done is not None:
                        await self.writer.body(done, more=False)
                        return
                    raw = batch[0].raw if len(batch) == 1 else b"".join(e.raw for e in batch)
                    await self.writer.body(raw)
                    # The gap is counted from here, so a slow client is not an idle upstream.
                    exchange.last_content_at = watchdog.touch()
                    batch = await events.next_batch()
            finally:
                watchdog.stop()
        if watchdog.fired:
            raise BudgetExceeded("idle", f"No token for idle_s ({idle_s:g}s) mid-stream.")
        exchange.finishing = True
        await self.writer.body(b"", more=False)

    async def _answer_failure(self, failure: GatewayError) -> None:
        self.exchange.finishing = True  # the last words: a disconnect after them is normal
        if self.exchange.committed:
            await self.writer.body(error_event(failure), more=False)
        else:
            headers = {**self.headers, "server-timing": self.exchange.server_timing()}
            if self.exchange.upstream is not None:
                headers["x-gateway-upstream"] = self.exchange.upstream
                headers["x-gateway-attempts"] = str(self.exchange.attempts)
            await self.writer.error(failure, headers)

    def _success_headers(self, content_type: str) -> dict[str, str]:
        headers = {
            **self.headers,
            "content-type": content_type,
            "x-gateway-upstream": self.exchange.upstream or "",
            "x-gateway-attempts": str(self.exchange.attempts),
            "server-timing": self.exchange.server_timing(),
        }
        if self.exchange.stream:
            headers["cache-control"] = "no-cache"
            headers["x-accel-buffering"] = "no"  # tell nginx-like proxies not to buffer
        return headers


class _ContentEvents:
    """The upstream's content events, a chunk's worth at a time; keep-alive comments dropped.

    Events are checked to be JSON until the first one is out (a garbage stream is a 502);
    after that they are relayed as they came, unparsed.
    """

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._content = response.content
        self._decoder = SSEDecoder()
        self._ended = False
        self._checked = False

    async def next_batch(self) -> list[Event] | None:
        """The content events of the next chunk that has any; None at the end of the stream."""
        while not self._ended:
            chunk = await self._content.readany()
            if chunk:
                events = self._decoder.feed(chunk)
            else:
                self._ended = True
                events = self._decoder.flush()
            batch = [event for event in events if event.is_content]
            if batch:
                if not self._checked:
                    self._checked = True
                    for event in batch:
                        if not event.is_done:
                            jsonbody.loads(event.data or b"")
                return batch
        return None


def _until_done(batch: list[Event]) -> bytes | None:
    """The batch's bytes up to and including `data: [DONE]`, if it has that event."""
    for index, event in enumerate(batch):
        if event.is_done:
            return b"".join(e.raw for e in batch[: index + 1])
    return None


class _IdleWatchdog:
    """Cancels `scope` when `idle_s` pass without `touch()`: one timer handle per stream,
    re-armed only when it fires early, so relaying an event costs a clock read."""

    def __init__(self, scope: anyio.CancelScope, idle_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._scope = scope
        self._idle_s = idle_s
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + idle_s, self._check)
        self.fired = False

    def touch(self) -> float:
        self._last = now = self._loop.time()
        return now

    def stop(self) -> None:
        self._timer.cancel()

    def _check(self) -> None:
        due = self._last + self._idle_s
        if self._loop.time() >= due:
            self.fired = True
            self._scope.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)


async def _read_limited(response: aiohttp.ClientResponse) -> bytes:
    body = b""
    while len(body) <= _MAX_ERROR_BODY:
        chunk = await response.content.readany()
        if not chunk:
            return body
        body += chunk
    return body[:_MAX_ERROR_BODY]
