"""Routes: which targets serve a model, in what order, and which failures deserve another try."""

from __future__ import annotations

from gateway.config import Config, Route
from gateway.errors import BudgetExceeded, GatewayError, ModelNotFound, Overloaded, UpstreamStatus
from gateway.resilience.balance import Rotation
from gateway.resilience.latency import LatencyWindow
from gateway.resilience.retry_budget import RetryBudgetTracker


class RouteState:
    """What a route remembers between requests: its retry budget, each target's recent time
    to first token, its round robin; and each target's priority (unset: its position)."""

    def __init__(self, route: Route) -> None:
        self.retry_budget = RetryBudgetTracker(route.retry_budget)
        self.ttft = {target: LatencyWindow() for target in route.targets}
        self.rotation = Rotation()
        self.priority = {
            target: index if target.priority is None else target.priority
            for index, target in enumerate(route.targets)
        }


class Router:
    def __init__(self, config: Config, previous: Router | None = None) -> None:
        """`previous`: the router of the config this one replaces; a route defined the same
        keeps its state (a reload does not reset retry budgets or latency windows)."""
        self._routes = {route.model: route for route in config.routes}
        self._states = {route.model: RouteState(route) for route in config.routes}
        if previous is not None:
            for model, route in self._routes.items():
                if previous._routes.get(model) == route:
                    self._states[model] = previous._states[model]

    def state(self, route: Route) -> RouteState:
        return self._states[route.model]

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


def failure_condition(failure: GatewayError) -> str | int | None:
    """The `retry_on` name of a failure before the response was committed, if it has one."""
    if isinstance(failure, UpstreamStatus):
        return failure.status
    if isinstance(failure, Overloaded):
        return 503  # a full queue here is the upstream being unavailable to us
    if isinstance(failure, BudgetExceeded):
        # An attempt that ran out before committing had no first token either.
        return {"connect": "connect", "ttft": "ttft", "attempt": "ttft", "idle": "idle"}.get(
            failure.phase
        )
    return {"upstream_connect_error": "connect", "upstream_protocol_error": "protocol"}.get(
        failure.code
    )


def overloaded(failure: GatewayError) -> bool:
    """Whether the upstream said it is busy: a 429, or a 503/529 with Retry-After. That is
    load, not an outage: it cools the upstream, never ejects it."""
    if not isinstance(failure, UpstreamStatus):
        return False
    if failure.status == 429:
        return True
    asked = "retry-after" in failure.passed or "retry-after-ms" in failure.passed
    return failure.status in (503, 529) and asked


def upstreams_fault(failure: GatewayError, *, client_gap: bool) -> bool:
    """Whether a failed attempt counts against its upstream for outlier ejection: refused or
    timed-out connects, no token in time, 5xx, nonsense; never a budget the client set, nor
    an upstream's word that it is busy (`overloaded`)."""
    if isinstance(failure, UpstreamStatus):
        return failure.status >= 500 and not overloaded(failure)
    if isinstance(failure, BudgetExceeded):
        return failure.phase in ("connect", "attempt") or (
            failure.phase in ("ttft", "idle") and not client_gap
        )
    return failure.code in ("upstream_connect_error", "upstream_protocol_error")
