"""OpenTelemetry traces: every case read back from the SDK's in-memory exporter, and once end
to end through OTLP/HTTP to a receiver on loopback that decodes the protobuf."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from gateway.app import GatewayApp, create_app
from gateway.config import parse_config
from gateway.observability import metrics
from gateway.observability.tracing import Tracing
from tests.conftest import CHAT, LiveServer, Simulator

CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"


class Traced:
    """A gateway with traces on, its spans kept in memory."""

    def __init__(self, simulator: Simulator, routes: list[dict[str, Any]], **traces: Any) -> None:
        data = {
            "upstreams": [{"name": "sim", "base_url": simulator.base_url}],
            "routes": routes,
            "telemetry": {"traces": {"endpoint": "http://127.0.0.1:9", **traces}},
        }
        self.app: GatewayApp = create_app(parse_config(data, env={}))
        tracing = self.app.runtime.tracing
        assert tracing is not None
        self.tracing: Tracing = tracing
        self.memory = InMemorySpanExporter()
        tracing.processor.exporter = self.memory
        self.server = LiveServer(self.app)

    def spans(self, count: int, within_s: float = 5.0) -> list[ReadableSpan]:
        """The spans once `count` have ended (a request's spans end after its last byte)."""
        deadline = time.monotonic() + within_s
        while True:
            self.tracing.processor.force_flush()
            spans = list(self.memory.get_finished_spans())
            if len(spans) >= count or time.monotonic() > deadline:
                return spans
            time.sleep(0.02)

    def post(self, model: str, *, stream: bool = False, **headers: str) -> httpx.Response:
        body = {"model": model, "messages": CHAT, "stream": stream}
        if stream:
            body["stream_options"] = {"include_usage": True}
        return httpx.post(
            f"{self.server.url}/v1/chat/completions", json=body, headers=headers, timeout=15
        )


@pytest.fixture
def traced(simulator: Simulator) -> Iterator[Any]:
    started: list[Traced] = []

    def start(routes: list[dict[str, Any]], **traces: Any) -> Traced:
        gateway = Traced(simulator, routes, **traces)
        gateway.server.__enter__()
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.server.__exit__(None, None, None)


def route(*models: str, **extra: Any) -> dict[str, Any]:
    return {"model": "m", "targets": [{"upstream": "sim", "model": m} for m in models], **extra}


def tree(spans: list[ReadableSpan]) -> tuple[ReadableSpan, ReadableSpan, list[ReadableSpan]]:
    """(SERVER span, the chat span under it, the attempt spans under that, in order)."""
    (server,) = [s for s in spans if s.kind == SpanKind.SERVER]
    (chat,) = [s for s in spans if s.parent and s.parent.span_id == server.context.span_id]
    attempts = [s for s in spans if s.parent and s.parent.span_id == chat.context.span_id]
    attempts.sort(key=lambda s: int((s.attributes or {})["llm_gateway.attempt.number"]))  # type: ignore[arg-type]
    assert all(s.kind == SpanKind.CLIENT for s in attempts)
    assert len(spans) == 2 + len(attempts)
    return server, chat, attempts


def events(span: ReadableSpan) -> list[str]:
    return [event.name for event in span.events]


def test_a_stream_continues_the_callers_trace(traced: Any, simulator: Simulator) -> None:
    gateway = traced([route("sim@tokens=3")])
    answer = gateway.post("m", stream=True, traceparent=f"00-{CALLER_TRACE}-{CALLER_SPAN}-01")
    assert answer.status_code == 200
    server, chat, (attempt,) = tree(gateway.spans(3))
    assert server.name == "POST /v1/chat/completions"
    assert server.context.trace_id == int(CALLER_TRACE, 16)
    assert server.parent is not None
    assert server.parent.span_id == int(CALLER_SPAN, 16)
    assert server.attributes is not None
    assert server.attributes["http.route"] == "/v1/chat/completions"
    assert server.attributes["http.response.status_code"] == 200
    assert server.attributes["llm_gateway.deadline.source"] == "route"
    assert server.attributes["llm_gateway.deadline.budget_s"] == 120
    assert 119 < float(server.attributes["llm_gateway.deadline.remaining_s"]) < 120  # type: ignore[arg-type]
    assert chat.name == "chat m"
    assert chat.attributes == {
        "gen_ai.operation.name": "chat",
        "gen_ai.request.model": "m",
        "gen_ai.provider.name": "openai",
        "gen_ai.response.model": "sim@tokens=3",
        "gen_ai.usage.input_tokens": chat.attributes["gen_ai.usage.input_tokens"],  # type: ignore[index]
        "gen_ai.usage.output_tokens": 3,
        "gen_ai.response.finish_reasons": ("stop",),
        "llm_gateway.attempts": 1,
    }
    assert attempt.attributes is not None
    assert attempt.attributes["llm_gateway.attempt.kind"] == "first"
    assert attempt.attributes["llm_gateway.attempt.outcome"] == "ok"
    assert attempt.attributes["server.address"] == "127.0.0.1"
    assert attempt.attributes["server.port"] == simulator.port
    assert events(attempt) == ["queued", "connected", "first_token"]
    assert attempt.status.status_code == StatusCode.UNSET
    # The upstream was told the attempt's span is its parent.
    sent = simulator.stats()["last_headers"]["traceparent"]
    assert sent == f"00-{CALLER_TRACE}-{attempt.context.span_id:016x}-01"
    # Times nest: the attempt within the chat span within the server span.
    assert server.start_time <= chat.start_time <= attempt.start_time  # type: ignore[operator]
    assert attempt.end_time <= chat.end_time <= server.end_time  # type: ignore[operator]
    assert abs(server.start_time - time.time_ns()) < 10e9  # type: ignore[operator]


def test_a_trace_the_gateway_starts_is_the_one_sent_upstream(
    traced: Any, simulator: Simulator
) -> None:
    gateway = traced([route("sim")])
    assert gateway.post("m").status_code == 200
    server, _, (attempt,) = tree(gateway.spans(3))
    assert server.parent is None
    sent = simulator.stats()["last_headers"]["traceparent"]
    assert sent == f"00-{server.context.trace_id:032x}-{attempt.context.span_id:016x}-01"


def test_retry_then_fallback(traced: Any) -> None:
    failing = "sim@status=503"
    gateway = traced(
        [route(failing, "sim", retry={"attempts": 2, "backoff_s": 0.01, "retry_on": [503]})]
    )
    assert gateway.post("m").status_code == 200
    _, chat, attempts = tree(gateway.spans(5))
    kinds = [a.attributes["llm_gateway.attempt.kind"] for a in attempts]  # type: ignore[index]
    assert kinds == ["first", "retry", "fallback"]
    errors = [(a.attributes or {}).get("error.type") for a in attempts]
    assert errors == ["upstream_status_503", "upstream_status_503", None]
    assert [a.status.status_code for a in attempts[:2]] == [StatusCode.ERROR] * 2
    assert chat.attributes is not None
    assert chat.attributes["gen_ai.response.model"] == "sim"
    assert "error.type" not in chat.attributes


def test_hedge_won_cancels_the_first(traced: Any) -> None:
    gateway = traced([route("sim@ttft-ms=3000", "sim@tokens=2", hedge={"after_s": 0.2})])
    assert gateway.post("m", stream=True).status_code == 200
    _, chat, (first, hedge) = tree(gateway.spans(4))
    assert hedge.attributes is not None
    assert first.attributes is not None
    assert hedge.attributes["llm_gateway.attempt.kind"] == "hedge"
    assert hedge.attributes["llm_gateway.attempt.outcome"] == "ok"
    assert first.attributes["error.type"] == "cancelled"
    assert first.attributes["llm_gateway.attempt.cancel_reason"] == "hedge_lost"
    assert (chat.attributes or {})["llm_gateway.hedge"] == "won"


def test_hedge_lost_is_cancelled(traced: Any) -> None:
    gateway = traced([route("sim@ttft-ms=500", "sim@ttft-ms=3000", hedge={"after_s": 0.1})])
    assert gateway.post("m", stream=True).status_code == 200
    _, chat, (first, hedge) = tree(gateway.spans(4))
    assert (hedge.attributes or {})["llm_gateway.attempt.kind"] == "hedge"
    assert (hedge.attributes or {})["error.type"] == "cancelled"
    assert (first.attributes or {})["llm_gateway.attempt.outcome"] == "ok"
    assert "first_token" in events(first)
    assert "first_token" not in events(hedge)
    assert (chat.attributes or {})["llm_gateway.hedge"] == "lost"


def test_ttft_timeout(traced: Any) -> None:
    gateway = traced([route("sim@ttft-ms=3000", budget={"ttft_s": 0.3})])
    assert gateway.post("m", stream=True).status_code == 504
    server, chat, (attempt,) = tree(gateway.spans(3))
    assert (attempt.attributes or {})["error.type"] == "upstream_ttft_timeout"
    assert "first_token" not in events(attempt)
    assert (chat.attributes or {})["error.type"] == "upstream_ttft_timeout"
    assert (server.attributes or {})["error.type"] == "504"
    assert server.status.status_code == StatusCode.ERROR


def test_idle_timeout_names_the_gap(traced: Any) -> None:
    gateway = traced([route("sim@tokens=3,gap-ms=1500", budget={"idle_s": 0.4})])
    answer = gateway.post("m", stream=True)
    assert answer.status_code == 200  # committed: the cut is an error event
    assert "upstream_idle_timeout" in answer.text
    _, _, (attempt,) = tree(gateway.spans(3))
    assert events(attempt) == ["queued", "connected", "first_token", "idle_timeout"]
    gap = attempt.events[-1].attributes or {}
    assert gap["llm_gateway.idle_s"] == 0.4
    assert 0.4 <= float(gap["llm_gateway.gap_s"]) < 1.5  # type: ignore[arg-type]


def test_client_disconnect(traced: Any, simulator: Simulator) -> None:
    gateway = traced([route("sim@tokens=50,gap-ms=100")])
    body = {"model": "m", "messages": CHAT, "stream": True}
    with httpx.stream(
        "POST", f"{gateway.server.url}/v1/chat/completions", json=body, timeout=10
    ) as response:
        next(response.iter_lines())  # the first token came: then the caller leaves
    server, _, (attempt,) = tree(gateway.spans(3))
    assert (server.attributes or {})["http.response.status_code"] == 499
    assert (attempt.attributes or {})["llm_gateway.attempt.cancel_reason"] == "client_disconnect"
    assert (attempt.attributes or {})["error.type"] == "cancelled"


def test_refused_requests_have_a_server_span_only(traced: Any) -> None:
    gateway = traced([route("sim")])
    assert gateway.post("nope").status_code == 404
    (server,) = gateway.spans(1)
    assert server.kind == SpanKind.SERVER
    assert (server.attributes or {})["http.response.status_code"] == 404
    assert (server.attributes or {})["llm_gateway.outcome"] == "model_not_found"
    assert server.status.status_code == StatusCode.UNSET  # a 4xx is the caller's


def test_unsampled_callers_and_ratio_zero_record_nothing(traced: Any, simulator: Simulator) -> None:
    gateway = traced([route("sim")], sample_ratio=0)
    unsampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-00"
    assert gateway.post("m", traceparent=unsampled).status_code == 200
    assert simulator.stats()["last_headers"]["traceparent"] == unsampled  # passed on as is
    assert gateway.post("m").status_code == 200  # no caller, ratio 0: not sampled
    sampled = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"
    assert gateway.post("m", traceparent=sampled).status_code == 200  # the caller's choice
    assert len(gateway.spans(3, within_s=1.5)) == 3


def test_content_is_recorded_only_when_asked(traced: Any) -> None:
    quiet = traced([route("sim")])
    assert quiet.post("m").status_code == 200
    loud = traced([route("sim")], capture_content=True)
    assert loud.post("m").status_code == 200
    (_, quiet_chat, _), (_, loud_chat, _) = tree(quiet.spans(3)), tree(loud.spans(3))
    assert "gen_ai.input.messages" not in (quiet_chat.attributes or {})
    assert "hello" in str((loud_chat.attributes or {})["gen_ai.input.messages"])


class Receiver:
    """An OTLP/HTTP trace receiver on loopback: decodes each export request's protobuf."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.content_types: set[str] = set()
        self._lock = threading.Lock()

        async def export(request: Request) -> Response:
            message = ExportTraceServiceRequest()
            message.ParseFromString(await request.body())
            with self._lock:
                self.content_types.add(request.headers["content-type"])
                for resource in message.resource_spans:
                    for scope in resource.scope_spans:
                        self.spans.extend(scope.spans)
            return Response(b"", media_type="application/x-protobuf")

        self.server = LiveServer(Starlette(routes=[Route("/v1/traces", export, methods=["POST"])]))


def test_spans_reach_an_otlp_http_collector(simulator: Simulator) -> None:
    receiver = Receiver()
    with receiver.server:
        data = {
            "upstreams": [{"name": "sim", "base_url": simulator.base_url}],
            "routes": [route("sim")],
            "telemetry": {"traces": {"endpoint": receiver.server.url}},
        }
        with LiveServer(create_app(parse_config(data, env={}))) as server:
            answer = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "m", "messages": CHAT},
                timeout=10,
            )
            assert answer.status_code == 200
            deadline = time.monotonic() + 10  # batched: exported within a second or so
            while len(receiver.spans) < 3:
                assert time.monotonic() < deadline, receiver.spans
                time.sleep(0.05)
    assert receiver.content_types == {"application/x-protobuf"}
    names = sorted(span.name for span in receiver.spans)
    assert names == ["POST /v1/chat/completions", "chat m", "chat sim"]
    (attempt,) = [s for s in receiver.spans if s.name == "chat sim"]
    sent = simulator.stats()["last_headers"]["traceparent"]
    assert sent == f"00-{attempt.trace_id.hex()}-{attempt.span_id.hex()}-01"


def test_an_unreachable_collector_drops_spans_and_slows_nothing(
    simulator: Simulator, unaccepting_port: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "1")
    data = {
        "upstreams": [{"name": "sim", "base_url": simulator.base_url}],
        "routes": [route("sim")],
        "telemetry": {"traces": {"endpoint": f"http://127.0.0.1:{unaccepting_port}"}},
    }
    before = _dropped()
    with LiveServer(create_app(parse_config(data, env={}))) as server, httpx.Client() as http:
        started = time.monotonic()
        for _ in range(20):
            answer = http.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "m", "messages": CHAT},
                timeout=10,
            )
            assert answer.status_code == 200
        assert time.monotonic() - started < 5  # a hanging collector holds no request up
        deadline = time.monotonic() + 15
        while _dropped() - before < 60:  # 20 requests x 3 spans
            assert time.monotonic() < deadline, _dropped() - before
            time.sleep(0.1)


def _dropped() -> float:
    value = metrics.SPANS_DROPPED.labels("export_failed")._value.get()
    return float(value)


def test_without_traces_no_tracer_is_imported() -> None:
    """(The `redis` client imports OpenTelemetry's API whenever it is installed: that
    is its own; our tracer, the trace SDK and the exporter stay out.)"""
    code = (
        "import sys\n"
        "from gateway.cli import app_factory\n"
        "from gateway.app import create_app\n"
        "from gateway.config import parse_config\n"
        "data = {'upstreams': [{'name': 'a', 'base_url': 'http://a'}],"
        " 'routes': [{'model': 'm', 'targets': [{'upstream': 'a', 'model': 'x'}]}]}\n"
        "create_app(parse_config(data, env={}))\n"
        "ours = ('gateway.observability.tracing', 'opentelemetry.sdk.trace',"
        " 'opentelemetry.exporter')\n"
        "print(sorted(m for m in sys.modules if m.startswith(ours)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout.strip() == "[]"
