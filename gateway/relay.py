"""One request's upstream exchange: which attempts to make within the deadline (this module),
each attempt run (`gateway.attempt`), its answer delivered to the client (`gateway.delivery`).

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

import math
import random
import time
from collections.abc import Mapping, Sequence
from typing import Any

import anyio

from gateway.attempt import AttemptRunner, Race, attempt_log
from gateway.config import Route, Target
from gateway.deadline import clock
from gateway.delivery import Delivery
from gateway.errors import BudgetExceeded, GatewayError, Overloaded, UpstreamStatus
from gateway.inflight import Exchange
from gateway.protocols.api import Api
from gateway.resilience.attempts import backoff, fits
from gateway.resilience.attempts import retry_after as asked_retry_after
from gateway.resilience.outlier import Standing, passed_over
from gateway.responses import ResponseWriter
from gateway.routing import RouteState, failure_condition
from gateway.upstream import Upstream

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
        self.targets = targets  # the route's targets whose upstreams can serve `api`
        self.upstreams = upstreams
        self.delivery = Delivery(exchange=exchange, api=api, writer=writer, headers=headers)
        self.attempts = AttemptRunner(
            exchange=exchange,
            route=route,
            api=api,
            state=state,
            body=body,
            payload=payload,
            delivery=self.delivery,
            trace_headers=trace_headers,
            client_headers=client_headers,
        )
        self.streamed = self.attempts.streamed
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
                await self.delivery.failure(failure)
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
                        await self.attempts.run(upstream, target)
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
        race = Race()
        race.scopes = {first: anyio.CancelScope(), second: anyio.CancelScope()}
        failures: dict[Target, GatewayError] = {}

        async def run(target: Target) -> None:
            with race.scopes[target]:
                try:
                    await self.attempts.run(self.upstreams[target.upstream], target, race)
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


def _retry_after(failure: GatewayError | None) -> float | None:
    """Seconds an upstream's error answer asked us to wait before calling it again."""
    if isinstance(failure, UpstreamStatus):
        return asked_retry_after(failure.passed, time.time())  # it keeps Retry-After(-ms)
    return None
