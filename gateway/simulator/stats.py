"""The counters every POST /v1 endpoint shares, served at `GET /sim/stats`."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Outcome = Literal["completed", "cancelled", "reset"]


@dataclass
class SimulatorStats:
    """Request counters of one simulator app; see the package docstring for their meaning."""

    open: int = 0
    completed: int = 0
    cancelled: int = 0
    reset: int = 0
    total: int = 0
    peak_open: int = 0  # the most requests open at once
    connections: int = 0  # distinct client sockets seen: proves connection reuse
    last_headers: dict[str, str] = field(default_factory=dict)
    last_body: Any = None
    _peers: set[object] = field(default_factory=set, repr=False)
    _flaky: dict[str, int] = field(default_factory=dict, repr=False)  # model -> failures sent

    def flaky_failure(self, model: str, failures: int) -> bool:
        """Whether this request of a `flaky=N` model is one of its first N (and so fails)."""
        sent = self._flaky.get(model, 0)
        if sent >= failures:
            return False
        self._flaky[model] = sent + 1
        return True

    def report(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if not name.startswith("_")}

    def clear(self) -> None:
        """Zero everything but `open`, which counts live requests."""
        self.completed = self.cancelled = self.reset = self.total = self.connections = 0
        self._peers.clear()
        self._flaky.clear()
        self.peak_open = self.open
        self.last_headers, self.last_body = {}, None

    def started(self, headers: dict[str, str], peer: object) -> None:
        if peer not in self._peers:
            self._peers.add(peer)
            self.connections += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        self.total += 1
        self.last_headers = headers
        self.last_body = None

    def closed(self) -> None:
        """The request's last byte went out (or it ended without one): no longer open."""
        self.open -= 1

    def finished(self, outcome: Outcome) -> None:
        setattr(self, outcome, getattr(self, outcome) + 1)  # each outcome names its counter
