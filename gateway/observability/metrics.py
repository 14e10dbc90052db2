"""Prometheus metrics (DESIGN §7) with prometheus_client, in its multiprocess mode when the
server runs several workers (`serve --workers N` sets PROMETHEUS_MULTIPROC_DIR before any
worker imports prometheus_client), so every scrape reports the whole server.

Labels come from config names (route, upstream) and fixed vocabularies (codes, phases,
reasons), never from client input: a request for an unknown model is counted as route "-".
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

if TYPE_CHECKING:
    from gateway.inflight import Exchange
    from gateway.upstream import Upstream

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
INFLIGHT_PHASES = ("queued", "connecting", "waiting_first_token", "streaming")
TIMEOUT_PHASES = {"pool", "connect", "ttft", "idle", "total"}  # attempt_s counts as total

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_TTFT = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 8, 13, 20, 30, 60)
_GAP = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_OVERHEAD = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_WAIT = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BUDGET = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)

P = "llm_gateway_"
REQUESTS = Counter(f"{P}requests", "Requests answered.", ["route", "code", "outcome"])
DURATION = Histogram(
    f"{P}request_duration_seconds", "Arrival to last byte.", ["route", "stream"], buckets=_LATENCY
)
OVERHEAD = Histogram(
    f"{P}overhead_seconds",
    "Time spent in the gateway itself: the whole request less upstream time, queueing, backoff.",
    ["route"],
    buckets=_OVERHEAD,
)
TTFT = Histogram(
    f"{P}ttft_seconds", "Attempt start to first token.", ["route", "upstream"], buckets=_TTFT
)
MAX_GAP = Histogram(
    f"{P}stream_max_gap_seconds",
    "Longest gap between content events, once per stream.",
    ["route", "upstream"],
    buckets=_GAP,
)
ATTEMPTS = Counter(
    f"{P}upstream_attempts", "Upstream attempts by outcome.", ["route", "upstream", "outcome"]
)
TIMEOUTS = Counter(f"{P}timeouts", "Budgets that ran out.", ["route", "upstream", "phase"])
CANCELLATIONS = Counter(
    f"{P}upstream_cancellations", "Upstream requests abandoned.", ["upstream", "reason"]
)
INFLIGHT = Gauge(
    f"{P}inflight_requests",
    "Requests in flight by phase.",
    ["upstream", "phase"],
    multiprocess_mode="livesum",
)
STALLED = Gauge(
    f"{P}stalled_requests",
    "In flight with no content event for longer than server.stall_warn_s.",
    ["upstream"],
    multiprocess_mode="livesum",
)
OLDEST = Gauge(
    f"{P}oldest_inflight_seconds",
    "Age of the oldest request in flight.",
    ["upstream"],
    multiprocess_mode="livemax",
)
POOL = Gauge(
    f"{P}pool_connections",
    "Upstream sockets by state.",
    ["upstream", "state"],
    multiprocess_mode="livesum",
)
QUEUE = Gauge(
    f"{P}pool_queue_depth",
    "Requests waiting for an upstream slot.",
    ["upstream"],
    multiprocess_mode="livesum",
)
POOL_WAIT = Histogram(
    f"{P}pool_wait_seconds", "Time waiting for an upstream slot.", ["upstream"], buckets=_WAIT
)
BUDGET = Histogram(
    f"{P}deadline_budget_seconds",
    "A request's whole budget, and who set it.",
    ["route", "source"],
    buckets=_BUDGET,
)
TOKENS = Counter(f"{P}tokens", "Tokens the upstreams reported.", ["route", "upstream", "kind"])
SKIPPED = Counter(
    f"{P}attempts_skipped", "Attempts not made, by reason.", ["route", "upstream", "reason"]
)
HEDGES = Counter(f"{P}hedges", "Hedged first attempts by outcome.", ["route", "outcome"])
EJECTED = Gauge(
    f"{P}upstream_ejected",
    "1 while the upstream is ejected.",
    ["upstream"],
    multiprocess_mode="livemax",
)
EJECTIONS = Counter(
    f"{P}upstream_ejections",
    "Times an upstream was ejected, by reason (failures, probe_failed).",
    ["upstream", "reason"],
)
PANIC_ROUTED = Counter(
    f"{P}panic_routed",
    "Requests sent to an ejected target because every target of the route was out.",
    ["route"],
)
# Load balancing (gateway.resilience.balance): which member of a pool each choice named, and
# why (least_load, round_robin, affinity; overflow for a lower priority).
BALANCE_PICKS = Counter(
    f"{P}balance_picks", "Targets chosen by a route's balance.", ["route", "upstream", "reason"]
)

# The shared cap (gateway.shared): whether Redis answers, the slots this process holds, and
# every store call by outcome and time.
_SHARED_OP = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
SHARED_UP = Gauge(
    f"{P}shared_state_up",
    "1 while the shared store (Redis) answers, 0 while the gateway runs on shared.on_failure.",
    multiprocess_mode="livemin",  # one worker degraded: the server is
)
SHARED_SLOTS = Gauge(
    f"{P}shared_slots",
    "Shared-cap slots this process holds.",
    ["upstream"],
    multiprocess_mode="livesum",
)
SHARED_OPS = Counter(
    f"{P}shared_ops", "Shared store calls by outcome (ok, full, error, timeout).", ["op", "outcome"]
)
SHARED_OP_SECONDS = Histogram(
    f"{P}shared_op_seconds", "Time of one shared store call.", ["op"], buckets=_SHARED_OP
)


def record_shared_op(op: str, outcome: str, seconds: float) -> None:
    if _enabled:
        _at(SHARED_OPS, op, outcome).inc()
        _at(SHARED_OP_SECONDS, op).observe(seconds)


def record_shared_up(up: bool) -> None:
    if _enabled:
        SHARED_UP.set(1 if up else 0)


# Configuration reloads (gateway.reload) and the trace exporter (gateway.observability.tracing).
CONFIG_GENERATION = Gauge(
    f"{P}config_generation",
    "Configurations loaded successfully so far by this worker (1 at start-up).",
    multiprocess_mode="liveall",  # one series per worker: a lagging one shows
)
CONFIG_RELOADS = Counter(f"{P}config_reloads", "Reloads by outcome (ok, error).", ["outcome"])
SPANS_DROPPED = Counter(
    f"{P}trace_spans_dropped",
    "Spans not delivered to the collector, by reason (export_failed, queue_full).",
    ["reason"],
)


def record_config_generation(number: int) -> None:
    CONFIG_GENERATION.set(number)


def record_config_reload(outcome: str, generation: int | None) -> None:
    _at(CONFIG_RELOADS, outcome).inc()
    if generation is not None:
        CONFIG_GENERATION.set(generation)


def count_spans_dropped(reason: str, count: int) -> None:
    _at(SPANS_DROPPED, reason).inc(count)


# Tenants (gateway.tenants): per key (its configured name, never the key), and each upstream's
# queue by priority class.
KEY_REQUESTS = Counter(f"{P}key_requests", "Requests answered, by key.", ["key", "code"])
KEY_TOKENS = Counter(
    f"{P}key_tokens",
    "Tokens charged to a key's quota: prompt and completion as the upstream reported them, "
    "or estimated when it reported none (a stream cut short).",
    ["key", "kind"],
)
RATE_LIMITED = Counter(
    f"{P}rate_limited",
    "Requests refused (429) by a key's quota: requests, tokens or concurrent.",
    ["key", "limit"],
)
QUEUE_WAIT = Histogram(
    f"{P}queue_wait_seconds",
    "Time waiting for an upstream slot, by the key's priority class.",
    ["upstream", "priority"],
    buckets=_WAIT,
)
SHED = Counter(
    f"{P}shed",
    "Requests shed by a full upstream queue (503 upstream_saturated), by priority class.",
    ["upstream", "priority"],
)


def record_key(key: str, exchange: Exchange | None, *, status: int, limited: str | None) -> None:
    """One request of a key: its status, the limit that refused it, the tokens charged."""
    _at(KEY_REQUESTS, key, str(status)).inc()
    if limited is not None:
        _at(RATE_LIMITED, key, limited).inc()
    charge = exchange.charge if exchange is not None else None
    if charge is None:
        return
    if charge.reported:
        counts = {"prompt": charge.prompt, "completion": charge.completion}
    else:
        counts = {"estimated": charge.total}
    for kind, count in counts.items():
        if count > 0:
            _at(KEY_TOKENS, key, kind).inc(count)


_enabled = True
# Bound children by label values: `.labels()` costs a tuple, a lock and a lookup on every call;
# label values are config names and fixed words, so this stays small.
_children: dict[tuple[object, tuple[str, ...]], Any] = {}


def _at(metric: Any, *labels: str) -> Any:
    key = (metric, labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def enabled() -> bool:
    return _enabled


def enable(on: bool) -> None:
    """`server.metrics: false` turns recording off (and /metrics answers 404)."""
    global _enabled
    _enabled = on


def record_request(
    exchange: Exchange | None, *, route: str, status: int, outcome: str, now: float
) -> None:
    """Everything one request did, counted once when it ends."""
    _at(REQUESTS, route, str(status), outcome).inc()
    if exchange is None:  # refused before it had a route: nothing else happened
        return
    total = now - exchange.arrival
    _at(DURATION, route, "true" if exchange.stream else "false").observe(total)
    _at(BUDGET, route, exchange.budget.deadline.source).observe(
        exchange.budget.deadline.at - exchange.arrival + exchange.budget.margin_s
    )
    upstream_s = 0.0
    for attempt in exchange.attempt_log:
        _at(ATTEMPTS, route, attempt.upstream, attempt.outcome).inc()
        if attempt.started:
            _at(POOL_WAIT, attempt.upstream).observe(attempt.started - attempt.queued_at)
            upstream_s += attempt.ended - attempt.started
            wait = attempt.started - attempt.queued_at
            _at(QUEUE_WAIT, attempt.upstream, exchange.priority).observe(wait)
        elif attempt.outcome == "upstream_saturated":
            _at(SHED, attempt.upstream, exchange.priority).inc()
        if attempt.ttft_s is not None:
            _at(TTFT, route, attempt.upstream).observe(attempt.ttft_s)
        if attempt.max_gap_s is not None:
            _at(MAX_GAP, route, attempt.upstream).observe(attempt.max_gap_s)
        phase = _timeout_phase(attempt.outcome)
        if phase is not None:
            _at(TIMEOUTS, route, attempt.upstream, phase).inc()
        if attempt.cancel_reason in ("client_disconnect", "deadline", "hedge_lost"):
            _at(CANCELLATIONS, attempt.upstream, attempt.cancel_reason).inc()
    if outcome in ("deadline_exceeded", "upstream_pool_timeout") and not _counted(exchange):
        phase = "pool" if outcome == "upstream_pool_timeout" else "total"
        _at(TIMEOUTS, route, exchange.upstream or "-", phase).inc()
    for upstream, reason in exchange.skipped:
        _at(SKIPPED, route, upstream, reason).inc()
    if exchange.panic_routed:
        _at(PANIC_ROUTED, route).inc()
    for upstream, reason in exchange.picks:
        _at(BALANCE_PICKS, route, upstream, reason).inc()
    if exchange.hedge in ("won", "lost", "not_needed"):
        _at(HEDGES, route, exchange.hedge).inc()
    usage = exchange.usage
    if usage is not None and exchange.upstream is not None:
        for kind in ("prompt", "completion"):
            count = usage.get(f"{kind}_tokens")
            if isinstance(count, int) and count > 0:
                _at(TOKENS, route, exchange.upstream, kind).inc(count)
    overhead = total - upstream_s - exchange.queue_s - exchange.backoff_s
    _at(OVERHEAD, route).observe(max(0.0, overhead))


def count_ejection(upstream: str, reason: str) -> None:
    _at(EJECTIONS, upstream, reason).inc()


def _timeout_phase(outcome: str) -> str | None:
    if outcome == "deadline_exceeded":
        return "total"  # an attempt that ran past attempt_s
    phase = outcome.removeprefix("upstream_").removesuffix("_timeout")
    return phase if outcome.endswith("_timeout") and phase in TIMEOUT_PHASES else None


def _counted(exchange: Exchange) -> bool:
    """Whether the request's deadline timeout was already counted as its last attempt's."""
    last = exchange.attempt_log[-1] if exchange.attempt_log else None
    return last is not None and _timeout_phase(last.outcome) is not None


def sample(
    exchanges: Iterable[Exchange], upstreams: Mapping[str, Upstream], *, now: float, stall_s: float
) -> None:
    """Set the gauges from what is in flight now (called every second and at each scrape). A
    request is stalled after `min(stall_s, idle_s / 2)` without content, so a stall shows on
    a route whose `idle_s` ends it sooner than `stall_warn_s`."""
    counts = {(name, phase): 0 for name in upstreams for phase in INFLIGHT_PHASES}
    stalled = dict.fromkeys(upstreams, 0)
    oldest = dict.fromkeys(upstreams, 0.0)
    for exchange in exchanges:
        on = exchange.upstream
        if on is None or on not in stalled:
            continue  # not yet on an upstream
        if (on, exchange.phase) in counts:
            counts[on, exchange.phase] += 1
        since = exchange.last_content_at or exchange.arrival
        if now - since > min(stall_s, exchange.budget.idle_s / 2):
            stalled[on] += 1
        oldest[on] = max(oldest[on], round(now - exchange.arrival, 3))
    for (name, phase), count in counts.items():
        INFLIGHT.labels(name, phase).set(count)
    for name, upstream in upstreams.items():
        STALLED.labels(name).set(stalled[name])
        OLDEST.labels(name).set(oldest[name])
        pool = upstream.pool_state()
        POOL.labels(name, "active").set(pool["connections_active"])
        POOL.labels(name, "idle").set(pool["connections_idle"])
        QUEUE.labels(name).set(pool["queued"])
        EJECTED.labels(name).set(1 if upstream.outlier.ejected(now) else 0)
        if "shared_slots" in pool:
            SHARED_SLOTS.labels(name).set(pool["shared_slots"])


def exposition() -> bytes:
    """The text a scrape gets: this process's series, or every worker's in multiprocess mode."""
    directory = os.environ.get(MULTIPROC_ENV)
    if directory:
        _forget_dead_workers(Path(directory))
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest()


def _forget_dead_workers(directory: Path) -> None:
    """A worker that died (and was replaced) must not count in the live gauges any more."""
    for path in directory.glob("gauge_live*_*.db"):
        pid = int(path.stem.rpartition("_")[2])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(pid, str(directory))  # type: ignore[no-untyped-call]
        except PermissionError:
            pass  # alive, someone else's
