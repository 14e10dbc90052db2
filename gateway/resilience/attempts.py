"""Whether an attempt may start, and how long to wait before it."""

from __future__ import annotations

import email.utils
import math
import random
from collections.abc import Mapping


def fits(remaining: float, *, min_attempt_s: float, typical_ttft: float | None) -> bool:
    """An attempt is worth starting only if what remains covers the minimum and the first
    token this target usually takes (unknown for a cold target: then only the minimum)."""
    needed = max(min_attempt_s, typical_ttft or 0.0)
    return remaining > needed


def backoff(base_s: float, retry: int, rng: random.Random) -> float:
    """Exponential backoff with full jitter before retry number `retry` (1 for the first)."""
    return rng.uniform(0, base_s * 2 ** (retry - 1))


def retry_after(headers: Mapping[str, str], now_epoch: float) -> float | None:
    """Seconds the upstream asked us to wait (`retry-after-ms`, or `Retry-After` in seconds
    or as an HTTP date), or None if it did not ask or the value makes no sense."""
    value = headers.get("retry-after-ms")
    if value is not None:
        seconds = _number(value)
        if seconds is not None:
            return seconds / 1000
    value = headers.get("retry-after")
    if value is None:
        return None
    seconds = _number(value)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when.timestamp() - now_epoch)


def _number(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if math.isfinite(value) and value >= 0 else None
