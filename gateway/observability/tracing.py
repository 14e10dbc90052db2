"""OpenTelemetry traces (`telemetry.traces`): the only module that imports OpenTelemetry, and
only when traces are configured (`pip install 'llm-gateway[otel]'`).

Nothing here runs while a request is served. Whether a request is sampled, its trace id and
each attempt's span id are chosen as it goes (gateway.observability.trace_context: the
`traceparent` sent upstream names the attempt's span); when it ends, its spans are built from
the `Exchange` with the times it recorded (the loop's clock, turned into epoch time once per
request) and handed to one exporting thread:

    SERVER  POST /v1/chat/completions        HTTP semantic conventions; the deadline's budget,
    │                                        its source and what was left at the end
    └─ chat {model}                          GenAI semantic conventions: operation, provider,
       │                                     request and response model, tokens, finish reasons
       ├─ CLIENT chat {target model}         one per attempt: server.address, number, kind
       └─ CLIENT chat {target model}         (first, retry, fallback, hedge), outcome; events
                                             queued, connected, first_token, idle_timeout

Spans are batched off the request path; those the queue cannot take, or the collector does
not accept, are dropped and counted (`llm_gateway_trace_spans_dropped_total`), never waited on.
"""

from __future__ import annotations

import collections
import importlib.metadata
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_ON
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState
from opentelemetry.trace.status import Status, StatusCode

from gateway.config import TracesConfig
from gateway.deadline import clock
from gateway.inflight import Attempt, Exchange
from gateway.observability import metrics
from gateway.observability.trace_context import RequestTrace, attempt_kinds, sampled_trace
from gateway.upstream import Upstream

log = logging.getLogger("gateway.tracing")

_OPERATIONS = {"embeddings": "embeddings", "completions": "text_completion"}  # else chat


class Tracing:
    def __init__(self, config: TracesConfig, exporter: SpanExporter | None = None) -> None:
        self.config = config
        self._ids = _ChosenIds()
        self._provider = TracerProvider(
            sampler=ALWAYS_ON,  # sampled or not was decided at admission (trace_context)
            resource=Resource.create({"service.name": "llm-gateway"}),  # OTEL_SERVICE_NAME wins
            id_generator=self._ids,
        )
        if exporter is None:
            endpoint = f"{config.endpoint}/v1/traces" if config.endpoint else None
            exporter = OTLPSpanExporter(endpoint=endpoint)  # None: OTEL_EXPORTER_OTLP_*
            logging.getLogger("opentelemetry").setLevel(logging.CRITICAL)  # counted instead
        self.processor = BatchExport(exporter)
        self._provider.add_span_processor(self.processor)
        self._tracer = self._provider.get_tracer("llm-gateway", _version())

    def sample(self, context: Mapping[str, str]) -> RequestTrace | None:
        """The request's trace if it is to be recorded (`context`: the caller's)."""
        return sampled_trace(context, self.config.sample_ratio)

    def refused(
        self, context: Mapping[str, str], *, path: str, status: int, code: str, arrival: float
    ) -> None:
        """A request answered before it had a route (401, 400, 404...): its SERVER span."""
        traced = self.sample(context)
        if traced is None:
            return
        to_ns = _epoch_ns()
        server = self._server_span(traced, path, to_ns(arrival))
        _end_server(server, status, code, to_ns(clock()))

    def record(
        self,
        exchange: Exchange,
        *,
        path: str,
        status: int,
        outcome: str,
        upstreams: Mapping[str, Upstream],
        payload: Mapping[str, Any],
    ) -> None:
        """Every span of a request that ended, from what its `Exchange` recorded."""
        traced = exchange.trace
        if traced is None:
            return
        to_ns = _epoch_ns()
        now = clock()
        budget = exchange.budget
        server = self._server_span(traced, path, to_ns(exchange.arrival))
        server.set_attributes(
            {
                "llm_gateway.request_id": exchange.request_id,
                "llm_gateway.deadline.budget_s": round(
                    budget.deadline.at - exchange.arrival + budget.margin_s, 3
                ),
                "llm_gateway.deadline.source": budget.deadline.source,
                "llm_gateway.deadline.remaining_s": round(budget.deadline.at - now, 3),
            }
        )
        operation = _OPERATIONS.get(path, "chat")
        parent = trace.set_span_in_context(server)
        chat = self._tracer.start_span(
            f"{operation} {exchange.route}",
            context=parent,
            kind=SpanKind.INTERNAL,
            start_time=to_ns(exchange.arrival),
            attributes=self._operation_attributes(exchange, operation, outcome, upstreams),
        )
        if self.config.capture_content:
            messages = payload.get("messages", payload.get("input"))
            if messages is not None:
                chat.set_attribute("gen_ai.input.messages", json.dumps(messages))
        within = trace.set_span_in_context(chat)
        kinds = attempt_kinds(exchange.attempt_log)
        for number, (attempt, kind) in enumerate(zip(exchange.attempt_log, kinds, strict=True), 1):
            self._attempt_span(attempt, number, kind, operation, within, exchange, upstreams, to_ns)
        if outcome != "ok":
            chat.set_status(Status(StatusCode.ERROR, outcome))
        chat.end(end_time=to_ns(now))
        _end_server(server, status, outcome, to_ns(now))

    def shutdown(self) -> None:
        self._provider.shutdown()

    def _server_span(self, traced: RequestTrace, path: str, start_ns: int) -> trace.Span:
        route = f"/v1/{path}"
        if traced.parent_span_id is None:  # a trace we start keeps the id sent upstream
            self._ids.trace_id = int(traced.trace_id, 16)
        return self._tracer.start_span(
            f"POST {route}",
            context=_caller(traced),
            kind=SpanKind.SERVER,
            start_time=start_ns,
            attributes={
                "http.request.method": "POST",
                "http.route": route,
                "url.path": route,
                "url.scheme": "http",
            },
        )

    def _operation_attributes(
        self, exchange: Exchange, operation: str, outcome: str, upstreams: Mapping[str, Upstream]
    ) -> dict[str, Any]:
        answered = next((a for a in reversed(exchange.attempt_log) if a.outcome == "ok"), None)
        chosen = answered or (exchange.attempt_log[-1] if exchange.attempt_log else None)
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": exchange.route,
            "llm_gateway.attempts": exchange.attempts,
        }
        if chosen is not None and chosen.upstream in upstreams:
            attributes["gen_ai.provider.name"] = upstreams[chosen.upstream].config.kind
        if answered is not None:
            attributes["gen_ai.response.model"] = answered.model
        usage = exchange.usage or {}
        for ours, theirs in (("input", "prompt"), ("output", "completion")):
            if isinstance(count := usage.get(f"{theirs}_tokens"), int):
                attributes[f"gen_ai.usage.{ours}_tokens"] = count
        if exchange.finish_reasons:
            attributes["gen_ai.response.finish_reasons"] = exchange.finish_reasons
        if exchange.hedge is not None:
            attributes["llm_gateway.hedge"] = exchange.hedge
        if outcome != "ok":
            attributes["error.type"] = outcome
        return attributes

    def _attempt_span(
        self,
        attempt: Attempt,
        number: int,
        kind: str,
        operation: str,
        parent: Context,
        exchange: Exchange,
        upstreams: Mapping[str, Upstream],
        to_ns: Callable[[float], int],
    ) -> None:
        attributes: dict[str, Any] = {
            "gen_ai.operation.name": operation,
            "gen_ai.request.model": attempt.model,
            "llm_gateway.upstream": attempt.upstream,
            "llm_gateway.attempt.number": number,
            "llm_gateway.attempt.kind": kind,
            "llm_gateway.attempt.outcome": attempt.outcome,
        }
        upstream = upstreams.get(attempt.upstream)
        if upstream is not None:
            attributes["gen_ai.provider.name"] = upstream.config.kind
            url = urlsplit(upstream.config.base_url)
            attributes["server.address"] = url.hostname or ""
            attributes["server.port"] = url.port or (443 if url.scheme == "https" else 80)
        if attempt.cancel_reason is not None:
            attributes["llm_gateway.attempt.cancel_reason"] = attempt.cancel_reason
        if attempt.outcome != "ok":
            attributes["error.type"] = attempt.outcome
        if attempt.span_id is not None:
            self._ids.span_id = int(attempt.span_id, 16)  # the id its traceparent named
        span = self._tracer.start_span(
            f"{operation} {attempt.model}",
            context=parent,
            kind=SpanKind.CLIENT,
            start_time=to_ns(attempt.queued_at),
            attributes=attributes,
        )
        span.add_event("queued", timestamp=to_ns(attempt.queued_at))
        if attempt.started:
            wait = round(attempt.started - attempt.queued_at, 6)
            span.set_attribute("llm_gateway.queue_wait_s", wait)
        if attempt.connected_at:
            span.add_event(
                "connected",
                {"llm_gateway.headers_s": round(attempt.connected_at - attempt.started, 6)},
                timestamp=to_ns(attempt.connected_at),
            )
        if attempt.ttft_s is not None:
            span.add_event(
                "first_token",
                {"gen_ai.server.time_to_first_token": round(attempt.ttft_s, 6)},
                timestamp=to_ns(attempt.started + attempt.ttft_s),
            )
        if attempt.outcome == "upstream_idle_timeout":
            span.add_event(
                "idle_timeout",
                {
                    "llm_gateway.gap_s": round(attempt.max_gap_s or exchange.budget.idle_s, 6),
                    "llm_gateway.idle_s": exchange.budget.idle_s,
                },
                timestamp=to_ns(attempt.ended),
            )
        if attempt.outcome != "ok":
            span.set_status(Status(StatusCode.ERROR, attempt.outcome))
        span.end(end_time=to_ns(attempt.ended or clock()))


class BatchExport(SpanProcessor):
    """Ended spans wait in a bounded queue; one thread exports them in batches every
    `delay_s` (sooner when a batch is full). A span the queue cannot take, or a batch the
    exporter fails to deliver, is dropped and counted: a request never waits on a collector."""

    def __init__(
        self,
        exporter: SpanExporter,
        *,
        max_queue: int = 2048,
        batch: int = 512,
        delay_s: float = 1.0,
    ) -> None:
        self.exporter = exporter
        self._max_queue, self._batch, self._delay_s = max_queue, batch, delay_s
        self._queue: collections.deque[ReadableSpan] = collections.deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()  # one export at a time: the thread's or a flush
        self._stopping = False
        self._failing = False
        self._thread = threading.Thread(target=self._work, name="llm-gateway-spans", daemon=True)
        self._thread.start()

    def on_start(self, span: Any, parent_context: Context | None = None) -> None:
        pass

    def on_end(self, span: ReadableSpan) -> None:
        if len(self._queue) >= self._max_queue:
            metrics.count_spans_dropped("queue_full", 1)
            return
        self._queue.append(span)
        if len(self._queue) >= self._batch:
            self._wake.set()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        self._export_all()
        return True

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=5)
        self.exporter.shutdown()

    def _work(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay_s)
            self._wake.clear()
            self._export_all()
        self._export_all()

    def _export_all(self) -> None:
        with self._lock:
            while self._queue:
                count = min(self._batch, len(self._queue))
                self._export([self._queue.popleft() for _ in range(count)])

    def _export(self, batch: Sequence[ReadableSpan]) -> None:
        try:
            ok = self.exporter.export(batch) == SpanExportResult.SUCCESS
        except Exception:  # an exporter's bug must not end the thread
            ok = False
        if not ok:
            metrics.count_spans_dropped("export_failed", len(batch))
        if ok == self._failing:  # said once when it starts failing, once when it is back
            self._failing = not ok
            if ok:
                log.info("trace export works again")
            else:
                log.warning("trace export failed: spans are dropped (and counted) until it works")


class _ChosenIds(IdGenerator):
    """Span and trace ids chosen before the span is built (the attempt's, sent upstream in
    its traceparent; a trace the gateway started), else random. Spans are built on the
    event loop's thread, one at a time, so a chosen id is taken by the next span only."""

    def __init__(self) -> None:
        self._random = RandomIdGenerator()
        self.span_id: int | None = None
        self.trace_id: int | None = None

    def generate_span_id(self) -> int:
        chosen, self.span_id = self.span_id, None
        return chosen or self._random.generate_span_id()

    def generate_trace_id(self) -> int:
        chosen, self.trace_id = self.trace_id, None
        return chosen or self._random.generate_trace_id()


def _caller(traced: RequestTrace) -> Context | None:
    """The caller's span as the parent (None for a trace the gateway started)."""
    if traced.parent_span_id is None:
        return None
    state = TraceState.from_header([traced.tracestate]) if traced.tracestate else None
    parent = SpanContext(
        trace_id=int(traced.trace_id, 16),
        span_id=int(traced.parent_span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=state,
    )
    return trace.set_span_in_context(NonRecordingSpan(parent))


def _end_server(server: trace.Span, status: int, outcome: str, end_ns: int) -> None:
    server.set_attribute("http.response.status_code", status)
    if outcome != "ok":
        server.set_attribute("llm_gateway.outcome", outcome)
    if status >= 500:  # a 4xx is the caller's: not an error of this server (HTTP semconv)
        server.set_attribute("error.type", str(status))
        server.set_status(Status(StatusCode.ERROR))
    server.end(end_time=end_ns)


def _epoch_ns() -> Callable[[float], int]:
    """The loop's clock to epoch nanoseconds, by one reading of both clocks."""
    offset = time.time_ns() - int(clock() * 1e9)

    def to_ns(loop_time: float) -> int:
        return int(loop_time * 1e9) + offset

    return to_ns


def _version() -> str:
    try:
        return importlib.metadata.version("llm-gateway")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
