"""What the client receives of one request: a whole answer, a stream relayed event by event
(committed on its first token, `idle_s` bounding every gap), an answer assembled from an
upstream stream, or the last words of a failure (a status before the commit, a terminal error
event after it). The attempt that produced the answer hands it over here; nothing here picks
an upstream or retries.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import aiohttp
import anyio

from gateway import jsonbody
from gateway.deadline import clock
from gateway.errors import BudgetExceeded, GatewayError, UpstreamFailed
from gateway.inflight import Attempt, Exchange
from gateway.observability.trace_context import finish_reasons
from gateway.protocols.api import Api, Assembly, Translation
from gateway.responses import ResponseWriter
from gateway.sse import Event
from gateway.upstream import Upstream
from gateway.upstream_reader import ContentEvents, IdleExpired, IdleWatchdog, read_whole


class Delivery:
    def __init__(
        self, *, exchange: Exchange, api: Api, writer: ResponseWriter, headers: Mapping[str, str]
    ) -> None:
        self.exchange = exchange
        self.api = api
        self.writer = writer
        self.headers = headers  # sent on every response: X-Request-Id
        self.passed: dict[str, str] = {}  # the answering upstream's rate-limit headers

    async def relay_whole(
        self, response: aiohttp.ClientResponse, translation: Translation, limit: int
    ) -> None:
        """A whole answer (never hedged: there is no first token to race for)."""
        body = translation.whole(await read_whole(response, limit))
        answer = jsonbody.loads(body)  # garbage from upstream is a 502, not a 200 to choke on
        self.exchange.usage = self.usage(answer)
        self.exchange.ttft_s = clock() - self.exchange.arrival
        content_type = response.headers.get("content-type", "application/json")
        await self.whole(content_type, body)

    def usage(self, answer: object) -> dict[str, Any] | None:
        if self.api.stream is not None:
            return self.api.stream.usage(answer)
        usage = answer.get("usage") if isinstance(answer, dict) else None  # embeddings
        return usage if isinstance(usage, dict) else None

    async def whole(self, content_type: str, body: bytes) -> None:
        if self.exchange.trace is not None:  # traced: the span says why the answer ended
            self.exchange.finish_reasons = finish_reasons(body)
        self.exchange.committed = self.exchange.finishing = True
        await self.writer.whole(200, self._success_headers(content_type), body)

    async def stream(self, first: list[Event], events: ContentEvents, record: Attempt) -> None:
        """Commit on the first token, then pass each chunk's events on as one write; `idle_s`
        bounds every gap between content (keep-alives are passed on but do not count), kept
        by one lazily re-armed timer, not a scope per event."""
        exchange = self.exchange
        idle_s = exchange.budget.idle_s
        await self.writer.start(200, self._success_headers("text/event-stream"))
        exchange.committed = True
        batch: list[Event] | None = first
        traced = exchange.trace is not None
        with _watched(events, idle_s, record) as watchdog:
            while batch is not None:
                last = events.ended
                exchange.finishing = last
                raw = batch[0].raw if len(batch) == 1 else b"".join(e.raw for e in batch)
                if traced and (reasons := finish_reasons(raw)):
                    exchange.finish_reasons = reasons
                exchange.chunks += len(batch)
                await self.writer.body(raw, more=not last)
                if last:
                    exchange.usage = events.usage
                    return
                if events.live:  # counted from here, so a slow client is not an idle upstream
                    exchange.last_content_at = watchdog.touch()
                batch = await events.next_batch()
        if watchdog.fired:
            raise BudgetExceeded("idle", f"No token for idle_s ({idle_s:g}s) mid-stream.")
        exchange.finishing = True
        await self.writer.body(b"", more=False)

    async def assembled(
        self, assembler: Assembly, events: ContentEvents, record: Attempt, upstream: Upstream
    ) -> None:
        """Read the rest of the stream under `idle_s` (nothing is sent yet, so a stall can
        still fall over), then answer with the non-streaming body it adds up to."""
        exchange = self.exchange
        idle_s = exchange.budget.idle_s
        with _watched(events, idle_s, record) as watchdog:
            while not events.done and await events.next_batch() is not None:
                if events.live:
                    exchange.last_content_at = watchdog.touch()
        if watchdog.fired:
            raise BudgetExceeded("idle", f"No token for idle_s ({idle_s:g}s) mid-answer.")
        if not assembler.finished:
            raise UpstreamFailed(
                "The upstream's stream ended before the answer was complete.",
                code="upstream_protocol_error",
            )
        answer = assembler.result()
        exchange.usage = self.usage(answer)
        if "usage" not in answer:
            _warn_no_usage(upstream)
        await self.whole("application/json", jsonbody.dumps(answer))

    async def failure(self, failure: GatewayError) -> None:
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
            **self.passed,
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


@contextmanager
def _watched(events: ContentEvents, idle_s: float, record: Attempt) -> Iterator[IdleWatchdog]:
    """The body reads `events` under `idle_s`: when the watchdog fires it wakes the read
    (IdleExpired) or cancels the body, which then ends quietly with `watchdog.fired` set; the
    stream's longest gap goes in `record`."""
    with anyio.CancelScope() as idle_scope:
        watchdog = IdleWatchdog(idle_scope, idle_s, events.interrupt)
        try:
            yield watchdog
        except IdleExpired:
            pass  # the watchdog woke the read: the caller sees `fired`
        finally:
            watchdog.stop()
            record.max_gap_s = watchdog.max_gap
