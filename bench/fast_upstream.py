"""A minimal OpenAI-shaped upstream that is not the bottleneck: raw asyncio on uvloop.

    python -m bench.fast_upstream --port P [--host 127.0.0.1]

One process, one `asyncio.Protocol` per connection, `httptools` for parsing, HTTP/1.1
keep-alive, responses built once. The behaviour is chosen by the body's `model`:

    fast                  non-streaming `chat.completion` (Content-Length)
    stream-NxGms          with `"stream": true`: N `chat.completion.chunk` events G ms apart
                          (chunked `text/event-stream`), then `data: [DONE]`; without it,
                          the non-streaming answer. `fast` with `"stream": true` is 50x1ms.
    stall-Kms             one content event, then only `: keep-alive` comments every K ms
                          until the client closes (its content event carries
                          `"bench_sent_ns"`: this process's CLOCK_MONOTONIC at the send)
    hang                  reads the request, never answers, until the client closes

Control (GET or POST, any other path answers GET with 200 `{"status": "ok"}`):

    /control/hold         from now on a `stall` stream sends its headers and keep-alive
                          comments but holds back its content event ...
    /control/release      ... until this: every held stream sends it at once; holding ends
                          (`?spread_ms=S`: one after another, spread evenly over S ms)
    /control/stats        JSON: requests, open connections and streams, `held`, the age of
                          the oldest held stream, `stall_arrived` (stall requests so far)

Timers are `loop.call_later` callbacks, one per open stream, never a task per event.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import cast

import httptools
import orjson
import uvloop

_CREATED = 1_700_000_000
_KEEPALIVE_CHUNK = b"e\r\n: keep-alive\n\n\r\n"
# A stream ends as OpenAI's do: a chunk with the finish_reason, then [DONE].
_FINISH = (
    b'data: {"id":"chatcmpl-bench","object":"chat.completion.chunk","created":0,'
    b'"model":"bench","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)
_DONE_CHUNK = b"%x\r\n%s\r\n0\r\n\r\n" % (len(_FINISH), _FINISH)
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
_STREAM = re.compile(r"stream-(\d+)x(\d+(?:\.\d+)?)ms")
_STALL = re.compile(r"stall(?:-(\d+(?:\.\d+)?)ms)?")
DEFAULT_EVENTS, DEFAULT_GAP_MS, DEFAULT_KEEPALIVE_MS = 50, 1.0, 500.0


@dataclass(frozen=True, slots=True)
class Behaviour:
    kind: str  # "fast", "stream", "stall" or "hang"
    events: int = 0
    gap_s: float = 0.0


def parse_model(model: str, stream: bool) -> Behaviour | None:
    """The behaviour a model name asks for (None: unknown model)."""
    if model == "hang":
        return Behaviour("hang")
    if m := _STALL.fullmatch(model):
        return Behaviour("stall", 1, float(m.group(1) or DEFAULT_KEEPALIVE_MS) / 1000)
    m = _STREAM.fullmatch(model)
    if m is None and model != "fast":
        return None
    if not stream:
        return Behaviour("fast")
    if m is None:
        return Behaviour("stream", DEFAULT_EVENTS, DEFAULT_GAP_MS / 1000)
    return Behaviour("stream", int(m.group(1)), float(m.group(2)) / 1000)


def _response(status: str, body: bytes, keep_alive: bool = True) -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
    return head.encode() + (b"" if keep_alive else b"connection: close\r\n") + b"\r\n" + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def _completion(model: str) -> bytes:
    body = {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": _CREATED,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }
    return _response("200 OK", orjson.dumps(body))


def _content_event(model: str, **extra: int) -> bytes:
    chunk = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": _CREATED,
        "model": model,
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
        **extra,
    }
    return b"data: " + orjson.dumps(chunk) + b"\n\n"


_OK = _response("200 OK", b'{"status": "ok"}')
_NOT_FOUND = _response(
    "404 Not Found",
    b'{"error": {"message": "unknown model", "type": "invalid_request_error", '
    b'"param": "model", "code": "model_not_found"}}',
)
_BAD_REQUEST = _response(
    "400 Bad Request",
    b'{"error": {"message": "bad JSON body", "type": "invalid_request_error", '
    b'"param": null, "code": "invalid_json"}}',
    keep_alive=False,
)


class State:
    """What every connection of this process shares: caches, held streams, counters."""

    def __init__(self) -> None:
        self.completions: dict[str, bytes] = {}
        self.events: dict[str, bytes] = {}
        self.behaviours: dict[tuple[str, bool], Behaviour | None] = {}
        self.holding = False
        self.held: dict[Connection, float] = {}  # held stall stream -> when it was held
        self.requests = 0
        self.open_connections = 0
        self.open_streams = 0
        self.stall_arrived = 0

    def completion(self, model: str) -> bytes:
        cached = self.completions.get(model)
        if cached is None:
            cached = self.completions[model] = _completion(model)
        return cached

    def event_chunk(self, model: str) -> bytes:
        cached = self.events.get(model)
        if cached is None:
            cached = self.events[model] = _chunk(_content_event(model))
        return cached

    def behaviour(self, model: str, stream: bool) -> Behaviour | None:
        key = (model, stream)
        if key not in self.behaviours:
            self.behaviours[key] = parse_model(model, stream)
        return self.behaviours[key]

    def release(self, spread_s: float = 0.0) -> None:
        self.holding = False
        held, self.held = list(self.held), {}
        if spread_s <= 0 or len(held) < 2:
            for connection in held:
                connection.send_stall_event()
            return
        loop = asyncio.get_running_loop()
        for i, connection in enumerate(held):
            loop.call_later(i * spread_s / (len(held) - 1), connection.send_stall_event)

    def stats(self) -> bytes:
        now = time.monotonic()
        oldest = min(self.held.values(), default=now)
        return orjson.dumps(
            {
                "requests": self.requests,
                "open_connections": self.open_connections,
                "open_streams": self.open_streams,
                "holding": self.holding,
                "held": len(self.held),
                "oldest_held_s": now - oldest,
                "stall_arrived": self.stall_arrived,
            }
        )


class Connection(asyncio.Protocol):
    """One client connection: parse requests, answer one at a time (pipelined ones wait)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.loop = asyncio.get_running_loop()
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.pending: list[tuple[bytes, bytes, bytes, bool]] = []
        self.busy = False
        self.keep_alive = True
        self.timer: asyncio.TimerHandle | None = None
        self.model = ""
        self.left = 0
        self.gap_s = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.state.open_connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(_BAD_REQUEST)
            self._close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state.open_connections -= 1
        if self.busy:
            self.state.open_streams -= 1
        self.busy = False
        self.state.held.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.transport = None

    # httptools callbacks

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method: bytes = self.parser.get_method()
        request = (method, self.url, b"".join(self.body), self.parser.should_keep_alive())
        if self.busy:
            self.pending.append(request)
        else:
            self._handle(*request)

    # requests

    def _handle(self, method: bytes, url: bytes, body: bytes, keep_alive: bool) -> None:
        self.state.requests += 1
        self.keep_alive = keep_alive
        if url.startswith(b"/control/"):
            self._control(url)
        elif method != b"POST":
            self._write(_OK)
        else:
            self._post(body)
        if not keep_alive and not self.busy:
            self._close()

    def _control(self, url: bytes) -> None:
        if url == b"/control/hold":
            self.state.holding = True
            self._write(_OK)
        elif url.startswith(b"/control/release"):
            spread = re.search(rb"[?&]spread_ms=(\d+(?:\.\d+)?)", url)
            self.state.release(float(spread.group(1)) / 1000 if spread else 0.0)
            self._write(_OK)
        elif url == b"/control/stats":
            self._write(_response("200 OK", self.state.stats()))
        else:
            self._write(_NOT_FOUND)

    def _post(self, body: bytes) -> None:
        try:
            payload = orjson.loads(body)
            model = payload["model"]
            stream = payload.get("stream") is True
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self._write(_BAD_REQUEST)
            self._close()
            return
        behaviour = self.state.behaviour(model, stream) if isinstance(model, str) else None
        if behaviour is None:
            self._write(_NOT_FOUND)
        elif behaviour.kind == "fast":
            self._write(self.state.completion(model))
        else:
            self._start_stream(model, behaviour)

    def _start_stream(self, model: str, behaviour: Behaviour) -> None:
        self.busy = True
        self.state.open_streams += 1
        self.model = model
        if behaviour.kind == "hang":
            return
        self._write(_SSE_HEAD)
        self.gap_s = behaviour.gap_s
        if behaviour.kind == "stall":
            self.state.stall_arrived += 1
            if self.state.holding:
                self.state.held[self] = time.monotonic()
                self._keepalive()
            else:
                self.send_stall_event()
            return
        self.left = behaviour.events
        self._next_event()

    def _next_event(self) -> None:
        self.timer = None
        if self.transport is None:
            return
        if self.left > 0:
            self.left -= 1
            self.transport.write(self.state.event_chunk(self.model))
            self.timer = self.loop.call_later(self.gap_s, self._next_event)
            return
        self.transport.write(_DONE_CHUNK)
        self._end_stream()

    def send_stall_event(self) -> None:
        """The stall stream's one content event, stamped with the send time; then comments."""
        if self.transport is None:
            return  # the client went while its event was due
        if self.timer is not None:
            self.timer.cancel()
        event = _content_event(self.model, bench_sent_ns=time.monotonic_ns())
        self._write(_chunk(event))
        self.timer = self.loop.call_later(self.gap_s, self._keepalive)

    def _keepalive(self) -> None:
        if self.transport is not None:
            self.transport.write(_KEEPALIVE_CHUNK)
            self.timer = self.loop.call_later(self.gap_s, self._keepalive)

    def _end_stream(self) -> None:
        self.busy = False
        self.state.open_streams -= 1
        if not self.keep_alive:
            self._close()
            return
        while self.pending and not self.busy and self.transport is not None:
            self._handle(*self.pending.pop(0))

    def _write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.write(data)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    state = State()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    server = await loop.create_server(lambda: Connection(state), sock=sock, backlog=65535)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fast_upstream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args(argv)
    uvloop.run(serve(args.host, args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
