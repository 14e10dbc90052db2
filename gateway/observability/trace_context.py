"""W3C trace context for a traced request, decided at admission without OpenTelemetry: the
trace it belongs to (the caller's, or a new one), whether it is sampled (parent-based: a
caller's choice is followed; a new trace is kept with `sample_ratio`, by its id as
OpenTelemetry's TraceIdRatioBased does), and the `traceparent` each attempt sends upstream,
which names that attempt's span. The spans themselves are built when the request ends
(gateway.observability.tracing)."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.inflight import Attempt

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_FINISH = re.compile(rb'"(?:finish_reason|stop_reason)":\s*"(\w+)"')
_LOW_64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """A sampled request's place in its trace."""

    trace_id: str  # 32 hex digits
    parent_span_id: str | None  # the caller's span, None for a trace the gateway started
    tracestate: str | None = None

    def headers(self, span_id: str) -> dict[str, str]:
        """What an attempt sends upstream: its own span as the parent of what follows."""
        headers = {"traceparent": f"00-{self.trace_id}-{span_id}-01"}
        if self.tracestate:
            headers["tracestate"] = self.tracestate
        return headers


def sampled_trace(context: Mapping[str, str], ratio: float) -> RequestTrace | None:
    """The request's trace if it is sampled; `context` is the caller's validated
    `traceparent`/`tracestate` (gateway.proxy.trace_context)."""
    match = _TRACEPARENT.fullmatch(context.get("traceparent", ""))
    if match is not None:
        trace_id, parent, flags = match.groups()
        if not int(flags, 16) & 1:
            return None  # the caller records nothing of this trace: neither do we
        return RequestTrace(trace_id, parent, context.get("tracestate"))
    trace = random.getrandbits(128) or 1  # as OpenTelemetry's RandomIdGenerator
    if (trace & _LOW_64) >= round(ratio * (_LOW_64 + 1)):
        return None
    return RequestTrace(f"{trace:032x}", None)


def new_span_id() -> str:
    return f"{random.getrandbits(64) or 1:016x}"


def finish_reasons(raw: bytes) -> list[str]:
    """The finish (or Anthropic stop) reasons named in an answer or a stream's events."""
    return [reason.decode() for reason in _FINISH.findall(raw)]


def attempt_kinds(attempts: Sequence[Attempt]) -> list[str]:
    """What each attempt was, read from the record: the first; a hedge (it started while the
    one before it still ran); a retry (the same upstream and model again); else a fallback."""
    kinds = []
    for index, attempt in enumerate(attempts):
        before = attempts[index - 1] if index else None
        if before is None:
            kinds.append("first")
        elif attempt.queued_at < before.ended or not before.ended:
            kinds.append("hedge")
        elif (attempt.upstream, attempt.model) == (before.upstream, before.model):
            kinds.append("retry")
        else:
            kinds.append("fallback")
    return kinds
