"""One request's upstream exchange: attempts within the deadline, then the relay to the client.

    with deadline scope:                       the whole request: total_s and client hints
        for each (target, try):                retry/fallback only before the commit, and only
            policy: fits? budget? ejected?     what gateway.resilience lets start
            [hedge: a second target races]     for the first token, the loser cancelled
            wait in the upstream's queue       earliest deadline first; `upstream_pool_timeout`
            with attempt scope:                attempt_s
                send, await headers            the endpoint's translation for this upstream
                                               (gateway.protocols); connect_s is the client's
                with ttft scope: first token   generated content, not bytes, not a role chunk,
                                               a ping or response.created
                stream: commit, relay events   idle_s per gap (one lazily re-armed timer)
                or assemble: read all, answer  non-streaming calls streamed upstream
                or whole: read, answer         upstream_stream: false, embeddings
    after the commit, a failure is one terminal error event (in the endpoint's shape)

Every upstream response is closed in `finally`; every queue slot is released. Nothing here
takes a `timeout=`: phases read the request's `RequestBudget`.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
import anyio

from gateway import jsonbody
from gateway.config import Route, Target
from gateway.deadline import clock, timeout_header_ms
from gateway.errors import (
    BudgetExceeded,
    GatewayError,
    Overloaded,
    UpstreamFailed,
    UpstreamStatus,
)
from gateway.inflight import Attempt, Exchange
from gateway.protocols.api import Api, Assembly, Translation
from gateway.resilience.attempts import backoff, fits
from gateway.resilience.attempts import retry_after as asked_retry_after
from gateway.resilience.outlier import Standing, passed_over
from gateway.responses import ResponseWriter
from gateway.routing import RouteState, failure_condition
from gateway.sse import Event
from gateway.upstream import (
    UPSTREAM_ERRORS,
    Upstream,
    map_transport_error,
    mask_secrets,
    passed_headers,
)
from gateway.upstream_reader import (
    ContentEvents,
    IdleWatchdog,
    read_limited,
    read_whole,
)

attempt_log = logging.getLogger("gateway.attempt")  # one line per failed or skipped attempt
_RNG = random.Random()  # backoff jitter

_GRACE_S = 1.0  # for the last words to a client after the budget is spent


class Relay:
    def __init__(
        self,
        *,
        exchange: Exchange,
        route: Route,
        api: Api,
        targets: Sequence[Target],
        body: bytes,
        payload: dict[str, Any],
        upstreams: Mapping[str, Upstream],
        state: RouteState,
        writer: ResponseWriter,
        headers: Mapping[str, str],
        trace_headers: Mapping[str, str],
        client_headers: Mapping[str, str],
    ) -> None:
        self.exchange = exchange
        self.route = route
        self.state = state
        self.api = api
        self.targets = targets  # the route's targets whose upstreams can serve `api`
        self.body = body  # as the client sent it: forwarded with only `model` swapped
        self.payload = payload
        self.upstreams = upstreams
        self.writer = writer
        self.headers = headers  # sent on every response: X-Request-Id
        self.trace_headers = trace_headers  # the client's W3C trace context, for the upstream
        self.client_headers = client_headers  # forwarded: only what an allowlist names
        self._passed: dict[str, str] = {}  # the answering upstream's rate-limit headers
        rules = api.stream
        # Assemble: the client wants a whole answer, the upstream is asked for a stream.
        self.assemble = (
            rules is not None
            and not exchange.stream
            and route.upstream_stream
            and rules.streamable(payload)
        )
        # The upstream's answer is read as a stream (guarded by ttft_s and idle_s), or whole.
        self.streamed = rules is not None and (exchange.stream or self.assemble)
        options = payload.get("stream_options")
        # Usage goes in a translated stream if asked for, and always in an assembled answer.
        self.include_usage = self.assemble or (
            isinstance(options, dict) and options.get("include_usage") is True
        )
        self._tried: set[tuple[Target, int]] = set()  # (target, try) made by a hedge

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
        if exchange.shutting_down:
            failure = Overloaded(
                "The gateway is shutting down; send the request again (to another instance).",
                code="shutting_down",
            )
        elif deadline_scope.cancelled_caught:
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
        """Each target in order with its retries, while the policy lets attempts start."""
        exchange, route, state = self.exchange, self.route, self.state
        deadline = exchange.budget.deadline
        last: GatewayError | None = None
        ejected: list[float] = []  # seconds until each ejected target's probe
        self._tried.clear()
        state.retry_budget.record_request(clock())
        targets = self.targets
        for index, target in enumerate(targets):
            upstream = self.upstreams[target.upstream]
            for number in range(1, route.retry.attempts + 1):
                if (target, number) in self._tried:  # a hedge already made this one
                    continue
                if last is not None and failure_condition(last) not in route.retry.retry_on:
                    raise last
                now = clock()
                wait = 0.0
                if number > 1:  # a retry on the same target: backed off, budgeted
                    wait = backoff(route.retry.backoff_s, number - 1, _RNG)
                    asked = _retry_after(last)
                    if asked is not None:
                        if asked >= deadline.remaining():
                            self._skip(target, "retry_after")
                            break
                        wait = max(wait, asked)
                    if not state.retry_budget.try_spend(now):
                        self._skip(target, "retry_budget")
                        break
                if not self._fits(target, wait):
                    self._skip(target, "budget")
                    break
                standing = upstream.outlier.standing(now)
                if standing.out is None:
                    upstream.outlier.admit(now)  # claims the probe, if one is due
                elif passed_over(index, self._standings(now), panic=route.outlier_mode == "panic"):
                    self._skip(target, "ejected" if standing.out == "ejected" else "retry_after")
                    if standing.out == "ejected":
                        ejected.append(upstream.outlier.retry_after(now))
                    break
                elif standing.out == "ejected":
                    exchange.panic_routed = True  # every target is out: this one comes back first
                if wait:
                    exchange.backoff_s += wait
                    await anyio.sleep(wait)
                following = targets[index + 1] if index + 1 < len(targets) else None
                delay = self._hedge_delay(target) if number == 1 else None
                try:
                    if delay is not None and following is not None:
                        await self._hedged(target, following, delay)
                    else:
                        await self._attempt(upstream, target)
                    return
                except GatewayError as error:
                    if exchange.committed:
                        raise
                    last = error
        if last is not None:
            raise last
        if ejected:
            raise Overloaded(
                "Every upstream of this route is ejected after repeated failures.",
                code="circuit_open",
                retry_after_s=max(1, math.ceil(min(ejected))),
            )
        raise BudgetExceeded("total", "No target can answer within the time left.")

    def _standings(self, now: float) -> list[Standing]:
        return [self.upstreams[t.upstream].outlier.standing(now) for t in self.targets]

    def _fits(self, target: Target, wait: float) -> bool:
        now = clock()
        remaining = self.exchange.budget.deadline.at - now - wait
        typical = self.state.ttft[target].typical(now) if self.streamed else None
        return fits(remaining, min_attempt_s=self.route.retry.min_attempt_s, typical_ttft=typical)

    def _skip(self, target: Target, reason: str) -> None:
        self.exchange.skipped.append((target.upstream, reason))
        attempt_log.info(
            "request_id=%s route=%s upstream=%s model=%s outcome=skipped reason=%s",
            self.exchange.request_id, self.route.model, target.upstream, target.model, reason,
        )  # fmt: skip

    def _hedge_delay(self, target: Target) -> float | None:
        hedge = self.route.hedge
        if hedge is None or not self.streamed:  # a whole answer has no first token to race
            return None
        if hedge.after_s is not None:
            return hedge.after_s
        assert hedge.after_percentile is not None  # the config sets exactly one
        return self.state.ttft[target].percentile(clock(), hedge.after_percentile)

    async def _hedged(self, first: Target, second: Target, delay: float) -> None:
        """Start `first`; if it has no token after `delay`, start `second` too. The first to
        produce a token delivers; the other is cancelled at once (its socket closed)."""
        exchange = self.exchange
        race = _Race()
        race.scopes = {first: anyio.CancelScope(), second: anyio.CancelScope()}
        failures: dict[Target, GatewayError] = {}

        async def run(target: Target) -> None:
            with race.scopes[target]:
                try:
                    await self._attempt(self.upstreams[target.upstream], target, race)
                except GatewayError as error:
                    failures[target] = error
            if target == first:
                race.settled.set()  # it ended: no hedge to start now

        async with anyio.create_task_group() as group:
            group.start_soon(run, first)
            with anyio.move_on_after(delay):
                await race.settled.wait()
            if race.winner is None and first not in failures:
                upstream = self.upstreams[second.upstream]
                now = clock()
                if not self._fits(second, 0.0):
                    self._skip(second, "budget")
                elif not self.state.retry_budget.try_spend(now):
                    self._skip(second, "retry_budget")
                elif (out := upstream.outlier.standing(now).out) is not None:
                    self._skip(second, "ejected" if out == "ejected" else "retry_after")
                else:
                    upstream.outlier.admit(now)  # claims the probe, if one is due
                    exchange.hedge = "fired"
                    self._tried.add((second, 1))
                    group.start_soon(run, second)
            else:
                exchange.hedge = "not_needed"
        winner = race.winner
        if winner is not None:
            if exchange.hedge == "fired":
                exchange.hedge = "won" if winner == second else "lost"
            if winner in failures:
                raise failures[winner]
            return
        raise failures.get(second) or failures[first]

    async def _attempt(self, upstream: Upstream, target: Target, race: _Race | None = None) -> None:
        exchange = self.exchange
        exchange.upstream = upstream.name
        exchange.phase = "queued"
        record = Attempt(upstream.name, target.model, queued_at=clock())
        exchange.attempt_log.append(record)
        try:
            await upstream.bulkhead.acquire(exchange.budget.deadline.at)
        except BaseException as error:
            record.outcome = error.code if isinstance(error, GatewayError) else "cancelled"
            record.cancel_reason = None if isinstance(error, GatewayError) else "queued"
            record.ended = clock()
            raise
        record.started = clock()
        try:
            exchange.queue_s += record.started - record.queued_at
            attempt_end = record.started + exchange.budget.attempt_s
            if attempt_end >= exchange.budget.deadline.at:  # the deadline comes first anyway
                await self._exchange_with(upstream, target, record, race)
            else:
                with anyio.CancelScope(deadline=attempt_end) as scope:
                    await self._exchange_with(upstream, target, record, race)
                if scope.cancelled_caught:
                    raise BudgetExceeded("attempt", "The attempt ran past the route's attempt_s.")
        except GatewayError as error:
            record.outcome = error.code
            upstream.report_failure(error, client_gap=exchange.budget.client_gap)
            attempt_log.info(
                "request_id=%s route=%s upstream=%s model=%s outcome=%s ms=%.1f",
                exchange.request_id, self.route.model, upstream.name, target.model, error.code,
                (clock() - record.started) * 1000,
            )  # fmt: skip
            raise
        except BaseException:  # cancelled: the caller left, its deadline passed, a hedge won
            record.outcome = "cancelled"
            record.cancel_reason = self._cancel_reason(target, race)
            upstream.outlier.neutral()
            raise
        else:
            if race is None or race.winner == target:
                record.outcome = "ok"
                upstream.report_success()
            else:  # lost a hedge: it says nothing of the upstream
                record.outcome, record.cancel_reason = "cancelled", "hedge_lost"
                upstream.outlier.neutral()
        finally:
            record.ended = clock()
            upstream.bulkhead.release()

    def _cancel_reason(self, target: Target, race: _Race | None) -> str:
        if self.exchange.disconnected:
            return "client_disconnect"
        if race is not None and race.winner not in (None, target):
            return "hedge_lost"
        return "deadline"

    async def _exchange_with(
        self, upstream: Upstream, target: Target, record: Attempt, race: _Race | None
    ) -> None:
        exchange = self.exchange
        budget = exchange.budget
        started = record.started
        attempt_end = min(started + budget.attempt_s, budget.deadline.at)
        translation = self.api.translation(upstream.config)
        response: aiohttp.ClientResponse | None = None
        try:
            exchange.phase = "connecting"
            if not self.streamed:  # a whole answer: the attempt and the deadline bound it
                await self._exchange_whole(upstream, translation, target, record, race)
                return
            headers = self._headers(upstream, translation, attempt_end - started - budget.margin_s)
            body = translation.request(self.body, self.payload, target.model, stream=True)
            rules = self.api.stream
            assert rules is not None  # streamed
            # The first token is due `ttft_s` after the attempt starts, whatever holds it up
            # (connect, headers, keep-alives, role-only chunks); no scope needed if the
            # deadline comes first.
            first_due = started + budget.ttft_s
            assembler = rules.assembler() if self.assemble else None
            with anyio.CancelScope(
                deadline=first_due if first_due < attempt_end else math.inf
            ) as first_scope:
                response = await self._send(upstream, translation, body, headers, started)
                events = ContentEvents(
                    response,
                    rules,
                    assembler=assembler,
                    translator=translation.events(self.include_usage),
                    limit=upstream.config.max_response_bytes,
                )
                first = await events.until_token()
            if first_scope.cancelled_caught:
                raise BudgetExceeded("ttft", f"No first token within ttft_s ({budget.ttft_s:g}s).")
            if first is None:
                if assembler is None:
                    raise UpstreamFailed(
                        "The upstream ended the stream before any token.",
                        code="upstream_protocol_error",
                    )
                # Some servers answer a prompt they refuse (one past the context length) with
                # an empty stream; asked plainly, they say why, and the caller hears it.
                assert response is not None  # the stream came from it
                upstream.close(response)
                response = None
                await self._exchange_whole(upstream, translation, target, record, race)
                return
            now = clock()
            record.ttft_s = now - started
            self.state.ttft[target].record(now, record.ttft_s)
            if race is not None and not race.claim(target):
                return  # the other attempt of a hedge had its token first
            exchange.upstream = upstream.name
            assert response is not None  # a first token came from it
            self._passed = passed_headers(response.headers)
            exchange.ttft_s = now - exchange.arrival
            exchange.last_content_at = now
            exchange.phase = "streaming"
            if assembler is None:
                await self._relay_stream(first, events, record)
            else:
                await self._relay_assembled(assembler, events, record, upstream)
        except UPSTREAM_ERRORS as exc:
            raise map_transport_error(exc) from exc
        finally:
            if response is not None:
                upstream.close(response)

    async def _exchange_whole(
        self,
        upstream: Upstream,
        translation: Translation,
        target: Target,
        record: Attempt,
        race: _Race | None,
    ) -> None:
        """Ask for the whole answer (no stream) and relay it."""
        budget = self.exchange.budget
        attempt_end = min(record.started + budget.attempt_s, budget.deadline.at)
        timeout_s = attempt_end - clock() - budget.margin_s
        headers = self._headers(upstream, translation, timeout_s, streamed=False)
        body = translation.request(self.body, self.payload, target.model, stream=False)
        response = await self._send(upstream, translation, body, headers, record.started)
        try:
            if race is not None and not race.claim(target):
                return  # the other attempt of a hedge had its token first
            self._passed = passed_headers(response.headers)
            await self._relay_whole(response, translation, upstream.config.max_response_bytes)
        finally:
            upstream.close(response)

    def _headers(
        self,
        upstream: Upstream,
        translation: Translation,
        timeout_s: float,
        *,
        streamed: bool = True,
    ) -> dict[str, str]:
        """An attempt's headers. Of the client's: the trace context, the protocol's own
        (`openai-beta`, `anthropic-version`) and what the upstream's `forward_headers` names;
        a client must not pick what is billed under the gateway's key."""
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if streamed else "application/json",
            "x-request-id": self.exchange.request_id,
            "x-request-timeout-ms": timeout_header_ms(timeout_s),
            **self.trace_headers,
            **{
                name: value
                for name in (*translation.forwarded, *upstream.config.forward_headers)
                if (value := self.client_headers.get(name)) is not None
            },
        }
        if upstream.config.kind == "anthropic":
            headers.setdefault("anthropic-version", upstream.config.anthropic_version)
        return headers

    async def _send(
        self,
        upstream: Upstream,
        translation: Translation,
        body: bytes,
        headers: dict[str, str],
        started: float,
    ) -> aiohttp.ClientResponse:
        """Send the attempt; its response once the headers are in, or its error status."""
        exchange = self.exchange
        response = await upstream.send(translation.path, body, headers)
        exchange.upstream_s = clock() - started
        exchange.phase = "waiting_first_token"
        if response.status >= 400:
            try:
                error_body = await read_limited(response)
            finally:
                upstream.close(response)
            raise translation.error(
                response.status,
                mask_secrets(error_body, upstream.config),
                response.headers,
                passed_headers(response.headers),
            )
        return response

    async def _relay_whole(
        self, response: aiohttp.ClientResponse, translation: Translation, limit: int
    ) -> None:
        """A whole answer (never hedged: there is no first token to race for)."""
        body = translation.whole(await read_whole(response, limit))
        answer = jsonbody.loads(body)  # garbage from upstream is a 502, not a 200 to choke on
        self.exchange.usage = self._usage(answer)
        self.exchange.ttft_s = clock() - self.exchange.arrival
        content_type = response.headers.get("content-type", "application/json")
        await self._answer_whole(content_type, body)

    def _usage(self, answer: object) -> dict[str, Any] | None:
        if self.api.stream is not None:
            return self.api.stream.usage(answer)
        usage = answer.get("usage") if isinstance(answer, dict) else None  # embeddings
        return usage if isinstance(usage, dict) else None

    async def _answer_whole(self, content_type: str, body: bytes) -> None:
        self.exchange.committed = self.exchange.finishing = True
        await self.writer.whole(200, self._success_headers(content_type), body)

    async def _relay_stream(
        self, first: list[Event], events: ContentEvents, record: Attempt
    ) -> None:
        """Commit on the first token, then pass each chunk's events on as one write; `idle_s`
        bounds every gap between content (keep-alives are passed on but do not count), kept
        by one lazily re-armed timer, not a scope per event."""
        exchange = self.exchange
        idle_s = exchange.budget.idle_s
        await self.writer.start(200, self._success_headers("text/event-stream"))
        exchange.committed = True
        batch: list[Event] | None = first
        with anyio.CancelScope() as idle_scope:
            watchdog = IdleWatchdog(idle_scope, idle_s)
            try:
                while batch is not None:
                    last = events.ended
                    exchange.finishing = last
                    raw = batch[0].raw if len(batch) == 1 else b"".join(e.raw for e in batch)
                    await self.writer.body(raw, more=not last)
                    if last:
                        exchange.usage = events.usage
                        return
                    if events.live:  # counted from here, so a slow client is not an idle upstream
                        exchange.last_content_at = watchdog.touch()
                    batch = await events.next_batch()
            finally:
                watchdog.stop()
                record.max_gap_s = watchdog.max_gap
        if watchdog.fired:
            raise BudgetExceeded("idle", f"No token for idle_s ({idle_s:g}s) mid-stream.")
        exchange.finishing = True
        await self.writer.body(b"", more=False)

    async def _relay_assembled(
        self, assembler: Assembly, events: ContentEvents, record: Attempt, upstream: Upstream
    ) -> None:
        """Read the rest of the stream under `idle_s` (nothing is sent yet, so a stall can
        still fall over), then answer with the non-streaming body it adds up to."""
        exchange = self.exchange
        idle_s = exchange.budget.idle_s
        with anyio.CancelScope() as idle_scope:
            watchdog = IdleWatchdog(idle_scope, idle_s)
            try:
                while not events.done and await events.next_batch() is not None:
                    if events.live:
                        exchange.last_content_at = watchdog.touch()
            finally:
                watchdog.stop()
                record.max_gap_s = watchdog.max_gap
        if watchdog.fired:
            raise BudgetExceeded("idle", f"No token for idle_s ({idle_s:g}s) mid-answer.")
        if not assembler.finished:
            raise UpstreamFailed(
                "The upstream's stream ended before the answer was complete.",
                code="upstream_protocol_error",
            )
        answer = assembler.result()
        exchange.usage = self._usage(answer)
        if "usage" not in answer:
            _warn_no_usage(upstream)
        await self._answer_whole("application/json", jsonbody.dumps(answer))

    async def _answer_failure(self, failure: GatewayError) -> None:
        self.exchange.finishing = True  # the last words: a disconnect after them is normal
        if self.exchange.committed:
            await self.writer.body(self.api.errors.event(failure), more=False)
        else:
            headers = {**self.headers, "server-timing": self.exchange.server_timing()}
            if self.exchange.upstream is not None:
                headers["x-gateway-upstream"] = self.exchange.upstream
                headers["x-gateway-attempts"] = str(self.exchange.attempts)
            await self.writer.error(failure, headers)

    def _success_headers(self, content_type: str) -> dict[str, str]:
        headers = {
            **self._passed,
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


class _Race:
    """Two attempts of a hedge racing to their first token: the first to claim wins and the
    other's scope is cancelled at once."""

    def __init__(self) -> None:
        self.scopes: dict[Target, anyio.CancelScope] = {}
        self.winner: Target | None = None
        self.settled = anyio.Event()  # a winner, or the first attempt ended without one

    def claim(self, target: Target) -> bool:
        if self.winner is None:
            self.winner = target
            for other, scope in self.scopes.items():
                if other != target:
                    scope.cancel()
            self.settled.set()
        return self.winner == target


def _warn_no_usage(upstream: Upstream) -> None:
    """Once per upstream: its streams carry no usage, so neither do the answers assembled."""
    if not upstream.usage_unreported:
        upstream.usage_unreported = True
        logging.getLogger("gateway").warning(
            "upstream=%s sends no usage in its streams (it ignores "
            "stream_options.include_usage): non-streaming answers assembled from them have no "
            "usage; set upstream_stream: false on its routes to get the upstream's own",
            upstream.name,
        )


def _retry_after(failure: GatewayError | None) -> float | None:
    """Seconds an upstream's error answer asked us to wait before calling it again."""
    if isinstance(failure, UpstreamStatus):
        return asked_retry_after(failure.passed, time.time())  # it keeps Retry-After(-ms)
    return None
