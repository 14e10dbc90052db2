"""The HTTP server's protocol: uvicorn's httptools protocol with a bound on the time a client
may take to send its request line and headers.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) but not a request whose
headers trickle in a byte at a time, nor a connection that sends nothing at all: a few hundred
of those would hold the process's sockets forever. Here a timer runs from the connection (or
the first byte of the next request on it) until its headers are complete; when it fires, the
connection is closed.
"""

from __future__ import annotations

import asyncio
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


class HeaderTimeoutProtocol(HttpToolsProtocol):
    header_timeout_s: ClassVar[float] = 10.0  # set from `server.header_timeout_s` at start-up
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _headers_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
