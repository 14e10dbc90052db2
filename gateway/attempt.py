"""One attempt on one upstream: its place in the upstream's queue, its `attempt_s` scope, the
request sent in the endpoint's translation for that upstream, the first token awaited under
`ttft_s`, then the answer handed to the `Delivery`. What the attempt says of the upstream (it
works, it is broken, it is busy) is reported to the upstream's outlier detector.

Every upstream response is closed in `finally`; the queue slot is released in `finally`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import aiohttp
import anyio

from gateway.config import Route, Target
from gateway.deadline import clock, timeout_header_ms
from gateway.delivery import Delivery
from gateway.errors import BudgetExceeded, GatewayError, UpstreamFailed
from gateway.inflight import Attempt, Exchange
from gateway.observability.trace_context import new_span_id
from gateway.protocols.api import Api, Translation
from gateway.routing import RouteState
from gateway.upstream import (
    UPSTREAM_ERRORS,
    Upstream,
    map_transport_error,
    mask_secrets,
    passed_headers,
)
from gateway.upstream_reader import ContentEvents, read_limited

attempt_log = logging.getLogger("gateway.attempt")  # one line per failed or skipped attempt


class Race:
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


class AttemptRunner:
    """Runs the attempts of one request; the `Relay` decides which to make."""

    def __init__(
        self,
        *,
        exchange: Exchange,
        route: Route,
        api: Api,
        state: RouteState,
        body: bytes,
        payload: dict[str, Any],
        delivery: Delivery,
        trace_headers: Mapping[str, str],
        client_headers: Mapping[str, str],
    ) -> None:
        self.exchange = exchange
        self.route = route
        self.api = api
        self.state = state
        self.body = body  # as the client sent it: forwarded with only `model` swapped
        self.payload = payload
        self.delivery = delivery
        self.trace_headers = trace_headers  # the client's W3C trace context, for the upstream
        self.client_headers = client_headers  # forwarded: only what an allowlist names
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

    async def run(
        self,
        upstream: Upstream,
        target: Target,
        race: Race | None = None,
        *,
        queued_at: float | None = None,
    ) -> None:
        """One attempt; given `queued_at`, its slot is already held (the relay waited for the
        first free one of a pool since then)."""
        exchange = self.exchange
        exchange.upstream = upstream.name
        exchange.phase = "queued"
        record = Attempt(
            upstream.name, target.model, queued_at=clock() if queued_at is None else queued_at
        )
        if exchange.trace is not None:  # traced: the span this attempt's traceparent names
            record.span_id = new_span_id()
        exchange.attempt_log.append(record)
        try:
            if queued_at is None:
                await upstream.bulkhead.acquire(
                    exchange.budget.deadline.at, key=exchange.key or "", priority=exchange.priority
                )
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

    def _cancel_reason(self, target: Target, race: Race | None) -> str:
        if self.exchange.disconnected:
            return "client_disconnect"
        if race is not None and race.winner not in (None, target):
            return "hedge_lost"
        return "deadline"

    async def _exchange_with(
        self, upstream: Upstream, target: Target, record: Attempt, race: Race | None
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
            headers = self._headers(
                upstream, translation, attempt_end - started - budget.margin_s, record.span_id
            )
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
                response = await self._send(upstream, translation, body, headers, record)
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
            self.delivery.passed = passed_headers(response.headers)
            exchange.ttft_s = now - exchange.arrival
            exchange.last_content_at = now
            exchange.phase = "streaming"
            if assembler is None:
                await self.delivery.stream(first, events, record)
            else:
                await self.delivery.assembled(assembler, events, record, upstream)
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
        race: Race | None,
    ) -> None:
        """Ask for the whole answer (no stream) and relay it."""
        budget = self.exchange.budget
        attempt_end = min(record.started + budget.attempt_s, budget.deadline.at)
        timeout_s = attempt_end - clock() - budget.margin_s
        headers = self._headers(upstream, translation, timeout_s, record.span_id, streamed=False)
        body = translation.request(self.body, self.payload, target.model, stream=False)
        response = await self._send(upstream, translation, body, headers, record)
        try:
            if race is not None and not race.claim(target):
                return  # the other attempt of a hedge had its token first
            self.delivery.passed = passed_headers(response.headers)
            await self.delivery.relay_whole(
                response, translation, upstream.config.max_response_bytes
            )
        finally:
            upstream.close(response)

    def _headers(
        self,
        upstream: Upstream,
        translation: Translation,
        timeout_s: float,
        span_id: str | None,
        *,
        streamed: bool = True,
    ) -> dict[str, str]:
        """An attempt's headers. Of the client's: the trace context (traced: naming the
        attempt's own span instead), the protocol's own (`openai-beta`, `anthropic-version`)
        and what the upstream's `forward_headers` names; a client must not pick what is billed
        under the gateway's key."""
        trace = self.exchange.trace
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream" if streamed else "application/json",
            "x-request-id": self.exchange.request_id,
            "x-request-timeout-ms": timeout_header_ms(timeout_s),
            **(self.trace_headers if trace is None or span_id is None else trace.headers(span_id)),
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
        record: Attempt,
    ) -> aiohttp.ClientResponse:
        """Send the attempt; its response once the headers are in, or its error status."""
        exchange = self.exchange
        response = await upstream.send(translation.path, body, headers)
        record.connected_at = clock()
        exchange.upstream_s = record.connected_at - record.started
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
