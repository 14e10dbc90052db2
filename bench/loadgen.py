"""An open-loop HTTP/1.1 load generator on uvloop with raw asyncio protocols.

    python -m bench.loadgen --url URL --model M --rate R --duration S [--stream]
                            [--until-stdin-closes] [--warmup S]

Request i is due at start + i / rate, whatever happened to the ones before it, and its latency
counts from that scheduled time (or from when it was actually sent, if that was earlier):
a slow answer cannot hold back the next request (no coordinated omission). Every request
takes an idle keep-alive connection or opens a new one, up to `--max-connections`, so the
generator never waits for a free one below that bound. `send_lag` says how late requests
left against their schedule: the generator's own health.

As a command it prints `READY` after its warm-up and, when done (after `--duration`, or when
its standard input closes with `--until-stdin-closes`, at most `--duration`), one JSON line
with the summary. The suite uses it as a background load in its own process; the same
functions (`Target`, `paced`, `closed_loop`, `open_stream`) drive the suite's foreground
measurements.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

import httptools
import uvloop

from bench._common import percentile

MAX_CONNECTIONS = 2000
CONNECT_TIMEOUT_S = 10.0
_DONE = b"data: [DONE]"
_ERROR = b'data: {"error"'
_KEEP_BODY = 4096  # bytes of a non-streaming body (or of an error) kept for checks


@dataclass(slots=True)
class Result:
    """One request. Times are time.monotonic() (CLOCK_MONOTONIC: comparable across
    processes); 0.0 where the event never happened."""

    scheduled: float
    sent: float = 0.0
    done: float = 0.0
    status: int = 0
    events: int = 0  # `data:` content events (not [DONE], not an error event)
    first_event: float = 0.0
    last_event: float = 0.0
    first_data: bytes = b""  # the first content event's data, for its stamps
    done_seen: bool = False  # `data: [DONE]` arrived
    error_event: bytes = b""  # a final `data: {"error": ...}` event, if any
    body: bytes = b""  # the first _KEEP_BODY bytes of a non-streaming body
    failure: str = ""  # a transport failure (connect, reset, parse), if any
    gaps: list[float] | None = None  # set to [] to collect the gaps between content events

    @property
    def start(self) -> float:
        """Where latency counts from: the schedule, or the send if that was earlier."""
        return min(self.scheduled, self.sent) if self.sent else self.scheduled

    @property
    def latency(self) -> float:
        return self.done - self.start

    @property
    def ttft(self) -> float:
        return self.first_event - self.start


class _Connection(asyncio.Protocol):
    """One keep-alive connection, one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.result: Result | None = None
        self.waiter: asyncio.Future[bool] | None = None  # True: reusable afterwards
        self.stream = False
        self.pending = b""
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def send(self, request: bytes, result: Result, *, stream: bool) -> asyncio.Future[bool]:
        assert self.transport is not None
        assert self.waiter is None
        self.result, self.stream, self.pending = result, stream, b""
        self.waiter = asyncio.get_running_loop().create_future()
        result.sent = time.monotonic()
        self.transport.write(request)
        return self.waiter

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(f"bad HTTP response: {exc}")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(f"connection closed: {exc}" if exc else "connection closed by the server")

    # httptools callbacks

    def on_headers_complete(self) -> None:
        if self.result is not None:
            self.result.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        result = self.result
        if result is None:
            return
        if not self.stream or result.status != 200:
            if len(result.body) < _KEEP_BODY:
                result.body += body[: _KEEP_BODY - len(result.body)]
            return
        *events, self.pending = (self.pending + body).split(b"\n\n")
        if not events:
            return
        now = time.monotonic()
        for event in events:
            if event.startswith(_DONE):
                result.done_seen = True
            elif event.startswith(_ERROR):
                result.error_event = event[6:]
            elif event.startswith(b"data:"):
                result.events += 1
                if result.events == 1:
                    result.first_event = now
                    result.first_data = event[6:]
                elif result.gaps is not None:
                    result.gaps.append(now - result.last_event)  # 0.0: came in the same read
                result.last_event = now

    def on_message_complete(self) -> None:
        result, waiter = self.result, self.waiter
        if result is None or waiter is None:
            return
        result.done = time.monotonic()
        self.result = self.waiter = None
        if not waiter.done():
            waiter.set_result(self.parser.should_keep_alive())

    def _fail(self, why: str) -> None:
        result, waiter = self.result, self.waiter
        self.result = self.waiter = None
        if result is not None:
            result.failure = why
            result.done = time.monotonic()
        if waiter is not None and not waiter.done():
            waiter.set_result(False)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True


class Target:
    """Keep-alive connections to one URL: an idle one is reused, else a new one is opened (at
    most `max_connections` at once; beyond that a request waits for one, and its latency,
    counted from its schedule, shows it)."""

    def __init__(self, url: str, max_connections: int = MAX_CONNECTIONS) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"not an http:// URL: {url}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or 80
        self.path = parts.path or "/"
        self.max_connections = max_connections
        self.idle: list[_Connection] = []
        self.open = 0
        self.peak_open = 0
        self.waiters: deque[asyncio.Future[None]] = deque()

    def request(self, body: bytes | None, path: str | None = None) -> bytes:
        """A request, encoded once: POST with a JSON body, or GET without one."""
        head = f"{'POST' if body is not None else 'GET'} {path or self.path} HTTP/1.1\r\n"
        head += f"host: {self.host}:{self.port}\r\n"
        if body is None:
            return (head + "\r\n").encode()
        head += f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        return head.encode() + body

    async def connect(self) -> _Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_Connection, self.host, self.port), CONNECT_TIMEOUT_S
        )
        return protocol

    async def _acquire(self) -> _Connection:
        while True:
            while self.idle:
                connection = self.idle.pop()
                if not connection.closed:
                    return connection
                self.open -= 1
            if self.open < self.max_connections:
                self.open += 1
                self.peak_open = max(self.peak_open, self.open)
                try:
                    return await self.connect()
                except BaseException:
                    self.open -= 1
                    self._wake()
                    raise
            waiter = asyncio.get_running_loop().create_future()
            self.waiters.append(waiter)
            await waiter

    def _release(self, connection: _Connection, reusable: bool) -> None:
        if reusable and not connection.closed:
            self.idle.append(connection)
        else:
            connection.close()
            self.open -= 1
        self._wake()

    def _wake(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def send(self, request: bytes, result: Result, *, stream: bool) -> Result:
        """Send one request on a pooled connection and wait for its whole answer."""
        try:
            connection = await self._acquire()
        except (OSError, TimeoutError) as exc:
            result.failure = f"connect failed: {type(exc).__name__}: {exc}"
            result.done = time.monotonic()
            return result
        reusable = False
        try:
            reusable = await connection.send(request, result, stream=stream)
        finally:
            self._release(connection, reusable)
        return result

    def close(self) -> None:
        for connection in self.idle:
            connection.close()
        self.open -= len(self.idle)
        self.idle.clear()


async def paced(
    target: Target,
    request: bytes,
    *,
    rate: float,
    count: int,
    stream: bool = False,
    stop: asyncio.Event | None = None,
    gaps: bool = False,
) -> list[Result]:
    """Up to `count` requests, request i due at start + i / rate (fewer if `stop` is set
    first); returns when every one sent has answered. With `gaps`, each stream's gaps between
    content events are kept."""
    results: list[Result] = []
    tasks: set[asyncio.Task[Result]] = set()
    start = time.monotonic() + 0.01
    for i in range(count):
        due = start + i / rate
        delay = due - time.monotonic()
        if delay > 0.0005:
            await asyncio.sleep(delay)
        if stop is not None and stop.is_set():
            break
        result = Result(scheduled=due, gaps=[] if gaps else None)
        results.append(result)
        task = asyncio.create_task(target.send(request, result, stream=stream))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    while tasks:
        await asyncio.gather(*tasks)
    return results


async def closed_loop(
    target: Target, request: bytes, *, count: int, concurrency: int, stream: bool = False
) -> list[Result]:
    """`count` requests by `concurrency` workers, each sending its next when its last ended."""
    results: list[Result] = []

    async def worker() -> None:
        while len(results) < count:
            result = Result(scheduled=time.monotonic())
            results.append(result)
            await target.send(request, result, stream=stream)

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return results


async def open_stream(target: Target, request: bytes, result: Result) -> Result:
    """One streaming request on a connection of its own, closed when the answer ends."""
    result.sent = time.monotonic()
    try:
        connection = await target.connect()
    except (OSError, TimeoutError) as exc:
        result.failure = f"connect failed: {type(exc).__name__}: {exc}"
        result.done = time.monotonic()
        return result
    try:
        await connection.send(request, result, stream=True)
    finally:
        connection.close()
    return result


def chat_body(model: str, *, stream: bool = False) -> bytes:
    body = {"model": model, "messages": [{"role": "user", "content": "bench"}], "stream": stream}
    return json.dumps(body).encode()


# --- summaries ---------------------------------------------------------------------------


def ms_stats(values: Iterable[float]) -> dict[str, float]:
    """p50, p99 and max of durations in seconds, as milliseconds ({} when there are none)."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {
        "p50_ms": 1000 * percentile(ordered, 50),
        "p99_ms": 1000 * percentile(ordered, 99),
        "max_ms": 1000 * ordered[-1],
    }


def failures(results: Iterable[Result], expect_status: int) -> dict[str, int]:
    """What went wrong, counted: `HTTP <status>` and transport failures."""
    counts: dict[str, int] = {}
    for r in results:
        why = r.failure or (f"HTTP {r.status}" if r.status != expect_status else "")
        if why:
            key = why if len(why) < 80 else why[:77] + "..."
            counts[key] = counts.get(key, 0) + 1
    return counts


def summary(results: list[Result], *, rate: float, expect_status: int = 200) -> dict[str, Any]:
    ok = [r for r in results if not r.failure and r.status == expect_status]
    return {
        "rate": rate,
        "requests": len(results),
        "ok": len(ok),
        "failures": failures(results, expect_status),
        "latency": ms_stats(r.latency for r in ok),
        "send_lag": ms_stats(max(0.0, r.sent - r.scheduled) for r in results if r.sent),
    }


# --- command -----------------------------------------------------------------------------


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    target = Target(args.url, args.max_connections)
    request = target.request(chat_body(args.model, stream=args.stream))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    if args.until_stdin_closes:
        fd = sys.stdin.fileno()

        def readable() -> None:
            if not os.read(fd, 4096):
                loop.remove_reader(fd)
                stop.set()

        loop.add_reader(fd, readable)
    try:
        if args.warmup > 0:
            count = max(1, int(args.rate * args.warmup))
            await paced(target, request, rate=args.rate, count=count, stream=args.stream)
        sys.stdout.write("READY\n")
        sys.stdout.flush()
        start = time.monotonic()
        count = max(1, int(args.rate * args.duration))
        results = await paced(
            target, request, rate=args.rate, count=count, stream=args.stream, stop=stop
        )
        data = summary(results, rate=args.rate, expect_status=args.expect_status)
        data["elapsed_s"] = time.monotonic() - start
        if args.samples:  # for percentiles over a window the caller picks afterwards
            data["samples"] = [
                [
                    r.scheduled,
                    r.latency if not r.failure and r.status == args.expect_status else None,
                ]
                for r in results
            ]
        data["peak_connections"] = target.peak_open
        return data
    finally:
        target.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__)
    parser.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/v1/chat/...")
    parser.add_argument("--model", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--duration", type=float, required=True, help="seconds (at most)")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds first")
    parser.add_argument("--expect-status", type=int, default=200)
    parser.add_argument("--max-connections", type=int, default=MAX_CONNECTIONS)
    parser.add_argument(
        "--until-stdin-closes", action="store_true", help="stop early when stdin closes"
    )
    parser.add_argument(
        "--samples",
        action="store_true",
        help="add every request's [scheduled, latency_s] (CLOCK_MONOTONIC) to the summary",
    )
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0:
        parser.error("--rate and --duration must be positive")
    with contextlib.suppress(KeyboardInterrupt):
        data = uvloop.run(_run(args))
        sys.stdout.write(json.dumps(data) + "\n")
        return 0
    return 130


if __name__ == "__main__":
    sys.exit(main())
