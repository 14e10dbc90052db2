"""Envoy's retry budget: a route's retries and hedges stay within a ratio of its requests.

Retries on the same target and hedges add load to upstreams that may be failing because of
load; fallbacks to another target shift it instead and are not counted. In the last
`WINDOW_S`, retries may be at most `ratio` x requests, but `min_per_s` a second are always
allowed, so a quiet route can still retry.
"""

from __future__ import annotations

from collections import deque

from gateway.config import RetryBudget

WINDOW_S = 10.0


class RetryBudgetTracker:
    def __init__(self, policy: RetryBudget) -> None:
        self.policy = policy
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()

    def record_request(self, now: float) -> None:
        self._requests.append(now)

    def try_spend(self, now: float) -> bool:
        """Take one retry (or hedge) from the budget if there is one."""
        for times in (self._requests, self._retries):
            while times and now - times[0] > WINDOW_S:
                times.popleft()
        last_second = sum(1 for at in self._retries if now - at <= 1.0)
        allowed = last_second < self.policy.min_per_s or (
            len(self._retries) < self.policy.ratio * len(self._requests)
        )
        if allowed:
            self._retries.append(now)
        return allowed
