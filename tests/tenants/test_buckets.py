"""Quota arithmetic without a clock or a store: the numbers a client is told."""

from __future__ import annotations

import re

import pytest

from gateway.config import KeyLimits
from gateway.tenants.buckets import (
    DEFAULT_COMPLETION_TOKENS,
    Estimate,
    TenantState,
    admit,
    charge,
    duration,
    estimate,
    ratelimit_headers,
    settle,
)

RPM_60 = KeyLimits(requests_per_min=60)


def test_a_burst_of_the_whole_minute_then_one_per_second() -> None:
    state = TenantState.new(RPM_60, now=0.0)
    assert all(admit(state, RPM_60, 0, now=0.0).admitted for _ in range(60))
    refused = admit(state, RPM_60, 0, now=0.0)
    assert not refused.admitted
    assert refused.refused_by == "requests"
    assert refused.retry_after_s == pytest.approx(1.0)
    assert refused.requests is not None
    assert (refused.requests.limit, refused.requests.remaining) == (60, 0)
    assert refused.requests.reset_s == pytest.approx(60.0)
    assert admit(state, RPM_60, 0, now=1.0).admitted  # refilled continuously: one per second
    later = admit(state, RPM_60, 0, now=1.5)
    assert not later.admitted
    assert later.retry_after_s == pytest.approx(0.5)


def test_every_limit_at_once_or_nothing() -> None:
    limits = KeyLimits(requests_per_min=10, tokens_per_min=1000)
    state = TenantState.new(limits, now=0.0)
    assert admit(state, limits, 900, now=0.0).admitted
    refused = admit(state, limits, 200, now=0.0)  # tokens short: the request is not taken
    assert refused.refused_by == "tokens"
    assert refused.retry_after_s == pytest.approx(100 / (1000 / 60))
    assert refused.requests is not None
    assert refused.requests.remaining == 9  # the refused request took nothing
    assert refused.tokens is not None
    assert refused.tokens.remaining == 100


def test_the_longest_wait_names_the_limit() -> None:
    limits = KeyLimits(requests_per_min=60, tokens_per_min=600, max_concurrent=1)
    state = TenantState.new(limits, now=0.0)
    assert admit(state, limits, 600, now=0.0).admitted
    refused = admit(state, limits, 600, now=0.0)
    assert refused.refused_by == "tokens"  # 60 s of tokens beats 1 s of requests and concurrency
    assert refused.retry_after_s == pytest.approx(60.0)


def test_settling_charges_what_was_used() -> None:
    limits = KeyLimits(tokens_per_min=6000)
    state = TenantState.new(limits, now=0.0)
    admit(state, limits, 2000, now=0.0)
    settle(state, reserved=2000, used=500, now=0.0)
    assert state.tokens is not None
    assert state.tokens.available(0.0) == pytest.approx(5500)
    admit(state, limits, 1000, now=0.0)
    settle(state, reserved=1000, used=7000, now=0.0)  # used more than asked: a debt
    assert state.tokens.available(0.0) == pytest.approx(-1500)
    assert state.tokens.wait_for(1, 0.0) == pytest.approx(1501 / 100)
    assert state.tokens.available(60.0) == pytest.approx(4500)  # the debt is paid first
    assert state.tokens.available(600.0) == 6000  # never more than the bucket


def test_a_request_larger_than_the_bucket_waits_for_a_full_one() -> None:
    limits = KeyLimits(tokens_per_min=600)
    state = TenantState.new(limits, now=0.0)
    assert admit(state, limits, 10_000, now=0.0).admitted  # reserves 600, the whole bucket
    refused = admit(state, limits, 10_000, now=30.0)
    assert not refused.admitted
    assert refused.retry_after_s == pytest.approx(30.0)


def test_concurrency_counts_requests_in_flight() -> None:
    limits = KeyLimits(max_concurrent=2)
    state = TenantState.new(limits, now=0.0)
    assert admit(state, limits, 0, now=0.0).admitted
    assert admit(state, limits, 0, now=0.0).admitted
    refused = admit(state, limits, 0, now=0.0)
    assert refused.refused_by == "concurrent"
    assert refused.requests is None  # no per-minute limits: no such headers
    settle(state, reserved=0, used=0, now=0.0)
    assert admit(state, limits, 0, now=0.0).admitted


def test_estimate_reads_max_tokens_and_the_body_size() -> None:
    assert estimate({"max_tokens": 50}, 400, completes=True) == Estimate(100, 50)
    assert estimate({"max_completion_tokens": 70, "max_tokens": 50}, 4, completes=True) == (
        Estimate(1, 70)
    )
    assert estimate({"max_output_tokens": 30}, 0, completes=True) == Estimate(0, 30)
    unset = estimate({"max_tokens": "many"}, 10, completes=True)
    assert unset == Estimate(3, DEFAULT_COMPLETION_TOKENS)
    assert estimate({"max_tokens": 50}, 40, completes=False) == Estimate(10, 0)  # embeddings


def test_charge_prefers_the_reported_usage() -> None:
    reserved = Estimate(100, 500)
    usage = {"prompt_tokens": 80, "completion_tokens": 12, "total_tokens": 92}
    assert charge(usage, reserved, answered=True, chunks=14).total == 92
    assert charge(usage, reserved, answered=True, chunks=14).reported
    cut = charge(None, reserved, answered=True, chunks=7)  # a stream cut short: no usage
    assert (cut.prompt, cut.completion, cut.reported) == (100, 7, False)
    assert charge(None, reserved, answered=False, chunks=0).total == 0  # no answer, no charge


def test_headers_as_openai_sends_them() -> None:
    limits = KeyLimits(requests_per_min=60, tokens_per_min=6000)
    state = TenantState.new(limits, now=0.0)
    admitted = ratelimit_headers(admit(state, limits, 600, now=0.0))
    assert admitted == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
        "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "5400",
        "x-ratelimit-reset-tokens": "6s",
    }
    refused = ratelimit_headers(admit(state, limits, 6000, now=0.0))
    assert refused["retry-after"] == "6"
    assert refused["retry-after-ms"] == "6000"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.0, "0ms"), (0.02, "20ms"), (1.0, "1s"), (1.5, "1.5s"), (59.577, "59.577s"),
     (360.0, "6m0s"), (90.25, "1m30.25s")],
)  # fmt: skip
def test_durations_in_go_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text
    assert re.fullmatch(r"(\d+m)?\d+(\.\d+)?(ms|s)", text)
