"""ASGI plumbing: sending answers piece by piece and noticing the client going away."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import anyio
from starlette.types import Message, Receive, Send

from gateway.simulator.stats import Outcome

Header = tuple[bytes, bytes]
Producer = Callable[[Send], Awaitable[None]]

JSON_TYPE = (b"content-type", b"application/json")


class ResetConnection(Exception):
    """Raised by a producer to drop the connection with the response unfinished."""


async def send_json(send: Send, status: int, content: object, *extra: Header) -> None:
    await send_body(send, status, json.dumps(content).encode(), *extra)


async def send_body(send: Send, status: int, payload: bytes, *extra: Header) -> None:
    headers = [JSON_TYPE, (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def send_part(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def with_headers(send: Send, extra: list[Header], message: Message) -> None:
    """`send` with `extra` headers added to the response start (bind with `partial`)."""
    if message["type"] == "http.response.start":
        message = {**message, "headers": [*message["headers"], *extra]}
    await send(message)


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def run_until_disconnect(produce: Producer, receive: Receive, send: Send) -> Outcome:
    """Run `produce`, cancelling it as soon as the client goes away, and say how it ended.

    The watcher stops once the final body message is on its way: after it, servers answer
    `receive()` with `http.disconnect` at once, which is not the client leaving.
    """
    finishing = False
    outcome: Outcome = "cancelled"

    async def tracked_send(message: Message) -> None:
        nonlocal finishing
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            finishing = True
        await send(message)

    async def watch(scope: anyio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        if not finishing:
            scope.cancel()

    async with anyio.create_task_group() as group:
        group.start_soon(watch, group.cancel_scope)
        try:
            await produce(tracked_send)
            outcome = "completed"
        except ResetConnection:
            outcome = "reset"
        except OSError:  # e.g. uvicorn's ClientDisconnected: the client is gone
            pass
        group.cancel_scope.cancel()
    return outcome
