"""Routes, attempt plans and retry conditions (pure)."""

from __future__ import annotations

import pytest

from gateway.config import Config, RetryPolicy, Route, Target
from gateway.errors import (
    BudgetExceeded,
    GatewayError,
    ModelNotFound,
    Overloaded,
    UpstreamFailed,
    UpstreamStatus,
)
from gateway.routing import Router, attempt_plan, failure_condition

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


def test_attempt_plan_tries_each_target_in_order_with_its_retries() -> None:
    route = Route(model="gpt", targets=(A, B), retry=RetryPolicy(attempts=2))
    assert list(attempt_plan(route)) == [(A, 1), (A, 2), (B, 1), (B, 2)]


@pytest.mark.parametrize(
    ("failure", "condition"),
    [
        (UpstreamStatus(503, b"", {}), 503),
        (UpstreamStatus(429, b"", {}), 429),
        (UpstreamFailed("x", code="upstream_connect_error"), "connect"),
        (BudgetExceeded("connect", "x"), "connect"),
        (UpstreamFailed("x", code="upstream_protocol_error"), "protocol"),
        (BudgetExceeded("ttft", "x"), "ttft"),
        (BudgetExceeded("attempt", "x"), "ttft"),
        (Overloaded("x", code="upstream_saturated"), 503),
        (BudgetExceeded("idle", "x"), None),
    ],
)
def test_failure_conditions(failure: GatewayError, condition: str | int | None) -> None:
    assert failure_condition(failure) == condition
