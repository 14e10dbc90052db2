"""The HTTP server's protocol: uvicorn's httptools protocol with a bound on the time a client
may take to send its request line and headers, and the OpenAI error envelope for requests the
HTTP parser itself refuses (bad bytes in a header, ambiguous framing), which uvicorn answers
in plain text.

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

from gateway.errors import BadRequest

_REFUSED = BadRequest(
    "The request is not valid HTTP (bad bytes in its request line or headers, or an "
    "ambiguous length).",
    code="invalid_request",
).body()


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

    def send_400_response(self, msg: str) -> None:
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\n"
            b"x-should-retry: false\r\nconnection: close\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(_REFUSED), _REFUSED)
        )
        self.transport.close()

    def _headers_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()
