"""Outlier ejection: eject after failures in a row, probe, restore or eject for longer."""

from __future__ import annotations

from gateway.config import OutlierPolicy
from gateway.resilience.outlier import OutlierDetector

POLICY = OutlierPolicy(consecutive_failures=3, base_ejection_s=10, max_ejection_s=25)


def test_ejected_after_consecutive_failures_only() -> None:
    detector = OutlierDetector(POLICY)
    detector.failure(0)
    detector.failure(0)
    detector.success()  # the run is broken
    detector.failure(0)
    detector.failure(0)
    assert detector.admit(0)
    detector.failure(0)
    assert not detector.admit(1)
    assert detector.ejected(1)
    assert detector.retry_after(1) == 9


def test_one_probe_after_the_ejection_then_restored_on_success() -> None:
    detector = OutlierDetector(POLICY)
    for _ in range(3):
        detector.failure(0)
    assert detector.admit(10)  # the probe
    assert not detector.admit(10)  # only one at a time
    detector.success()
    assert detector.admit(10)
    assert not detector.ejected(10)


def test_a_failed_probe_ejects_for_longer_up_to_the_cap() -> None:
    detector = OutlierDetector(POLICY)
    for _ in range(3):
        detector.failure(0)
    assert detector.admit(10)
    detector.failure(10)  # probe failed: second ejection, 20 s
    assert not detector.admit(29)
    assert detector.admit(30)
    detector.failure(30)  # third: 30 s, capped at 25
    assert detector.retry_after(30) == 25


def test_stragglers_and_neutral_outcomes_do_not_count() -> None:
    detector = OutlierDetector(POLICY)
    for _ in range(3):
        detector.failure(0)
    detector.failure(5)  # sent before the ejection, failed during it
    assert detector.retry_after(5) == 5  # not extended
    assert detector.admit(10)
    detector.neutral()  # the probe's caller left: the next request probes
    assert detector.admit(10)
