"""One upstream: a capped connection pool behind a bounded, fair, deadline-aware queue.

The bulkhead admits at most `max_connections` requests at once, so the HTTP client's own pool
(sized the same) never makes anyone wait: all waiting happens here, where it is counted,
bounded by `max_pending`, and ended by the request's deadline (the caller's cancel scope).

The HTTP client is aiohttp, chosen by measurement (bench/README.md): it costs a third of the
CPU per request of the pure-Python clients. Its session needs a running loop, so `open()` is
called at start-up. Only `connect_s` is timed by the client; every other phase is a cancel
scope of the request's deadline (a read timeout would be a per-read idle gap, not a budget).
"""

from __future__ import annotations

import math
import socket
import time
from collections import deque
from collections.abc import Mapping, Sequence

import aiohttp
import anyio

from gateway.config import UpstreamConfig
from gateway.deadline import clock
from gateway.errors import BudgetExceeded, GatewayError, Overloaded, UpstreamFailed, UpstreamStatus
from gateway.observability import health
from gateway.resilience.attempts import retry_after as asked_retry_after
from gateway.resilience.outlier import OutlierDetector
from gateway.routing import overloaded, upstreams_fault
from gateway.shared.policy import poll_s
from gateway.shared.slots import SlotGate
from gateway.sse import SSEProtocolError
from gateway.tenants.fair_queue import Entry, FairQueue

_RATE_WINDOW = 64  # recent slot releases that estimate a full queue's Retry-After
_RATE_MIN = 8  # releases seen before the expected wait is trusted to refuse a request

# What aiohttp's socket_factory is given: getaddrinfo()'s (family, type, proto, name, address).
_AddrInfo = tuple[int, int, int, str, tuple[object, ...]]


class _Turn:
    """A waiter's place in line: set when it may start, with the bulkhead that served it, the
    shared slot it was given (or the error that ends its wait). A waiter for a pool stands in
    several lines at once (`Bulkhead.first_free`): the first to serve it wins, the others skip
    it."""

    __slots__ = ("by", "error", "event", "slot")

    def __init__(self) -> None:
        self.event = anyio.Event()
        self.by: Bulkhead | None = None
        self.slot: str | None = None
        self.error: Overloaded | None = None


class Bulkhead:
    """At most `limit` holders; waiters served by priority class, then fair share among keys,
    then earliest deadline (gateway.tenants.fair_queue), at most `max_pending` of them. A
    request that could not start before its deadline, at the rate slots are freeing, is
    refused at once rather than after waiting in vain."""

    def __init__(self, *, limit: int, max_pending: int) -> None:
        self.limit = limit
        self.max_pending = max_pending
        self.active = 0
        self._waiters: FairQueue[_Turn] = FairQueue()
        self._released: deque[float] = deque(maxlen=_RATE_WINDOW)  # when slots freed

    @property
    def pending(self) -> int:
        return len(self._waiters)

    @property
    def busy(self) -> int:
        """Slots held: what a balancer weighs against `limit`."""
        return self.active

    async def acquire(
        self, deadline: float = math.inf, *, key: str = "", priority: str = "normal"
    ) -> None:
        """Take a slot, waiting in line if all are busy; shed at once if the line is full
        (or shed a waiter of a lower class in the newcomer's place)."""
        if self.active < self.limit and not self._waiters:
            self.active += 1
            return
        self._make_room(priority)
        self._check_wait(deadline, key, priority)
        turn = _Turn()
        entry = self._waiters.push(turn, deadline=deadline, key=key, priority=priority)
        try:
            await turn.event.wait()
        except BaseException:
            if turn.by is not None:  # handed the slot as we were cancelled: pass it on
                turn.by.release()
            else:
                self._waiters.remove(entry)
            raise
        if turn.error is not None:
            raise turn.error

    def release(self) -> None:
        self._released.append(clock())
        while self._waiters:  # hand the slot straight to the next
            turn = self._waiters.pop()
            if turn.by is None and turn.error is None:  # not served or shed in another line
                turn.by = self
                turn.event.set()
                return
        self.active -= 1

    @staticmethod
    async def first_free(
        bulkheads: Sequence[Bulkhead],
        deadline: float = math.inf,
        *,
        key: str = "",
        priority: str = "normal",
    ) -> Bulkhead:
        """A slot of whichever of `bulkheads` (a pool's members, all full) frees one first: the
        waiter stands in every line at once, in each in its class, key and deadline order,
        and leaves the others when one serves it. Shed at once if every line is full."""
        for bulkhead in bulkheads:
            if bulkhead.active < bulkhead.limit and not bulkhead._waiters:
                bulkhead.active += 1
                return bulkhead
        turn = _Turn()
        lines = [
            (bulkhead, bulkhead._waiters.push(turn, deadline=deadline, key=key, priority=priority))
            for bulkhead in bulkheads
            if len(bulkhead._waiters) < bulkhead.max_pending
        ]
        if not lines:
            raise bulkheads[0]._saturated()
        try:
            await turn.event.wait()
        except BaseException:
            if turn.by is not None:  # served as we were cancelled: pass the slot on
                turn.by.release()
            raise
        finally:
            for bulkhead, entry in lines:
                if bulkhead is not turn.by:
                    bulkhead._waiters.remove(entry)  # a no-op where it was already popped
        if turn.error is not None:
            raise turn.error
        assert turn.by is not None  # set with the event
        return turn.by

    def _make_room(self, priority: str) -> None:
        """The queue is full: shed the newest waiter of the lowest class below `priority`,
        or the newcomer itself. (An entry whose waiter was served in another of its lines
        only leaves.)"""
        while len(self._waiters) >= self.max_pending:
            victim: Entry[_Turn] | None = self._waiters.victim(priority)
            if victim is None:
                raise self._saturated()
            self._waiters.remove(victim)
            if victim.item.by is None and victim.item.error is None:
                victim.item.error = self._saturated()
                victim.item.event.set()

    def _check_wait(self, deadline: float, key: str, priority: str) -> None:
        """504 at once when, at the rate slots have been freeing, the request's turn would
        come after its deadline."""
        if math.isinf(deadline) or len(self._released) < _RATE_MIN:
            return
        span = self._released[-1] - self._released[0]
        if span <= 0:
            return
        per_s = (len(self._released) - 1) / span
        ahead = self._waiters.ahead(deadline=deadline, key=key, priority=priority)
        expected_s = (ahead + 1) / per_s
        if expected_s > deadline - clock():
            raise BudgetExceeded(
                "total",
                f"The request cannot start within its deadline: about {expected_s:.1f}s of "
                f"queue ahead of it at this upstream.",
            )

    def _saturated(self) -> Overloaded:
        return Overloaded(
            "The upstream is at its connection limit and its queue is full.",
            code="upstream_saturated",
            retry_after_s=self._retry_after(),
        )

    def _retry_after(self) -> int:
        """Whole seconds until the queue has likely moved on, from how fast slots free up."""
        if len(self._released) < 2:
            return 1
        span = clock() - self._released[0]
        per_s = len(self._released) / span if span > 0 else math.inf
        return max(1, min(60, math.ceil((self.pending + 1) / per_s)))


class SharedBulkhead(Bulkhead):
    """A bulkhead whose holders each also hold a slot of the cap shared with other processes
    (gateway.shared). The line stays here, earliest deadline first: one dispatcher, running
    while anyone waits, asks the store for as many slots as could start now, hands them to the
    head of the line, and when the store is full waits for word of a freed slot (or polls).
    While the store is down the gate says how to admit (`shared.on_failure`). A release never
    waits on the store; a request already running is never cut."""

    def __init__(self, *, limit: int, max_pending: int, gate: SlotGate) -> None:
        super().__init__(limit=limit, max_pending=max_pending)
        self.gate = gate
        self.slots: list[str] = []  # one per holder; fungible, so release gives back any
        self._dispatching = False
        self._wake = anyio.Event()
        gate.bind(self._wake_up)

    async def acquire(
        self, deadline: float = math.inf, *, key: str = "", priority: str = "normal"
    ) -> None:
        gate = self.gate
        if gate.admission() == "closed":
            raise gate.refusal()
        room = self.active < gate.local_limit(self.limit) and not self._waiters
        if not room:  # the expected wait is not judged: slots free in other processes too
            self._make_room(priority)
        turn = _Turn()
        entry = self._waiters.push(turn, deadline=deadline, key=key, priority=priority)
        if not self._dispatching:
            self._dispatching = True
            gate.start(self._dispatch)
        try:
            await turn.event.wait()
        except BaseException:
            if turn.slot is not None:  # given a slot as we were cancelled: give it back
                self.slots.append(turn.slot)
                self.release()
            elif not turn.event.is_set():
                self._waiters.remove(entry)
                self._wake_up()
            raise
        if turn.error is not None:
            raise turn.error
        assert turn.slot is not None
        self.slots.append(turn.slot)

    @property
    def busy(self) -> int:
        """Slots held here and, as last heard, by every other process of the gateway."""
        return self.active + self.gate.elsewhere(clock())

    def release(self) -> None:
        self._released.append(clock())
        self.active -= 1
        self.gate.give_back(self.slots.pop())
        self._wake_up()

    def _wake_up(self) -> None:
        self._wake.set()

    async def _dispatch(self) -> None:
        gate = self.gate
        try:
            while self._waiters:
                self._wake = wake = anyio.Event()  # set by a release, here or anywhere
                room = min(gate.local_limit(self.limit) - self.active, len(self._waiters))
                if room <= 0:
                    await wake.wait()
                    continue
                admission = gate.admission()
                if admission == "closed":
                    self._end_waits(gate.refusal())
                elif admission != "shared":  # open, or local_share under local_limit
                    self._hand_over([gate.hold_unshared() for _ in range(room)])
                elif (taken := await gate.take(room)) is None:
                    continue  # the store failed just now: admit as on_failure says
                elif taken.slots:
                    self._hand_over(taken.slots)
                elif self.max_pending == 0:  # no line to wait in
                    self._end_waits(self._saturated())
                else:
                    with anyio.move_on_after(poll_s(taken.retry_in_s)):
                        await wake.wait()
        finally:
            self._dispatching = False

    def _hand_over(self, slots: Sequence[str]) -> None:
        for slot in slots:
            if self._waiters:  # someone may have left while the store answered
                turn = self._waiters.pop()
                turn.slot = slot
                self.active += 1
                turn.event.set()
            else:
                self.gate.give_back(slot)

    def _end_waits(self, error: Overloaded) -> None:
        while self._waiters:
            turn = self._waiters.pop()
            turn.error = error
            turn.event.set()


class Upstream:
    def __init__(self, config: UpstreamConfig, gate: SlotGate | None = None) -> None:
        self.config = config
        self.name = config.name
        limit, pending = config.max_connections, config.max_pending
        self.bulkhead = (
            Bulkhead(limit=limit, max_pending=pending)
            if gate is None
            else SharedBulkhead(limit=limit, max_pending=pending, gate=gate)
        )
        self.outlier = OutlierDetector(config.outlier)
        self.usage_unreported = False  # its streams had no usage: logged once (gateway.relay)
        self._base = config.base_url.rstrip("/") + "/"
        auth: dict[str, str] = {}
        if config.api_key and config.kind == "anthropic":
            auth = {"x-api-key": config.api_key}
        elif config.api_key:
            auth = {"authorization": f"Bearer {config.api_key}"}
        self._static = {**dict(config.headers), **auth}  # on every request, after the caller's
        self._session: aiohttp.ClientSession | None = None
        # Our own view of the pool (aiohttp has no public one): every socket the client opened,
        # pruned once closed, and the responses that hold one.
        self._sockets: list[socket.socket] = []
        self._responses = 0

    async def open(self) -> None:
        """Create the HTTP client; needs the running event loop."""
        connector = aiohttp.TCPConnector(
            limit=self.config.max_connections,
            keepalive_timeout=self.config.keepalive_expiry_s,
            socket_factory=self._new_socket,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.config.connect_s),
            cookie_jar=aiohttp.DummyCookieJar(),  # one upstream's cookies are no one's business
            skip_auto_headers=("User-Agent",),
        )

    async def send(self, path: str, body: bytes, headers: dict[str, str]) -> aiohttp.ClientResponse:
        """POST and return once the response headers are in; the caller reads the body, then
        hands the response to `close`."""
        assert self._session is not None, "Upstream.open() was not called"
        url, headers = self._base + path, {**headers, **self._static}
        try:
            response = await self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            )
        except _STALE_CONNECTION as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                raise  # no connection at all: the retry policy's `connect`
            # A pooled connection the upstream closed while it was idle (its keep-alive ran
            # out first: vLLM's is 5 s): the request never reached it. Once more, on a new one.
            response = await self._session.post(
                url, data=body, headers=headers, allow_redirects=False
            )
        self._responses += 1
        return response

    def close(self, response: aiohttp.ClientResponse) -> None:
        """Give the socket back to the pool if the body was read to its end, else close it, so
        the upstream sees the request abandoned (for vLLM that frees the GPU)."""
        self._responses -= 1
        if response.content.is_eof():
            response.release()
        else:
            response.close()

    def report_success(self) -> None:
        if self.outlier.success():
            health.restored(self.name)

    def report_failure(self, failure: GatewayError, *, client_gap: bool) -> None:
        """What a failed attempt says of this upstream: busy (it cools), broken (a step
        towards ejection), or nothing (the caller's own budget, a disconnect)."""
        now = clock()
        if isinstance(failure, UpstreamStatus) and overloaded(failure):
            asked = asked_retry_after(failure.passed, time.time())
            cooling = self.outlier.overloaded(now, asked)
            if cooling is not None:
                health.cooling(self.name, cooling, failure.status)
        elif upstreams_fault(failure, client_gap=client_gap):
            ejection = self.outlier.failure(now)
            if ejection is not None:
                health.ejected(self.name, ejection)
        else:
            self.outlier.neutral()

    def pool_state(self) -> dict[str, int]:
        """Requests admitted and queued, and the client's sockets, for debugging and metrics."""
        self._sockets = [sock for sock in self._sockets if sock.fileno() != -1]
        active = min(self._responses, len(self._sockets))
        state = {
            "admitted": self.bulkhead.active,
            "queued": self.bulkhead.pending,
            "connections_active": active,
            "connections_idle": len(self._sockets) - active,
        }
        if isinstance(self.bulkhead, SharedBulkhead):
            state["shared_slots"] = len(self.bulkhead.gate.held)
        return state

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    def _new_socket(
        self, addr_info: tuple[int, int, int, str, tuple[object, ...]]
    ) -> socket.socket:
        family, kind, proto, _, _ = addr_info
        sock = socket.socket(family=family, type=kind, proto=proto)
        if len(self._sockets) >= 2 * self.config.max_connections:
            self._sockets = [known for known in self._sockets if known.fileno() != -1]
        self._sockets.append(sock)
        return sock


# Upstream response headers a client gets (success and error): rate limits and timings that
# clients and SDKs act on. Never cookies, the upstream's organization, hop-by-hop headers or
# anything naming internal hosts.
_PASSED = ("openai-processing-ms", "retry-after", "retry-after-ms")
_RATE_LIMITS = ("x-ratelimit-", "anthropic-ratelimit-")


def passed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {
        name.lower(): value
        for name, value in headers.items()
        if name.lower() in _PASSED or name.lower().startswith(_RATE_LIMITS)
    }


def mask_secrets(body: bytes, config: UpstreamConfig) -> bytes:
    """An upstream's error body may echo the key we sent it (some do, in "invalid key"
    messages): it never reaches a client."""
    for secret in (config.api_key, *(value for _, value in config.headers)):
        if secret and len(secret) >= 8:
            body = body.replace(secret.encode(), b"***")
    return body


# What talking to an upstream can raise besides our own errors: transport, framing, bad JSON.
# Only the client library's own classes: its timeouts subclass TimeoutError, as does our
# BudgetExceeded, which must pass through untouched.
UPSTREAM_ERRORS = (aiohttp.ClientError, SSEProtocolError, ValueError)


# What sending on a pooled connection the upstream has closed raises, before any answer.
_STALE_CONNECTION = (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)


def map_transport_error(exc: Exception) -> GatewayError:
    """The one place where client and framing exceptions become gateway errors."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return BudgetExceeded("connect", "Timed out connecting to the upstream.")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return UpstreamFailed(
            f"Could not connect to the upstream: {exc}",
            code="upstream_connect_error",
        )
    return UpstreamFailed(
        f"The upstream broke the protocol: {exc or type(exc).__name__}",
        code="upstream_protocol_error",
    )
