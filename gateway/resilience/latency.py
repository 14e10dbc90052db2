"""Recent time to first token of one target: a bounded window of samples."""

from __future__ import annotations

import math
from collections import deque

WINDOW = 100  # samples kept
MAX_AGE_S = 300.0  # older samples say little about the upstream now
MIN_SAMPLES = 5  # fewer than this: a cold target, no estimate


class LatencyWindow:
    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque(maxlen=WINDOW)  # (at, seconds)
        self._ordered: list[float] | None = None  # the samples sorted, until they change

    def record(self, now: float, seconds: float) -> None:
        self._samples.append((now, seconds))
        self._ordered = None

    def percentile(self, now: float, p: float) -> float | None:
        """The `p`th percentile (nearest rank) of recent samples, or None while cold."""
        while self._samples and now - self._samples[0][0] > MAX_AGE_S:
            self._samples.popleft()
            self._ordered = None
        if len(self._samples) < MIN_SAMPLES:
            return None
        if self._ordered is None:  # a balancer asks for every member, on every request
            self._ordered = sorted(seconds for _, seconds in self._samples)
        rank = max(1, math.ceil(p / 100 * len(self._ordered)))
        return self._ordered[rank - 1]

    def typical(self, now: float) -> float | None:
        """What an attempt on this target can expect to wait for its first token (median)."""
        return self.percentile(now, 50)
