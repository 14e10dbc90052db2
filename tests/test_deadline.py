"""Deadline arithmetic and client hints (pure)."""

from __future__ import annotations

import pytest

from gateway.config import Budget, DeadlineConfig
from gateway.deadline import (
    ClientHints,
    budget_ceiling,
    parse_hints,
    resolve_budget,
    timeout_header_ms,
)
from gateway.errors import BadRequest

LIMITS = DeadlineConfig(max_s=600, margin_s=0.05)
BUDGET = Budget(total_s=20, ttft_s=8, idle_s=5, attempt_s=12)


@pytest.mark.parametrize(
    ("headers", "total_s"),
    [
        ({"x-request-timeout-ms": "1500"}, 1.5),
        ({"grpc-timeout": "1500m"}, 1.5),
        ({"grpc-timeout": "2S"}, 2.0),
        ({"grpc-timeout": "1M"}, 60.0),
        ({"grpc-timeout": "1H"}, 3600.0),
        ({"grpc-timeout": "5000000u"}, 5.0),
        ({"grpc-timeout": "70000000n"}, 0.07),
        ({"x-stainless-timeout": "2.5"}, 2.5),
        ({"x-litellm-timeout": "3"}, 3.0),
        ({"x-request-timeout-ms": "9000", "x-litellm-timeout": "4"}, 4.0),  # the tightest wins
        ({}, None),
    ],
)
def test_total_hints(headers: dict[str, str], total_s: float | None) -> None:
    assert parse_hints(headers).total_s == total_s


def test_read_hint_is_kept_apart() -> None:
    hints = parse_hints({"x-stainless-read-timeout": "600.0"})
    assert hints == ClientHints(total_s=None, read_s=600.0)


def test_the_anthropic_sdks_read_timeout_under_both_names_is_a_read_timeout() -> None:
    """The Python `anthropic` SDK sends its read timeout as `x-stainless-timeout` too: a stream
    whose tokens keep coming must not be cut when that many seconds have passed."""
    both = {"x-stainless-timeout": "30", "x-stainless-read-timeout": "30"}
    assert parse_hints(both) == ClientHints(total_s=None, read_s=30.0)
    explicit = {**both, "x-request-timeout-ms": "5000"}  # other totals still count
    assert parse_hints(explicit) == ClientHints(total_s=5.0, read_s=30.0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-request-timeout-ms", "1.5"),
        ("x-request-timeout-ms", "-5"),
        ("x-request-timeout-ms", "soon"),
        ("grpc-timeout", "15"),
        ("grpc-timeout", "1s"),
        ("grpc-timeout", "123456789S"),  # gRPC allows at most 8 digits
        ("x-request-timeout-ms", "\u0663\u0663"),  # Arabic-Indic digits: not ASCII
        ("x-request-timeout-ms", "9" * 400),  # a number nobody means
        ("grpc-timeout", "\u0663S"),
        ("x-litellm-timeout", ""),
        ("x-litellm-timeout", "1" * 300),
        ("x-litellm-timeout", "nan"),
    ],
)
def test_malformed_hint_names_the_header(name: str, value: str) -> None:
    with pytest.raises(BadRequest) as caught:
        parse_hints({name: value})
    assert caught.value.code == "invalid_deadline_header"
    assert caught.value.param == name
    assert name in caught.value.message


@pytest.mark.parametrize("value", ["NOT_GIVEN", "nan", "-1", "inf", "", "\u0663"])
@pytest.mark.parametrize("name", ["x-stainless-timeout", "x-stainless-read-timeout"])
def test_an_sdk_hint_that_is_not_a_number_is_ignored(name: str, value: str) -> None:
    assert parse_hints({name: value}) == ClientHints()


def test_route_budget_when_no_hints() -> None:
    resolved = resolve_budget(
        arrival=100.0, budget=BUDGET, limits=LIMITS, hints=ClientHints(), stream=True
    )
    assert resolved.deadline.at == pytest.approx(100 + 20 - 0.05)
    assert resolved.deadline.source == "route"
    assert (resolved.ttft_s, resolved.idle_s, resolved.attempt_s) == (8, 5, 12)


def test_client_hint_only_shortens() -> None:
    shorter = resolve_budget(
        arrival=0.0, budget=BUDGET, limits=LIMITS, hints=ClientHints(total_s=3), stream=False
    )
    assert shorter.deadline.at == pytest.approx(3 - 0.05)
    assert shorter.deadline.source == "client"
    longer = resolve_budget(
        arrival=0.0, budget=BUDGET, limits=LIMITS, hints=ClientHints(total_s=300), stream=False
    )
    assert longer.deadline.at == pytest.approx(20 - 0.05)
    assert longer.deadline.source == "route"


def test_server_max_caps_everything() -> None:
    limits = DeadlineConfig(max_s=10, margin_s=0)
    resolved = resolve_budget(
        arrival=0.0, budget=BUDGET, limits=limits, hints=ClientHints(), stream=False
    )
    assert resolved.deadline.at == 10


def test_read_hint_bounds_the_whole_response_when_not_streaming() -> None:
    resolved = resolve_budget(
        arrival=0.0, budget=BUDGET, limits=LIMITS, hints=ClientHints(read_s=2), stream=False
    )
    assert resolved.deadline.at == pytest.approx(2 - 0.05)
    assert resolved.ttft_s == 8


def test_read_hint_bounds_first_token_and_gaps_when_streaming() -> None:
    resolved = resolve_budget(
        arrival=0.0, budget=BUDGET, limits=LIMITS, hints=ClientHints(read_s=2), stream=True
    )
    assert resolved.deadline.at == pytest.approx(20 - 0.05)  # a stream may run longer in total
    assert resolved.ttft_s == pytest.approx(2 - 0.05)
    assert resolved.idle_s == pytest.approx(2 - 0.05)


def test_budget_ceiling_bounds_the_upload_before_the_route_is_known() -> None:
    assert budget_ceiling(arrival=0, limits=LIMITS, hints=ClientHints()) == pytest.approx(599.95)
    hinted = ClientHints(total_s=4, read_s=2)
    assert budget_ceiling(arrival=0, limits=LIMITS, hints=hinted) == pytest.approx(1.95)


@pytest.mark.parametrize(("seconds", "header"), [(1.2349, "1234"), (0.0, "0"), (-3.0, "0")])
def test_timeout_header(seconds: float, header: str) -> None:
    assert timeout_header_ms(seconds) == header
