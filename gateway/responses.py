"""Writing responses to the ASGI `send` channel."""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import Send

from gateway.errors import GatewayError
from gateway.protocols.api import ErrorFormat
from gateway.protocols.openai import OpenAIErrors


class ClientGone(Exception):
    """Sending to the client failed: it went away."""


class ResponseWriter:
    def __init__(self, send: Send, errors: ErrorFormat | None = None) -> None:
        self._send = send
        self.errors = errors or OpenAIErrors()  # the shape of the endpoint's errors
        self.started = False  # the status line went out: errors can only be SSE events now

    async def start(self, status: int, headers: Mapping[str, str]) -> None:
        raw = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()]
        self.started = True
        await self._emit({"type": "http.response.start", "status": status, "headers": raw})

    async def body(self, chunk: bytes, *, more: bool = True) -> None:
        await self._emit({"type": "http.response.body", "body": chunk, "more_body": more})

    async def whole(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        await self.start(status, {**headers, "content-length": str(len(body))})
        await self.body(body, more=False)

    async def error(self, error: GatewayError, headers: Mapping[str, str]) -> None:
        base = {"content-type": "application/json", **headers}
        await self.whole(error.status, {**base, **error.headers()}, self.errors.body(error))

    async def _emit(self, message: dict[str, object]) -> None:
        try:
            await self._send(message)
        except OSError as exc:  # uvicorn's ClientDisconnected is an OSError
            raise ClientGone from exc
