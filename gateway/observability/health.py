"""Upstream health changes, each said once: a log line (WARNING when an upstream is ejected
or starts cooling, INFO when it is restored) and, for ejections, a count by reason."""

from __future__ import annotations

import logging

from gateway.observability import logs, metrics
from gateway.resilience.outlier import Ejection

LOG = logging.getLogger("gateway.health")


def ejected(upstream: str, ejection: Ejection) -> None:
    if metrics.enabled():
        metrics.count_ejection(upstream, ejection.reason)
    logs.event(
        LOG,
        logging.WARNING,
        {
            "event": "upstream_ejected",
            "upstream": upstream,
            "reason": ejection.reason,
            "failures": ejection.failures,
            "ejected_s": logs.seconds(ejection.duration_s),
        },
    )


def cooling(upstream: str, seconds: float, status: int) -> None:
    logs.event(
        LOG,
        logging.WARNING,
        {
            "event": "upstream_cooling",
            "upstream": upstream,
            "status": status,
            "cooling_s": logs.seconds(seconds),
        },
    )


def restored(upstream: str) -> None:
    logs.event(LOG, logging.INFO, {"event": "upstream_restored", "upstream": upstream})
