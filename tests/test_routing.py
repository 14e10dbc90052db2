"""Routes, attempt plans and retry conditions (pure)."""

from __future__ import annotations

import pytest

from gateway.config import Config, Route, Target
from gateway.errors import (
    BudgetExceeded,
    GatewayError,
    ModelNotFound,
    Overloaded,
    UpstreamFailed,
    UpstreamStatus,
)
from gateway.routing import Router, failure_condition, upstreams_fault

A, B = Target(upstream="a", model="x"), Target(upstream="b", model="y")


def test_router_finds_routes_and_names_the_missing_model() -> None:
    route = Route(model="gpt", targets=(A,))
    router = Router(Config(routes=(route,)))
    assert router.route_for("gpt") is route
    assert router.models == ["gpt"]
    with pytest.raises(ModelNotFound) as caught:
        router.route_for("other")
    assert caught.value.status == 404
    assert "other" in caught.value.message


@pytest.mark.parametrize(
    ("failure", "condition"),
    [
        (UpstreamStatus(503, b"", {}, {}), 503),
        (UpstreamStatus(429, b"", {}, {}), 429),
        (UpstreamFailed("x", code="upstream_connect_error"), "connect"),
        (BudgetExceeded("connect", "x"), "connect"),
        (UpstreamFailed("x", code="upstream_protocol_error"), "protocol"),
        (BudgetExceeded("ttft", "x"), "ttft"),
        (BudgetExceeded("attempt", "x"), "ttft"),
        (Overloaded("x", code="upstream_saturated"), 503),
        (BudgetExceeded("idle", "x"), "idle"),
        (BudgetExceeded("total", "x"), None),
    ],
)
def test_failure_conditions(failure: GatewayError, condition: str | int | None) -> None:
    assert failure_condition(failure) == condition


@pytest.mark.parametrize(
    ("failure", "client_gap", "fault"),
    [
        (UpstreamStatus(503, b"", {}, {}), False, True),
        (UpstreamStatus(429, b"", {}, {}), False, False),  # it is pacing us, not broken
        (UpstreamFailed("x", code="upstream_connect_error"), False, True),
        (UpstreamFailed("x", code="upstream_protocol_error"), False, True),
        (BudgetExceeded("connect", "x"), False, True),
        (BudgetExceeded("ttft", "x"), False, True),
        (BudgetExceeded("ttft", "x"), True, False),  # the client's read timeout was shorter
        (BudgetExceeded("idle", "x"), False, True),
        (BudgetExceeded("total", "x"), False, False),  # the deadline: the caller's
        (Overloaded("x", code="upstream_saturated"), False, False),  # our own queue
    ],
)
def test_which_failures_count_against_an_upstream(
    failure: GatewayError, client_gap: bool, fault: bool
) -> None:
    assert upstreams_fault(failure, client_gap=client_gap) is fault
