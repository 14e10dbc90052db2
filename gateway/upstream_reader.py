"""Reading an upstream's answer (I/O helpers of the relay): its content events a chunk at a
time, the first token among them, the idle watchdogs that bound the gaps, a bounded error body.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from collections.abc import Callable
from typing import Any, ClassVar

import aiohttp
import anyio

from gateway import jsonbody
from gateway.errors import UpstreamFailed
from gateway.protocols.api import Assembly, EventTranslator, StreamRules
from gateway.sse import DONE, Event, SSEDecoder

MAX_ERROR_BODY = 1024 * 1024


class ContentEvents:
    """The upstream's content events, a chunk's worth at a time, in the client's protocol
    (translated if a translator is given); SSE comments dropped.

    Events are parsed until the first token (garbage is a 502; a role-only chunk, a `ping` or
    `response.created` is not a token, and an error event is the attempt's failure, as it is
    anywhere in a stream being assembled). After it,
    OpenAI streams are relayed as they came, unparsed, unless an assembler needs them; streams
    with a last event of their own (Messages, Responses) stay parsed, to see it and the
    keep-alives that must not count as content.
    """

    def __init__(
        self,
        response: aiohttp.ClientResponse,
        rules: StreamRules,
        *,
        assembler: Assembly | None,
        translator: EventTranslator | None,
        limit: int,
    ) -> None:
        self._content = response.content
        self._rules = rules
        self._left = limit if assembler is not None else None  # bytes an assembly may hold
        self._decoder = SSEDecoder()
        self._assembler = assembler
        self._translator = translator
        self._keep_parsing = assembler is not None or rules.terminal_required
        self._strict = rules.terminal_required or translator is not None
        self._parse = True
        self._reading = False  # waiting for the upstream's next chunk
        self.token_seen = False
        self.live = False  # the last batch had something besides keep-alives
        self.ended = False  # the stream's last event came (`[DONE]`, `message_stop`, ...)
        self.done = False  # ended, or the body did
        self.usage: dict[str, Any] | None = None  # token counts, in OpenAI's names

    async def next_batch(self) -> list[Event] | None:
        """The content events of the next chunk that has any; None at the end of the stream."""
        while not self.done:
            self._reading = True
            try:
                chunk = await self._content.readany()
            finally:
                self._reading = False
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
            if self._translator is not None:
                batch = self._read(self._translate(batch))
            elif self._parse:
                batch = self._read([(event, _parsed(event)) for event in batch])
            else:
                batch = self._cut_at_done(batch)
            if batch:
                return batch
        if self._strict and not self.ended:
            raise UpstreamFailed(
                "The upstream's stream ended before its last event.",
                code="upstream_protocol_error",
            )
        return None

    def interrupt(self, error: Exception) -> bool:
        """End the wait for the upstream's next chunk with `error` (raised by `next_batch`);
        False if nothing is waiting for one. Waking the read costs far less than cancelling
        the task, which matters when thousands of stalls expire at once."""
        if not self._reading:
            return False
        self._content.set_exception(error)
        return True

    async def until_token(self) -> list[Event] | None:
        """Every event up to the chunk with the first token; None if the stream ends first."""
        held: list[Event] = []
        while not self.token_seen:
            batch = await self.next_batch()
            if batch is None or (self.done and not self.token_seen):
                return None
            held.extend(batch)
        return held

    def _translate(self, batch: list[Event]) -> list[tuple[Event, object]]:
        assert self._translator is not None
        pairs: list[tuple[Event, object]] = []
        for event in batch:
            for chunk in self._translator.feed(_parsed(event)):
                data = jsonbody.dumps(chunk)
                pairs.append((Event(raw=b"data: " + data + b"\n\n", data=data), chunk))
            if self._translator.ended:
                pairs.append((DONE, None))
                self.usage = self._translator.usage or None  # whether the client asked or not
                break
        return pairs

    def _read(self, pairs: list[tuple[Event, object]]) -> list[Event]:
        """Note what the parsed events say; the batch up to the stream's last event."""
        rules = self._rules
        self.live = False
        batch: list[Event] = []
        for event, parsed in pairs:
            batch.append(event)
            if event.is_done:
                self.ended = self.done = True
                break
            if (failure := rules.failure(parsed)) is not None:
                if not self.token_seen or self._assembler is not None:
                    raise failure  # an assembled answer is that error, as the plain one is
                self.ended = self.done = True  # passed on as it came: the stream's last words
                break
            if self._assembler is not None:
                self._assembler.feed(parsed)  # its answer has the usage
            elif (usage := rules.usage(parsed)) is not None:
                self.usage = {**(self.usage or {}), **usage}
            self.live = self.live or not rules.is_keepalive(parsed)
            if not self.token_seen and rules.carries_token(parsed):
                self.token_seen = True
            if rules.is_terminal(parsed):
                self.ended = self.done = True
                break
        self._parse = self._keep_parsing or not self.token_seen
        return batch

    def _cut_at_done(self, batch: list[Event]) -> list[Event]:
        """An OpenAI stream after its first token: the batch up to `data: [DONE]`, and the
        usage reported just before it (include_usage), the one parse a relayed stream costs."""
        self.live = True
        for index, event in enumerate(batch):
            if event.is_done:
                self.ended = self.done = True
                self.usage = _last_usage(batch[:index], self._rules) or self.usage
                return batch[: index + 1]
        return batch


def _parsed(event: Event) -> object:
    return None if event.is_done else jsonbody.loads(event.data or b"")


def _last_usage(batch: list[Event], rules: StreamRules) -> dict[str, Any] | None:
    for event in reversed(batch):
        if event.data and b'"usage"' in event.data:
            try:
                return rules.usage(jsonbody.loads(event.data))
            except ValueError:
                return None
    return None


class IdleExpired(Exception):
    """The watchdog's `idle_s` passed while the stream waited for the upstream."""


class IdleWatchdog:
    """Ends a stream when `idle_s` pass without `touch()`: it wakes the wait for the upstream's
    next chunk with IdleExpired (`interrupt`), or, if the stream is busy elsewhere (writing to
    a slow client), cancels `scope`. Relaying an event costs a clock read: the deadline is
    checked, and moved, only when it comes up on the loop's `IdleWatchdogs`."""

    def __init__(
        self,
        scope: anyio.CancelScope,
        idle_s: float,
        interrupt: Callable[[Exception], bool] | None = None,
    ) -> None:
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._scope: anyio.CancelScope | None = scope
        self._interrupt = interrupt
        self._idle_s = idle_s
        self._last = loop.time()
        self.fired = False
        self.stopped = False
        self.max_gap = 0.0  # the longest gap between touches: a stream's worst stall
        self._watchdogs = IdleWatchdogs.of(loop)
        self._watchdogs.add(self, self._last + idle_s)

    @property
    def due(self) -> float:
        return self._last + self._idle_s

    def touch(self) -> float:
        now = self._loop.time()
        if now - self._last > self.max_gap:
            self.max_gap = now - self._last
        self._last = now
        return now

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._scope = self._interrupt = None  # its heap entry may outlive the stream
        if not self.fired:  # a fired one's entry has left the heap
            self._watchdogs.retired()
        if self.fired:
            self.max_gap = max(self.max_gap, self._loop.time() - self._last)

    def fire(self) -> None:
        self.fired = True
        if self._interrupt is not None and self._interrupt(IdleExpired()):
            return
        if self._scope is not None:
            self._scope.cancel()


class IdleWatchdogs:
    """Every idle watchdog of one event loop on one timer: a heap of deadlines read by one
    `call_at`. A deadline that comes up early (the stream was touched since) moves back into
    the heap. Stalls that expire together are ended BATCH at a time, a loop turn each, so
    the requests and events that arrive meanwhile are served between the batches instead of
    after all of them."""

    BATCH = 32
    COMPACT_AT = 1024
    _loops: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, IdleWatchdogs]] = (
        weakref.WeakKeyDictionary()
    )  # one per loop, made on first use: a loop belongs to one thread

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._heap: list[tuple[float, int, IdleWatchdog]] = []
        self._order = itertools.count()  # ties in the heap never compare watchdogs
        self._timer: asyncio.Handle | None = None
        self._timer_at = math.inf
        self._stale = 0  # entries of stopped watchdogs, left in the heap until they come up

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> IdleWatchdogs:
        watchdogs = cls._loops.get(loop)
        if watchdogs is None:
            watchdogs = cls._loops[loop] = cls(loop)
        return watchdogs

    def __len__(self) -> int:
        return len(self._heap)

    def add(self, watchdog: IdleWatchdog, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._order), watchdog))
        if due < self._timer_at:
            self._arm(due)

    def retired(self) -> None:
        """A watchdog stopped. Its entry stays until it comes up, unless stale entries are
        most of a large heap (streams that end long before idle_s, many of them): then the
        heap is rebuilt without them, so it holds about as many entries as live streams."""
        self._stale += 1
        if self._stale > self.COMPACT_AT and self._stale * 2 > len(self._heap):
            self._heap = [entry for entry in self._heap if not entry[2].stopped]
            heapq.heapify(self._heap)
            self._stale = 0

    def _arm(self, at: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._expire)

    def _expire(self) -> None:
        self._timer, self._timer_at = None, math.inf
        heap, now, ended = self._heap, self._loop.time(), 0
        while heap and heap[0][0] <= now:
            _, _, watchdog = heapq.heappop(heap)
            if watchdog.stopped:
                self._stale -= 1
                continue
            due = watchdog.due
            if due > now:  # touched since it was filed
                heapq.heappush(heap, (due, next(self._order), watchdog))
                continue
            watchdog.fire()
            ended += 1
            if ended == self.BATCH and heap and heap[0][0] <= now:
                self._timer, self._timer_at = self._loop.call_soon(self._expire), now
                return
        if heap:
            self._arm(heap[0][0])


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
