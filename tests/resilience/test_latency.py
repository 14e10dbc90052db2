"""A target's recent time to first token."""

from __future__ import annotations

from gateway.resilience.latency import MAX_AGE_S, MIN_SAMPLES, WINDOW, LatencyWindow


def test_a_cold_target_has_no_estimate() -> None:
    window = LatencyWindow()
    for _ in range(MIN_SAMPLES - 1):
        window.record(0.0, 1.0)
    assert window.typical(0.0) is None


def test_percentiles_of_recent_samples() -> None:
    window = LatencyWindow()
    for value in range(1, 101):
        window.record(0.0, value / 100)
    assert window.typical(0.0) == 0.5
    assert window.percentile(0.0, 95) == 0.95
    assert window.percentile(0.0, 100) == 1.0


def test_old_and_surplus_samples_are_forgotten() -> None:
    window = LatencyWindow()
    for _ in range(WINDOW):
        window.record(0.0, 9.0)
    for _ in range(WINDOW):
        window.record(1.0, 0.1)
    assert window.typical(1.0) == 0.1  # only the last WINDOW samples
    assert window.typical(1.0 + MAX_AGE_S + 1) is None  # and only recent ones
