"""Whether an attempt may start and how long to wait: pure, no sockets."""

from __future__ import annotations

import random

import pytest

from gateway.resilience.attempts import backoff, fits, retry_after


def test_an_attempt_needs_the_minimum_and_the_typical_first_token() -> None:
    assert fits(1.0, min_attempt_s=0.1, typical_ttft=None)
    assert not fits(0.05, min_attempt_s=0.1, typical_ttft=None)
    assert not fits(1.0, min_attempt_s=0.1, typical_ttft=1.5)
    assert fits(2.0, min_attempt_s=0.1, typical_ttft=1.5)


def test_backoff_is_full_jitter_on_an_exponential_ceiling() -> None:
    rng = random.Random(7)
    for retry, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8)]:
        waits = [backoff(0.2, retry, rng) for _ in range(500)]
        assert all(0 <= wait <= ceiling for wait in waits)
        assert max(waits) > ceiling * 0.9  # the whole range is used...
        assert min(waits) < ceiling * 0.1  # ...from zero up


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # in the past: now
        ({"retry-after": "soon"}, None),
        ({"retry-after": "-1"}, None),
        ({"retry-after": "nan"}, None),
        ({}, None),
    ],
)
def test_retry_after_in_seconds_or_as_a_date(headers: dict[str, str], expected: float) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after(headers, now) == expected
