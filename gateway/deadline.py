"""Deadline arithmetic and client deadline hints (pure; the clock is passed in or read once).

A request's deadline is an absolute time on the event-loop clock, fixed at arrival: the
tightest of the route's `total_s`, `server.deadline.max_s` and every client hint, minus the
margin that lets the gateway (not the client) report the timeout. Hints can only shorten.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from gateway.config import Budget, DeadlineConfig
from gateway.errors import BadRequest

_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
# ASCII digits only (`\d` would take any script's digits), and few of them: a hint is a
# number a person could mean, not a thousand digits.
_GRPC_TIMEOUT = re.compile(r"([0-9]{1,8})([HMSmun])")
_SECONDS = re.compile(r"[0-9]{1,9}(\.[0-9]{1,9})?")
_MILLISECONDS = re.compile(r"[0-9]{1,12}")

# Hints that bound the whole request, with their parsers.
_TOTAL_HINTS = ("x-request-timeout-ms", "grpc-timeout", "x-stainless-timeout", "x-litellm-timeout")
# The Python `openai` SDK's read timeout: the whole response when not streaming, the first
# token and every gap when streaming (it times each socket read).
_READ_HINT = "x-stainless-read-timeout"
_JS_TOTAL_HINT = "x-stainless-timeout"


def clock() -> float:
    """The event loop's clock, the one cancel scopes use: what `clock()` returns
    on asyncio, without its backend lookup (about 3 us, and a request reads the clock a dozen
    times). The gateway runs on asyncio (uvloop) only."""
    return asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class Deadline:
    at: float  # clock() clock
    source: Literal["route", "client"]

    def remaining(self) -> float:
        return self.at - clock()


@dataclass(frozen=True, slots=True)
class ClientHints:
    total_s: float | None = None  # tightest whole-request hint
    read_s: float | None = None  # x-stainless-read-timeout


@dataclass(frozen=True, slots=True)
class RequestBudget:
    """Everything one request may spend, resolved at arrival."""

    deadline: Deadline
    ttft_s: float
    idle_s: float
    attempt_s: float
    margin_s: float
    client_gap: bool = False  # a client hint shortened ttft_s/idle_s: timeouts are its own


def parse_hints(headers: Mapping[str, str]) -> ClientHints:
    """Read the deadline hints of DESIGN §5. A malformed explicit hint is a 400 naming the
    header; an `x-stainless-*` value that is not a number (some SDK versions send `NOT_GIVEN`)
    is ignored: callers do not choose those."""
    read = _hint(headers, _READ_HINT)
    totals = [
        _parse_total(name, value)
        for name in _TOTAL_HINTS
        if (value := _hint(headers, name)) is not None
        # The JS SDKs send `x-stainless-timeout` alone, a whole-request timeout; the Python
        # `anthropic` SDK sends its read timeout under both names: a gap, not a total.
        and not (name == _JS_TOTAL_HINT and read is not None)
    ]
    return ClientHints(
        total_s=min(totals) if totals else None,
        read_s=_parse_seconds(_READ_HINT, read) if read is not None else None,
    )


def _hint(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None and name.startswith("x-stainless-"):
        return value if _SECONDS.fullmatch(value.strip()) else None
    return value


def resolve_budget(
    *,
    arrival: float,
    budget: Budget,
    limits: DeadlineConfig,
    hints: ClientHints,
    stream: bool,
) -> RequestBudget:
    client_total = hints.total_s
    client_gap = None
    if hints.read_s is not None:
        if stream:
            client_gap = hints.read_s
        else:
            client_total = _min(client_total, hints.read_s)
    server_total = min(budget.total_s, limits.max_s)
    source: Literal["route", "client"] = "route"
    total = server_total
    if client_total is not None and client_total < server_total:
        total, source = client_total, "client"
    deadline = Deadline(at=arrival + total - limits.margin_s, source=source)
    gap_cap = math.inf if client_gap is None else client_gap - limits.margin_s
    return RequestBudget(
        deadline=deadline,
        ttft_s=min(budget.ttft_s, gap_cap),
        idle_s=min(budget.idle_s, gap_cap),
        attempt_s=budget.attempt_s,
        margin_s=limits.margin_s,
        client_gap=gap_cap < max(budget.ttft_s, budget.idle_s),
    )


def budget_ceiling(*, arrival: float, limits: DeadlineConfig, hints: ClientHints) -> float:
    """The latest a request can possibly end, known before its route: bounds the body upload."""
    total = _min(hints.total_s, hints.read_s)
    return arrival + min(limits.max_s, math.inf if total is None else total) - limits.margin_s


def timeout_header_ms(seconds: float) -> str:
    """`X-Request-Timeout-Ms` for what remains (never negative)."""
    return str(max(0, math.floor(seconds * 1000)))


def _parse_total(name: str, value: str) -> float:
    if name == "x-request-timeout-ms":
        if not _MILLISECONDS.fullmatch(value.strip()):
            raise _malformed(name, value, "a non-negative integer number of milliseconds")
        return int(value) / 1000
    if name == "grpc-timeout":
        match = _GRPC_TIMEOUT.fullmatch(value.strip())
        if match is None:
            raise _malformed(name, value, "gRPC timeout format such as 1500m or 2S")
        return int(match[1]) * _GRPC_UNITS[match[2]]
    return _parse_seconds(name, value)


def _parse_seconds(name: str, value: str) -> float:
    if not _SECONDS.fullmatch(value.strip()):
        raise _malformed(name, value, "a non-negative number of seconds")
    return float(value)


def _malformed(name: str, value: str, expected: str) -> BadRequest:
    shown = value if len(value) <= 40 else value[:40] + "..."
    return BadRequest(
        f"Invalid {name} header {shown!r}: expected {expected}.",
        code="invalid_deadline_header",
        param=name,
    )


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)
