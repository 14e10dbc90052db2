"""One request's upstream exchange: which attempts to make within the deadline (this module),
each attempt run (`gateway.attempt`), its answer delivered to the client (`gateway.delivery`).

    with deadline scope:                       the whole request: total_s and client hints
        for each (target, try):                retry/fallback only before the commit, and only
            which target? the balancer's       a member of the first pool that can take it
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
from dataclasses import replace
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
from gateway.resilience.balance import Member, Pick, affinity_key, choose, ranked
from gateway.resilience.outlier import Standing, passed_over
from gateway.responses import ResponseWriter
from gateway.routing import RouteState, failure_condition
from gateway.upstream import Bulkhead, Upstream

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
        self._ranked = ranked(targets, state.priority)  # (target, its pool's rank)
        self._tries: dict[Target, int] = {}  # attempts made on each target, hedges included
        self._passed: set[Target] = set()  # not to be tried again by this request
        self._key = affinity_key(payload, route.affinity) if route.balance == "affinity" else None

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
        """The balancer names each next target (`choose`: a member of the first pool that can
        take the request, not the one just tried while another is left); the policy may pass
        it over; else it runs, maybe hedged. A failure worth another try goes round again."""
        exchange, route, state = self.exchange, self.route, self.state
        deadline = exchange.budget.deadline
        last: GatewayError | None = None
        previous: Target | None = None  # the target of the attempt just made
        ejected: list[float] = []  # seconds until each ejected target's probe
        state.retry_budget.record_request(clock())
        while True:
            if last is not None and failure_condition(last) not in route.retry.retry_on:
                raise last
            pick = self._next(previous)
            if pick is None:
                break
            target = pick.target
            upstream = self.upstreams[target.upstream]
            number = self._tries[target] = self._tries.get(target, 0) + 1
            now = clock()
            wait = 0.0
            if number > 1:  # a retry on the same target: backed off, budgeted
                wait = backoff(route.retry.backoff_s, number - 1, _RNG)
                asked = _retry_after(last) if target == previous else None
                if asked is not None:
                    if asked >= deadline.remaining():
                        self._pass(target, "retry_after")
                        continue
                    wait = max(wait, asked)
                if not state.retry_budget.try_spend(now):
                    self._pass(target, "retry_budget")
                    continue
            if not self._fits(target, wait):
                self._pass(target, "budget")
                continue
            standing = upstream.outlier.standing(now)
            if standing.out is None:
                upstream.outlier.admit(now)  # claims the probe, if one is due
            elif passed_over(0, self._standings(target, now), panic=route.outlier_mode == "panic"):
                self._pass(target, "ejected" if standing.out == "ejected" else "retry_after")
                if standing.out == "ejected":
                    ejected.append(upstream.outlier.retry_after(now))
                continue
            elif standing.out == "ejected":
                exchange.panic_routed = True  # every target is out: this one comes back first
            if wait:
                exchange.backoff_s += wait
                await anyio.sleep(wait)
            previous = target
            queued_at: float | None = None
            try:
                if len(pick.line) > 1:  # the whole pool is full: the first slot to free
                    target, queued_at = await self._queue(pick.line, target)
                    previous, upstream = target, self.upstreams[target.upstream]
                # A request that waited for a full pool is not hedged: a hedge would wait too.
                delay = self._hedge_delay(target) if number == 1 and queued_at is None else None
                if delay is not None and self._left(besides=target):
                    await self._hedged(target, delay)
                else:
                    await self.attempts.run(upstream, target, queued_at=queued_at)
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

    def _left(self, *, besides: Target | None = None) -> list[tuple[Target, int]]:
        """The targets this request may still try, in priority order, with their pool's rank."""
        attempts = self.route.retry.attempts
        return [
            (target, rank)
            for target, rank in self._ranked
            if target not in self._passed
            and self._tries.get(target, 0) < attempts
            and target != besides
        ]

    def _next(self, previous: Target | None, *, besides: Target | None = None) -> Pick | None:
        """The target of the next attempt (or of a hedge on `besides`), as the route's
        balance chooses; a balanced choice is counted (`exchange.picks`)."""
        left = self._left(besides=besides)
        if self.route.balance is None or not left:
            return Pick(left[0][0], None) if left else None  # in order: each a fallback
        now = clock()
        members = [self._member(target, rank, now) for target, rank in left]
        pick = choose(
            members,
            balance=self.route.balance,
            previous=previous,
            key=self._key,
            rng=_RNG,
            rotation=self.state.rotation,
        )
        if pick is None:
            return None
        if pick.reason is not None:
            self.exchange.picks.append((pick.target.upstream, pick.reason))
        if any(type(self.upstreams[t.upstream].bulkhead) is not Bulkhead for t in pick.line):
            pick = replace(pick, line=())  # a shared cap's line is its own: wait in the pick's
        return pick

    async def _queue(self, line: Sequence[Target], picked: Target) -> tuple[Target, float]:
        """Every candidate is full: wait in all their lines at once; the attempt goes to the
        first to free a slot (which it then holds), and counts as a try there."""
        exchange = self.exchange
        exchange.phase = "queued"
        exchange.upstream = None
        queued_at = clock()
        members = {self.upstreams[t.upstream].bulkhead: t for t in line}
        served = members[
            await Bulkhead.first_free(
                list(members),
                exchange.budget.deadline.at,
                key=exchange.key or "",
                priority=exchange.priority,
            )
        ]
        if served != picked:
            self._tries[picked] -= 1
            self._tries[served] = self._tries.get(served, 0) + 1
        return served, queued_at

    def _member(self, target: Target, rank: int, now: float) -> Member:
        upstream = self.upstreams[target.upstream]
        bulkhead = upstream.bulkhead
        typical = self.state.ttft[target].typical(now) if self.streamed else None
        remaining = self.exchange.budget.deadline.at - now
        min_attempt_s = self.route.retry.min_attempt_s
        return Member(
            target=target,
            rank=rank,
            tries=self._tries.get(target, 0),
            out=upstream.outlier.standing(now).out is not None,
            fits=fits(remaining, min_attempt_s=min_attempt_s, typical_ttft=typical),
            busy=bulkhead.busy,
            queued=bulkhead.pending,
            capacity=bulkhead.limit,
            ttft=typical,
        )

    def _standings(self, target: Target, now: float) -> list[Standing]:
        """`target`'s standing, then those of every other target the request may still use:
        what `passed_over` weighs."""
        others = [other for other, _ in self._left(besides=target)]
        return [self.upstreams[t.upstream].outlier.standing(now) for t in (target, *others)]

    def _fits(self, target: Target, wait: float) -> bool:
        now = clock()
        remaining = self.exchange.budget.deadline.at - now - wait
        typical = self.state.ttft[target].typical(now) if self.streamed else None
        return fits(remaining, min_attempt_s=self.route.retry.min_attempt_s, typical_ttft=typical)

    def _pass(self, target: Target, reason: str) -> None:
        """Pass `target` over for the rest of this request, and say why."""
        self._passed.add(target)
        self._skip(target, reason)

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

    async def _hedged(self, first: Target, delay: float) -> None:
        """Start `first`; if it has no token after `delay`, start another target too (another
        member of its pool when there is one). The first to produce a token delivers; the
        other is cancelled at once (its socket closed)."""
        exchange = self.exchange
        race = Race()
        race.scopes = {first: anyio.CancelScope()}
        failures: dict[Target, GatewayError] = {}
        second: Target | None = None

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
                hedge = self._next(first, besides=first)
                second = None if hedge is None else hedge.target
                now = clock()
                if second is None:
                    exchange.hedge = "not_needed"
                elif not self._fits(second, 0.0):
                    self._skip(second, "budget")
                elif not self.state.retry_budget.try_spend(now):
                    self._skip(second, "retry_budget")
                elif (out := self.upstreams[second.upstream].outlier.standing(now).out) is not None:
                    self._skip(second, "ejected" if out == "ejected" else "retry_after")
                else:
                    self.upstreams[second.upstream].outlier.admit(now)  # claims a due probe
                    exchange.hedge = "fired"
                    self._tries[second] = self._tries.get(second, 0) + 1
                    race.scopes[second] = anyio.CancelScope()
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
        if second is not None and second in failures:
            raise failures[second]
        raise failures[first]


def _retry_after(failure: GatewayError | None) -> float | None:
    """Seconds an upstream's error answer asked us to wait before calling it again."""
    if isinstance(failure, UpstreamStatus):
        return asked_retry_after(failure.passed, time.time())  # it keeps Retry-After(-ms)
    return None
