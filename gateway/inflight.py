"""The record of one request in flight, and the registry `/debug/inflight` lists."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio

from gateway.deadline import RequestBudget, clock
from gateway.observability.trace_context import RequestTrace
from gateway.tenants.buckets import Charge

Phase = Literal["queued", "connecting", "waiting_first_token", "streaming", "done"]


@dataclass(eq=False, slots=True)
class Attempt:
    """One attempt of a request, for the metrics and logs written when the request ends."""

    upstream: str
    model: str
    queued_at: float
    started: float = 0.0  # got its slot
    outcome: str = ""  # "ok", an error code, or "cancelled"
    cancel_reason: str | None = None  # client_disconnect, deadline or hedge_lost
    ended: float = 0.0
    ttft_s: float | None = None  # from the slot to the first token
    max_gap_s: float | None = None  # streams: the longest gap between content events
    connected_at: float = 0.0  # the upstream's response headers arrived
    span_id: str | None = None  # traced: its span, named in the traceparent sent upstream


@dataclass(eq=False, kw_only=True)
class Exchange:
    """What one request has done so far; the relay moves it along, the proxy reads it."""

    request_id: str
    route: str
    stream: bool
    arrival: float
    budget: RequestBudget
    phase: Phase = "queued"
    upstream: str | None = None
    committed: bool = False  # response headers went to the client: no more fallback
    finishing: bool = False  # the last message is being sent: a disconnect now is normal
    disconnected: bool = False
    shutting_down: bool = False
    queue_s: float = 0.0
    upstream_s: float | None = None  # request sent until upstream response headers
    ttft_s: float | None = None  # arrival until the first content event
    last_content_at: float | None = None
    attempt_log: list[Attempt] = field(default_factory=list)
    backoff_s: float = 0.0  # slept between attempts
    usage: dict[str, Any] | None = None  # the upstream's token counts, when it reported them
    trace_id: str | None = None  # from the client's W3C traceparent (or a trace we started)
    trace: RequestTrace | None = None  # traced and sampled (gateway.observability.tracing)
    finish_reasons: list[str] | None = None  # traced: why the answer ended
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (upstream, reason)
    hedge: str | None = None  # not_needed, fired, won or lost
    panic_routed: bool = False  # sent to an ejected target because every target was out
    picks: list[tuple[str, str]] = field(default_factory=list)  # (upstream, reason) balanced
    key: str | None = None  # the API key's configured name (its tenant), when auth is on
    priority: str = "normal"  # the key's class in every upstream's queue
    chunks: int = 0  # content events relayed: what a stream cut short is charged for
    charge: Charge | None = None  # what the key was charged, once settled (gateway.tenants)
    # The cancel scope the request is running in, if any: a disconnect cancels it.
    scope: anyio.CancelScope | None = None

    @property
    def attempts(self) -> int:
        """Attempts made (`X-Gateway-Attempts`)."""
        return len(self.attempt_log)

    def abandon(self) -> None:
        """The client went away: stop whatever the request is doing."""
        self.disconnected = True
        if self.scope is not None:
            self.scope.cancel()

    def shut_down(self) -> None:
        """The gateway is stopping: end the request with `shutting_down`."""
        self.shutting_down = True
        if self.scope is not None:
            self.scope.cancel()

    def server_timing(self) -> str:
        parts = [f"queue;dur={self.queue_s * 1000:.1f}"]
        if self.upstream_s is not None:
            parts.append(f"upstream;dur={self.upstream_s * 1000:.1f}")
        if self.ttft_s is not None:
            parts.append(f"ttft;dur={self.ttft_s * 1000:.1f}")
        parts.append(f"total;dur={(clock() - self.arrival) * 1000:.1f}")
        return ", ".join(parts)

    def snapshot(self, now: float) -> dict[str, Any]:
        since = self.last_content_at if self.last_content_at is not None else self.arrival
        return {
            "id": self.request_id,
            "key": self.key,
            "route": self.route,
            "upstream": self.upstream,
            "phase": self.phase,
            "stream": self.stream,
            "attempts": self.attempts,
            "age_s": round(now - self.arrival, 3),
            "since_content_s": round(now - since, 3),
            "remaining_s": round(self.budget.deadline.at - now, 3),
        }


class Inflight:
    def __init__(self) -> None:
        self._exchanges: set[Exchange] = set()
        self.ended = 0  # requests that have ended since start-up (a drain counts them)
        self._emptied: anyio.Event | None = None  # set when the last request ends

    def __len__(self) -> int:
        return len(self._exchanges)

    @contextmanager
    def track(self, exchange: Exchange) -> Iterator[Exchange]:
        self._exchanges.add(exchange)
        try:
            yield exchange
        finally:
            self._exchanges.discard(exchange)
            self.ended += 1
            if not self._exchanges and self._emptied is not None:
                self._emptied.set()

    async def wait_empty(self) -> None:
        while self._exchanges:
            self._emptied = anyio.Event()
            await self._emptied.wait()

    def exchanges(self) -> list[Exchange]:
        return list(self._exchanges)

    def snapshot(self) -> list[dict[str, Any]]:
        now = clock()
        return sorted(
            (exchange.snapshot(now) for exchange in self._exchanges),
            key=lambda row: -float(row["age_s"]),
        )


def new_request_id() -> str:
    return uuid.uuid4().hex
