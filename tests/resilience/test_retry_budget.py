"""Envoy's retry budget: retries stay within a ratio of requests, with a floor per second."""

from __future__ import annotations

from gateway.config import RetryBudget
from gateway.resilience.retry_budget import WINDOW_S, RetryBudgetTracker


def test_the_floor_allows_a_few_retries_a_second_whatever_the_traffic() -> None:
    budget = RetryBudgetTracker(RetryBudget(ratio=0.0, min_per_s=3))
    assert [budget.try_spend(0.0) for _ in range(5)] == [True, True, True, False, False]
    assert budget.try_spend(1.5)  # a new second


def test_retries_stay_within_the_ratio_of_recent_requests() -> None:
    budget = RetryBudgetTracker(RetryBudget(ratio=0.2, min_per_s=0))
    for n in range(100):
        budget.record_request(n * 0.05)  # 100 requests in 5 s
    granted = sum(budget.try_spend(5.0) for _ in range(50))
    assert granted == 20
    later = 5.0 + WINDOW_S + 1  # the window moved on: the old requests and retries are gone
    for _ in range(10):
        budget.record_request(later)
    assert sum(budget.try_spend(later) for _ in range(5)) == 2
