"""Graceful shutdown (SIGTERM): stop being ready at once, let the work in flight finish for
`server.shutdown_grace_s` while the listener keeps serving, then end what is left with a clear
`shutting_down` (a terminal SSE error event for a stream, a 503 otherwise), cancelling its
upstream request, and only then let the server stop.

    SIGTERM ─► draining: /readyz 503, requests still served
           ─► grace over (or nothing in flight) ─► cut: what is left ends `shutting_down`
           ─► the server exits (one access line per request, no traceback)
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType

import anyio

from gateway.inflight import Inflight
from gateway.observability import logs

_SETTLE_S = 2.0  # for the last words of the requests that were cut
LOG = logging.getLogger("gateway.lifecycle")


class Lifecycle:
    def __init__(self, inflight: Inflight, grace_s: float) -> None:
        self.inflight = inflight
        self.grace_s = grace_s
        self.draining = False  # SIGTERM seen: not ready, still serving
        self.cut = False  # the grace is over: new requests are refused
        self._loop: asyncio.AbstractEventLoop | None = None

    def started(self) -> None:
        """Called in the server's loop at start-up, after the server set its own signal
        handlers: SIGTERM now drains first, then hands over to the server's handler (a second
        SIGTERM, or SIGINT, stops at once)."""
        self._loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            return  # signals are the main thread's (a server run in a thread, as in tests)
        server_handler = signal.getsignal(signal.SIGTERM)
        if not callable(server_handler):
            return

        def on_sigterm(sig: int, frame: FrameType | None) -> None:
            if self.draining:
                server_handler(sig, frame)
            else:
                self.begin(lambda: server_handler(sig, frame))

        signal.signal(signal.SIGTERM, on_sigterm)

    def begin(self, then: Callable[[], None]) -> None:
        """Start draining (callable from a signal handler); `then` stops the server after."""
        self.draining = True
        if self._loop is None:
            then()
            return
        loop = self._loop
        loop.call_soon_threadsafe(lambda: loop.create_task(self._drain(then)))

    async def _drain(self, then: Callable[[], None]) -> None:
        inflight = self.inflight
        ended_before = inflight.ended
        logs.event(
            LOG,
            logging.WARNING,
            {"event": "drain_started", "in_flight": len(inflight), "grace_s": self.grace_s},
        )
        with anyio.move_on_after(self.grace_s):
            await inflight.wait_empty()
        self.cut = True
        finished = inflight.ended - ended_before
        left = inflight.exchanges()
        for exchange in left:
            exchange.shut_down()
        with anyio.move_on_after(_SETTLE_S):
            await inflight.wait_empty()
        logs.event(
            LOG, logging.INFO, {"event": "drain_ended", "finished": finished, "cut": len(left)}
        )
        then()
