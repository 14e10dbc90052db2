"""Routes: which targets serve a model, in what order, and which failures deserve another try."""

from __future__ import annotations

from collections.abc import Iterator

from gateway.config import Config, Route, Target
from gateway.errors import BudgetExceeded, GatewayError, ModelNotFound, Overloaded, UpstreamStatus


class Router:
    def __init__(self, config: Config) -> None:
        self._routes = {route.model: route for route in config.routes}

    @property
    def models(self) -> list[str]:
        return list(self._routes)

    def route_for(self, model: str) -> Route:
        route = self._routes.get(model)
        if route is None:
            raise ModelNotFound(
                f"The model {model!r} does not exist on this gateway.",
                code="model_not_found",
                param="model",
            )
        return route


def attempt_plan(route: Route) -> Iterator[tuple[Target, int]]:
    """Each target in order, each tried `retry.attempts` times: (target, try number from 1)."""
    for target in route.targets:
        for number in range(1, route.retry.attempts + 1):
            yield target, number


def failure_condition(failure: GatewayError) -> str | int | None:
    """The `retry_on` name of a failure before the response was committed, if it has one."""
    if isinstance(failure, UpstreamStatus):
        return failure.status
    if isinstance(failure, Overloaded):
        return 503  # a full queue here is the upstream being unavailable to us
    if isinstance(failure, BudgetExceeded):
        # An attempt that ran out before committing had no first token either.
        return {"connect": "connect", "ttft": "ttft", "attempt": "ttft"}.get(failure.phase)
    return {"upstream_connect_error": "connect", "upstream_protocol_error": "protocol"}.get(
        failure.code
    )
