"""One upstream: a capped connection pool behind a bounded, FIFO, deadline-aware queue.

The bulkhead admits at most `max_connections` requests at once, so the HTTP client's own pool
(sized the same) never makes anyone wait: all waiting happens here, where it is counted,
bounded by `max_pending`, and ended by the request's deadline (the caller's cancel scope).
"""

from __future__ import annotations

from collections import deque
from typing import Any

import anyio
import httpx2 as httpx

from gateway.config import UpstreamConfig
from gateway.errors import BudgetExceeded, GatewayError, Overloaded, UpstreamFailed
from gateway.sse import SSEProtocolError


class Bulkhead:
    def __init__(self, *, limit: int, max_pending: int) -> None:
        self.limit = limit
        self.max_pending = max_pending
        self.active = 0
        self._waiters: deque[anyio.Event] = deque()

    @property
    def pending(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        """Take a slot, waiting in line if all are busy; shed at once if the line is full."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        if len(self._waiters) >= self.max_pending:
            raise Overloaded(
                "The upstream is at its connection limit and its queue is full.",
                code="upstream_saturated",
            )
        turn = anyio.Event()
        self._waiters.append(turn)
        try:
            await turn.wait()
        except BaseException:
            if turn.is_set():  # the slot was handed over as we were cancelled: pass it on
                self.release()
            else:
                self._waiters.remove(turn)
            raise

    def release(self) -> None:
        if self._waiters:
            self._waiters.popleft().set()  # hand the slot straight to the next in line
        else:
            self.active -= 1


class Upstream:
    def __init__(
        self, config: UpstreamConfig, *, transport: httpx.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.name = config.name
        self.bulkhead = Bulkhead(limit=config.max_connections, max_pending=config.max_pending)
        self.client = httpx.AsyncClient(
            base_url=config.base_url + "/",
            transport=transport,
            limits=httpx.Limits(
                max_connections=config.max_connections,
                max_keepalive_connections=config.max_connections,
                keepalive_expiry=config.keepalive_expiry_s,
            ),
            # Only connect is timed by the client; every other phase is a cancel scope of the
            # request's deadline (a read timeout would be a per-read idle gap, not a budget).
            timeout=httpx.Timeout(None, connect=config.connect_s),
            follow_redirects=False,
            trust_env=False,
        )

    def build_request(self, path: str, body: bytes, headers: dict[str, str]) -> httpx.Request:
        if self.config.api_key:
            headers = {**headers, "authorization": f"Bearer {self.config.api_key}"}
        return self.client.build_request("POST", path, content=body, headers=headers)

    async def send(self, request: httpx.Request) -> httpx.Response:
        """Send and return once the response headers are in; the body is read by the caller."""
        return await self.client.send(request, stream=True)

    def pool_state(self) -> dict[str, int]:
        """Requests admitted and queued, and the client's sockets, for debugging and metrics."""
        connections = _pool_connections(self.client)
        idle = sum(1 for connection in connections if connection.is_idle())
        return {
            "admitted": self.bulkhead.active,
            "queued": self.bulkhead.pending,
            "connections_active": len(connections) - idle,
            "connections_idle": idle,
        }

    async def aclose(self) -> None:
        await self.client.aclose()


def _pool_connections(client: httpx.AsyncClient) -> list[Any]:
    # httpx has no public view of its pool; the transport we create always has one.
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    return list(getattr(pool, "connections", []))


async def close_response(response: httpx.Response) -> None:
    """Close an upstream response whatever state we are in: shielded, bounded."""
    with anyio.move_on_after(1, shield=True):
        await response.aclose()


# What talking to an upstream can raise besides our own errors: transport, framing, bad JSON.
UPSTREAM_ERRORS = (httpx.HTTPError, httpx.StreamError, SSEProtocolError, ValueError)


def map_transport_error(exc: Exception) -> GatewayError:
    """The one place where client and framing exceptions become gateway errors."""
    if isinstance(exc, httpx.ConnectTimeout):
        return BudgetExceeded("connect", "Timed out connecting to the upstream.")
    if isinstance(exc, httpx.PoolTimeout):
        return BudgetExceeded("pool", "Timed out waiting for an upstream connection.")
    if isinstance(exc, httpx.ConnectError):
        return UpstreamFailed(
            f"Could not connect to the upstream: {exc}", code="upstream_connect_error"
        )
    return UpstreamFailed(
        f"The upstream broke the protocol: {exc or type(exc).__name__}",
        code="upstream_protocol_error",
    )
