"""Outlier ejection: eject after failures in a row, probe, restore or eject for longer; cool
an upstream that says it is busy; never black a route out."""

from __future__ import annotations

from gateway.config import OutlierPolicy
from gateway.resilience.outlier import (
    DEFAULT_COOLING_S,
    IN,
    Ejection,
    OutlierDetector,
    Standing,
    passed_over,
)

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


def test_what_changed_is_returned_for_the_log() -> None:
    detector = OutlierDetector(POLICY)
    assert detector.failure(0) is None
    assert detector.failure(0) is None
    assert detector.failure(0) == Ejection("failures", 3, 10)
    assert detector.admit(10)
    assert detector.failure(10) == Ejection("probe_failed", 1, 20)
    assert detector.admit(30)
    assert detector.success() is True  # restored
    assert detector.success() is False  # nothing to restore


def test_overload_cools_for_what_was_asked_and_never_ejects() -> None:
    detector = OutlierDetector(POLICY)
    for now in range(10):
        cooling = detector.overloaded(now, 2.0)
        assert cooling == (2.0 if now == 0 else None)  # one busy spell, said once
    assert detector.standing(10) == Standing("cooling", 11)
    assert not detector.ejected(10)
    assert detector.standing(11) == IN
    assert detector.overloaded(20, None) == DEFAULT_COOLING_S  # a 429 that did not say
    assert detector.overloaded(30, 1e9) == POLICY.max_ejection_s  # bounded


def test_standing_says_ejected_until_the_probe_is_due() -> None:
    detector = OutlierDetector(POLICY)
    for _ in range(3):
        detector.failure(0)
    assert detector.standing(5) == Standing("ejected", 10)
    assert detector.standing(10) == IN  # the probe is due
    assert detector.admit(10)
    assert detector.standing(10).out == "ejected"  # while the probe is out, others wait


EJECTED_SOON, EJECTED_LATE = Standing("ejected", 5), Standing("ejected", 50)
COOLING = Standing("cooling", 20)


def test_an_out_target_is_passed_over_while_a_later_one_is_in() -> None:
    assert passed_over(0, [EJECTED_SOON, IN], panic=True)
    assert passed_over(0, [COOLING, EJECTED_LATE, IN], panic=True)
    assert passed_over(1, [IN, COOLING, IN], panic=False)


def test_when_all_are_out_the_one_back_soonest_takes_the_request() -> None:
    standings = [EJECTED_LATE, EJECTED_SOON]
    assert passed_over(0, standings, panic=True)
    assert not passed_over(1, standings, panic=True)  # panic routing
    assert passed_over(1, standings, panic=False)  # fail_fast: circuit_open
    assert not passed_over(0, [EJECTED_LATE], panic=True)  # a single target is never blacked out


def test_a_cooling_upstream_still_answers_when_nothing_else_can() -> None:
    assert not passed_over(0, [COOLING], panic=False)  # its own answer, not ours
    assert passed_over(0, [EJECTED_SOON, COOLING], panic=False)
    assert not passed_over(1, [EJECTED_SOON, COOLING], panic=False)
    assert passed_over(0, [COOLING, EJECTED_SOON], panic=True)  # back sooner
