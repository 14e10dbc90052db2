"""Reading an upstream's answer (I/O helpers of the relay): its content events a chunk at a
time, the first token among them, the idle watchdog that bounds the gaps, a bounded error body.
"""

from __future__ import annotations

import asyncio

import aiohttp
import anyio

from gateway import jsonbody
from gateway.openai_stream import Assembler, carries_token
from gateway.sse import Event, SSEDecoder

MAX_ERROR_BODY = 1024 * 1024


class ContentEvents:
    """The upstream's content events, a chunk's worth at a time; keep-alive comments dropped.

    Events are parsed until the first token (garbage is a 502, and a role-only chunk is not a
    token); after it they are relayed as they came, unparsed, unless an assembler needs them.
    """

    def __init__(
        self, response: aiohttp.ClientResponse, assembler: Assembler | None, limit: int
    ) -> None:
        self._content = response.content
        self._left = limit if assembler is not None else None  # bytes an assembly may hold
        self._decoder = SSEDecoder()
        self._assembler = assembler
        self._parse = True
        self.token_seen = False
        self.done = False  # `data: [DONE]` or the end of the body

    async def next_batch(self) -> list[Event] | None:
        """The content events of the next chunk that has any; None at the end of the stream."""
        while not self.done:
            chunk = await self._content.readany()
            if chunk:
                if self._left is not None:
                    self._left -= len(chunk)
                    if self._left < 0:
                        raise ResponseTooLarge("the streamed answer exceeds max_response_bytes")
                events = self._decoder.feed(chunk)
            else:
                self.done = True
                events = self._decoder.flush()
            batch = [event for event in events if event.is_content]
            if batch:
                if self._parse:
                    self._read(batch)
                return batch
        return None

    async def until_token(self) -> list[Event] | None:
        """Every event up to the chunk with the first token; None if the stream ends first."""
        held: list[Event] = []
        while not self.token_seen:
            batch = await self.next_batch()
            if batch is None or (self.done and not self.token_seen):
                return None
            held.extend(batch)
        return held

    def _read(self, batch: list[Event]) -> None:
        for event in batch:
            if event.is_done:
                self.done = True
                return
            parsed = jsonbody.loads(event.data or b"")
            if self._assembler is not None:
                self._assembler.feed(parsed)
            if not self.token_seen and carries_token(parsed):
                self.token_seen = True
        self._parse = self._assembler is not None or not self.token_seen


def until_done(batch: list[Event]) -> bytes | None:
    """The batch's bytes up to and including `data: [DONE]`, if it has that event."""
    for index, event in enumerate(batch):
        if event.is_done:
            return b"".join(e.raw for e in batch[: index + 1])
    return None


class IdleWatchdog:
    """Cancels `scope` when `idle_s` pass without `touch()`: one timer handle per stream,
    re-armed only when it fires early, so relaying an event costs a clock read."""

    def __init__(self, scope: anyio.CancelScope, idle_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._scope = scope
        self._idle_s = idle_s
        self._last = self._loop.time()
        self._timer = self._loop.call_at(self._last + idle_s, self._check)
        self.fired = False
        self.max_gap = 0.0  # the longest gap between touches: a stream's worst stall

    def touch(self) -> float:
        now = self._loop.time()
        if now - self._last > self.max_gap:
            self.max_gap = now - self._last
        self._last = now
        return now

    def stop(self) -> None:
        self._timer.cancel()
        if self.fired:
            self.max_gap = max(self.max_gap, self._loop.time() - self._last)

    def _check(self) -> None:
        due = self._last + self._idle_s
        if self._loop.time() >= due:
            self.fired = True
            self._scope.cancel()
        else:
            self._timer = self._loop.call_at(due, self._check)


class ResponseTooLarge(ValueError):
    """An upstream answer past `max_response_bytes`: a protocol error, not a memory leak."""


async def read_whole(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, refused as soon as it is known to exceed `limit` (decompressed)."""
    if response.content_length is not None and response.content_length > limit:
        raise ResponseTooLarge(f"the answer's Content-Length exceeds max_response_bytes ({limit})")
    chunks: list[bytes] = []
    size = 0
    while chunk := await response.content.readany():
        size += len(chunk)
        if size > limit:
            raise ResponseTooLarge(f"the answer exceeds max_response_bytes ({limit})")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_limited(response: aiohttp.ClientResponse) -> bytes:
    body = b""
    while len(body) <= MAX_ERROR_BODY:
        chunk = await response.content.readany()
        if not chunk:
            return body
        body += chunk
    return body[:MAX_ERROR_BODY]
