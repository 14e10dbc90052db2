"""A fault-injecting OpenAI-compatible upstream: the test double for gateways and their clients.

Endpoints (relative, so the app also works mounted under a prefix such as `/sim-upstream`):

    POST /v1/chat/completions  POST /v1/completions   stream true or false
    POST /v1/embeddings        GET  /v1/models
    GET  /sim/stats            POST /sim/reset

Answers are shaped like OpenAI's, so the `openai` SDK parses them: completions say
`tok0 tok1 ...`, streams end with a `finish_reason: "stop"` chunk, the usage chunk if
`stream_options.include_usage` is set, and `data: [DONE]`; embeddings are deterministic
8-dimensional vectors (`encoding_format` float or base64). Bad input is a 400 OpenAI envelope.

Faults are chosen per request by `x-sim-<knob>` headers or by a model-name suffix
`<model>@<knob>=<value>,<knob>=<value>` (e.g. `sim@ttft-ms=500,tokens=3`, `demo@hang=headers`).
A header wins over the same knob in the suffix; the echoed `model` is the string as received.
An unknown knob or a bad value is a 400 naming the knob.

    knob          effect (default: off)
    latency-ms    sleep before the response headers, in every mode (default 0)
    ttft-ms       sleep before the first token (default 0): streaming, after the headers and
                  the role-only first chunk; not streaming, before the headers, as a model
                  server generates the whole answer before it sends any of it
    gap-ms        sleep between tokens (default 0), in both modes, the same way
    tokens        completion tokens to produce (default 8)
    tool-calls    answer with this many tool calls instead of text (chat only): call i is
                  `tool_i` with JSON arguments streamed in `tokens` pieces; finish_reason
                  `tool_calls`
    hang          `headers`: never send the headers; `body`: send the 200 headers, then nothing;
                  `after-N`: stream the role-only chunk (chat) and N tokens, then nothing (not
                  streaming: as `body`). A hang
                  lasts until the client goes away, or 600 s and then the answer goes on
    keepalive-ms  streaming: while hanging after the headers or waiting for a token, send the
                  SSE comment `: keep-alive` this often
    status        after `latency-ms`, answer with this status (400-599) and an OpenAI error
                  envelope whose code is `sim_error`
    retry-after   with `status`: the value of a `Retry-After` header
    flaky         with `status`: only the first N requests for this exact model string fail
                  with it; later ones are answered normally (a brown-out that recovers)
    malformed     `json`: a non-streaming 200 whose body is `{"id": "broken`; `sse`: a stream
                  whose first event is `data: {not json}` (each is ignored in the other mode)
    (every answer carries OpenAI's `openai-organization`, `openai-processing-ms`,
    `x-ratelimit-*` and a `set-cookie`, as OpenAI's do)
    close         `true`: answer with `Connection: close`, so the server closes the connection
                  after the response (the client must not reuse it)
    reset         `after-headers`: send the 200 headers, then drop the connection; `after-N`:
                  stream N tokens, then drop it (not streaming: as `after-headers`). The app
                  returns with the response unfinished, so the server closes the connection
                  (uvicorn logs one error line) and the client sees a truncated body: httpx
                  raises `RemoteProtocolError` ("peer closed connection ...").

`GET /sim/stats` returns `open` (POST /v1 requests in progress), `total` (POST /v1 requests
received), `completed` (answered in full, error statuses included), `cancelled` (the client went
away first, in any phase; noticed within milliseconds), `reset` (dropped by the `reset` knob),
`peak_open` (the most requests open at once), `connections` (distinct client sockets seen, by
address and port: 1 for many requests means the client reused its connection), and
`last_headers` (lower-cased) and `last_body` (parsed JSON, or null) of the last POST /v1
request. `POST /sim/reset` zeroes all of it but
`open`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any, Literal

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

HANG_LIMIT_MS = 600_000
MAX_TOKENS = 100_000
EMBEDDING_DIMS = 8
KNOBS = frozenset(
    {"latency-ms", "ttft-ms", "gap-ms", "tokens", "tool-calls", "hang", "keepalive-ms", "status"}
    | {"retry-after", "malformed", "reset", "close", "flaky"}
)

Knobs = Mapping[str, str]
Kind = Literal["chat", "text", "embedding"]
Outcome = Literal["completed", "cancelled", "reset"]
Producer = Callable[[Send], Awaitable[None]]
Header = tuple[bytes, bytes]

_JSON = (b"content-type", b"application/json")
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]
_KEEPALIVE = b": keep-alive\n\n"
# What OpenAI sends with every answer: rate limits a client acts on, and what it must not get
# through a gateway (the organization billed, a cookie).
_OPENAI_HEADERS = [
    (b"openai-organization", b"sim-org"),
    (b"openai-processing-ms", b"7"),
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"set-cookie", b"__sim=1; path=/; HttpOnly"),
]


class FaultError(ValueError):
    """A simulator knob that is unknown or has a bad value; `knob` names it."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(message)
        self.knob = knob


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What to do to one request (see the module docstring); `None` means off."""

    latency_ms: int = 0
    ttft_ms: int = 0
    gap_ms: int = 0
    tokens: int = 8
    tool_calls: int = 0
    hang_before_headers: bool = False
    hang_after_tokens: int | None = None  # hang=body is 0
    keepalive_ms: int | None = None
    status: int | None = None
    retry_after: str | None = None
    malformed: str | None = None  # "json" or "sse"
    reset_after_tokens: int | None = None  # reset=after-headers is 0
    close: bool = False
    flaky: int | None = None


def parse_faults(headers: Mapping[str, str], model: str) -> Faults:
    """The faults asked for by `x-sim-*` headers and the model-name suffix; headers win."""
    knobs = _suffix_knobs(model)
    for name, value in headers.items():
        if name.lower().startswith("x-sim-"):
            knobs[name.lower().removeprefix("x-sim-")] = value.strip()
    unknown = sorted(knobs.keys() - KNOBS)
    if unknown:
        known = ", ".join(sorted(KNOBS))
        raise FaultError(unknown[0], f"unknown simulator knob {unknown[0]!r}; known: {known}")
    if knobs.get("malformed") not in (None, "json", "sse"):
        raise _invalid(knobs, "malformed", "json or sse")
    if knobs.get("close") not in (None, "true", "false"):
        raise _invalid(knobs, "close", "true or false")
    if knobs.get("retry-after") == "":
        raise _invalid(knobs, "retry-after", "a value")
    hang = knobs.get("hang")
    return Faults(
        latency_ms=_int(knobs, "latency-ms", 0),
        ttft_ms=_int(knobs, "ttft-ms", 0),
        gap_ms=_int(knobs, "gap-ms", 0),
        tokens=_int(knobs, "tokens", 8, high=MAX_TOKENS),
        tool_calls=_int(knobs, "tool-calls", 0, high=16),
        hang_before_headers=hang == "headers",
        hang_after_tokens=None if hang == "headers" else _after(knobs, "hang", alias="body"),
        keepalive_ms=_optional_int(knobs, "keepalive-ms", low=1),
        status=_optional_int(knobs, "status", low=400, high=599),
        retry_after=knobs.get("retry-after"),
        malformed=knobs.get("malformed"),
        reset_after_tokens=_after(knobs, "reset", alias="after-headers"),
        close=knobs.get("close") == "true",
        flaky=_optional_int(knobs, "flaky", high=MAX_TOKENS),
    )


def _suffix_knobs(model: str) -> dict[str, str]:
    _, at, suffix = model.rpartition("@")
    if not at or "=" not in suffix:
        return {}
    knobs: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in suffix.split(","))):
        name, equals, value = item.partition("=")
        if not equals:
            raise FaultError(name, f"simulator knob {name!r} in the model suffix has no value")
        knobs[name.strip().lower()] = value.strip()
    return knobs


def _invalid(knobs: Knobs, knob: str, expected: str) -> FaultError:
    return FaultError(knob, f"invalid simulator knob {knob}={knobs[knob]!r}: expected {expected}")


def _optional_int(
    knobs: Knobs, knob: str, *, low: int = 0, high: int = HANG_LIMIT_MS
) -> int | None:
    value = knobs.get(knob)
    if value is None:
        return None
    if value.isascii() and value.isdigit() and low <= int(value) <= high:
        return int(value)
    raise _invalid(knobs, knob, f"an integer from {low} to {high}")


def _int(knobs: Knobs, knob: str, default: int, *, high: int = HANG_LIMIT_MS) -> int:
    value = _optional_int(knobs, knob, high=high)
    return default if value is None else value


def _after(knobs: Knobs, knob: str, *, alias: str) -> int | None:
    """Tokens to send before the fault: `alias` is 0, `after-N` is N, absent is None."""
    value = knobs.get(knob)
    if value is None or value == alias:
        return None if value is None else 0
    count = value.removeprefix("after-")
    if value.startswith("after-") and count.isascii() and count.isdigit():
        return int(count)
    expected = "headers, body or after-N" if knob == "hang" else f"{alias} or after-N"
    raise _invalid(knobs, knob, expected)


@dataclass
class SimulatorStats:
    """Request counters of one simulator app; see the module docstring for their meaning."""

    open: int = 0
    completed: int = 0
    cancelled: int = 0
    reset: int = 0
    total: int = 0
    peak_open: int = 0  # the most requests open at once
    connections: int = 0  # distinct client sockets seen: proves connection reuse
    last_headers: dict[str, str] = field(default_factory=dict)
    last_body: Any = None
    _peers: set[object] = field(default_factory=set, repr=False)
    _flaky: dict[str, int] = field(default_factory=dict, repr=False)  # model -> failures sent

    def flaky_failure(self, model: str, failures: int) -> bool:
        """Whether this request of a `flaky=N` model is one of its first N (and so fails)."""
        sent = self._flaky.get(model, 0)
        if sent >= failures:
            return False
        self._flaky[model] = sent + 1
        return True

    def report(self) -> dict[str, Any]:
        return {name: value for name, value in asdict(self).items() if not name.startswith("_")}

    def clear(self) -> None:
        """Zero everything but `open`, which counts live requests."""
        self.completed = self.cancelled = self.reset = self.total = self.connections = 0
        self._peers.clear()
        self._flaky.clear()
        self.peak_open = self.open
        self.last_headers, self.last_body = {}, None

    def started(self, headers: dict[str, str], peer: object) -> None:
        if peer not in self._peers:
            self._peers.add(peer)
            self.connections += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        self.total += 1
        self.last_headers = headers
        self.last_body = None

    def finished(self, outcome: Outcome) -> None:
        self.open -= 1
        setattr(self, outcome, getattr(self, outcome) + 1)  # each outcome names its counter


class _BadRequest(Exception):
    def __init__(self, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.envelope = _error(message, "invalid_request_error", code, param)


class _ResetConnection(Exception):
    """Raised by a producer to drop the connection with the response unfinished."""


@dataclass(frozen=True, kw_only=True)
class _Job:
    """One valid request: what to answer and which faults to inject."""

    kind: Kind
    model: str
    faults: Faults
    stream: bool
    include_usage: bool
    prompt_tokens: int
    inputs: tuple[str, ...] = ()  # embeddings: one text (or token array as JSON) per vector
    base64: bool = False


def _error(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def _count_tokens(value: object) -> int:
    """A stand-in for tokenising: words of every string, one per integer (token arrays)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, dict):
        value = list(value.values())
    return sum(map(_count_tokens, value)) if isinstance(value, list) else 0


def _embedding_inputs(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        return (json.dumps(value),)
    if isinstance(value, list) and value and all(isinstance(item, str | list) for item in value):
        return tuple(item if isinstance(item, str) else json.dumps(item) for item in value)
    raise _BadRequest("'input' must be a string or a non-empty array", "invalid_request", "input")


def _parse_json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise _BadRequest(f"the request body is not valid JSON: {exc}", "invalid_json") from exc


def _parse_job(kind: Kind, headers: Knobs, body: object) -> _Job:
    if not isinstance(body, dict):
        raise _BadRequest("the request body must be a JSON object", "invalid_request")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("'model' is required and must be a string", "invalid_request", "model")
    try:
        faults = parse_faults(headers, model)
    except FaultError as exc:
        raise _BadRequest(str(exc), "invalid_sim_knob", exc.knob) from exc
    options = body.get("stream_options")
    job = _Job(
        kind=kind,
        model=model,
        faults=faults,
        stream=body.get("stream") is True and kind != "embedding",
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        prompt_tokens=max(1, _count_tokens(body.get("messages" if kind == "chat" else "prompt"))),
    )
    if kind != "embedding":
        return job
    encoding = body.get("encoding_format", "float")
    if encoding not in ("float", "base64"):
        raise _BadRequest("'encoding_format' must be float or base64", "invalid_request")
    inputs = _embedding_inputs(body.get("input"))
    tokens = sum(map(_count_tokens, inputs))
    return replace(job, prompt_tokens=tokens, inputs=inputs, base64=encoding == "base64")


class _Completion:
    """Bodies and stream chunks of one chat or text completion."""

    def __init__(self, job: _Job) -> None:
        self.job = job
        prefix = "chatcmpl" if job.kind == "chat" else "cmpl"
        self.id = f"{prefix}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        calls = job.faults.tool_calls if job.kind == "chat" else 0
        self.arguments = [_arguments(call, job.faults.tokens) for call in range(calls)]
        self.pieces = self._pieces()
        prompt, completion = job.prompt_tokens, len(self.pieces)
        self.usage = {"prompt_tokens": prompt, "completion_tokens": completion}
        self.usage["total_tokens"] = prompt + completion
        self.finish = "tool_calls" if self.arguments else "stop"

    def _pieces(self) -> list[dict[str, Any]]:
        """Each token's delta (chat) or text (completions), in order."""
        if not self.arguments:
            key = "content" if self.job.kind == "chat" else "text"
            return [{key: _token(index)} for index in range(self.job.faults.tokens)]
        pieces = []
        for call, arguments in enumerate(self.arguments):
            count = max(1, self.job.faults.tokens)
            for n in range(count):
                part = arguments[n * len(arguments) // count : (n + 1) * len(arguments) // count]
                tool: dict[str, Any] = {"index": call, "function": {"arguments": part}}
                if n == 0:
                    tool |= {"id": f"call_{call}", "type": "function"}
                    tool["function"]["name"] = f"tool_{call}"
                pieces.append({"tool_calls": [tool]})
        return pieces

    def _head(self, chunk: bool) -> dict[str, Any]:
        chat = "chat.completion.chunk" if chunk else "chat.completion"
        obj = chat if self.job.kind == "chat" else "text_completion"
        head = {"id": self.id, "object": obj, "created": self.created, "model": self.job.model}
        return head | {"system_fingerprint": None}

    def whole(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": self.finish}
        text = "".join(str(piece.get("content", piece.get("text", ""))) for piece in self.pieces)
        if self.job.kind == "text":
            choice["text"] = text
        elif self.arguments:
            calls = [
                {
                    "id": f"call_{call}",
                    "type": "function",
                    "function": {"name": f"tool_{call}", "arguments": arguments},
                }
                for call, arguments in enumerate(self.arguments)
            ]
            choice["message"] = {"role": "assistant", "content": None, "refusal": None}
            choice["message"]["tool_calls"] = calls
        else:
            choice["message"] = {"role": "assistant", "content": text, "refusal": None}
        return self._head(chunk=False) | {"choices": [choice], "usage": self.usage}

    def role_chunk(self) -> dict[str, Any]:
        """What OpenAI sends first, at once: a role and no content (not a token)."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}}
        return self._head(chunk=True) | {"choices": [choice | {"logprobs": None}]}

    def chunk(self, index: int | None) -> dict[str, Any]:
        """The chunk carrying token `index`, or the final one (`index` None)."""
        finish = self.finish if index is None else None
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        piece = {} if index is None else self.pieces[index]
        if self.job.kind == "text":
            choice["text"] = piece.get("text", "")
        else:
            choice["delta"] = piece
        return self._head(chunk=True) | {"choices": [choice]}

    def usage_chunk(self) -> dict[str, Any]:
        return self._head(chunk=True) | {"choices": [], "usage": self.usage}


def _arguments(call: int, tokens: int) -> str:
    words = "".join(_token(index) for index in range(tokens))
    return json.dumps({"call": call, "words": words})


def _token(index: int) -> str:
    return f"tok{index} "


def _embeddings_body(job: _Job) -> dict[str, Any]:
    data = []
    for index, text in enumerate(job.inputs):
        digest = hashlib.sha256(text.encode()).digest()
        vector = [(byte - 128) / 128 for byte in digest[:EMBEDDING_DIMS]]  # exact in float32
        packed = base64.b64encode(struct.pack(f"<{EMBEDDING_DIMS}f", *vector)).decode()
        embedding = packed if job.base64 else vector
        data.append({"object": "embedding", "index": index, "embedding": embedding})
    usage = {"prompt_tokens": job.prompt_tokens, "total_tokens": job.prompt_tokens}
    return {"object": "list", "data": data, "model": job.model, "usage": usage}


async def _send_json(send: Send, status: int, content: object, *extra: Header) -> None:
    payload = json.dumps(content).encode()
    headers = [_JSON, (b"content-length", str(len(payload)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


async def _send_part(send: Send, data: bytes) -> None:
    await send({"type": "http.response.body", "body": data, "more_body": True})


async def _send_event(send: Send, event: Mapping[str, Any]) -> None:
    await _send_part(send, b"data: " + json.dumps(event).encode() + b"\n\n")


async def _wait(send: Send, ms: int, keepalive_ms: int | None) -> None:
    """Sleep `ms`, sending an SSE keep-alive comment every `keepalive_ms` meanwhile if set."""
    if keepalive_ms is None:
        await anyio.sleep(ms / 1000)
        return
    start = anyio.current_time()
    for beat_ms in range(keepalive_ms, ms, keepalive_ms):
        await anyio.sleep_until(start + beat_ms / 1000)
        await _send_part(send, _KEEPALIVE)
    await anyio.sleep_until(start + ms / 1000)


async def _interrupt(send: Send, faults: Faults, *, sent: int, last: int, stream: bool) -> None:
    """Hang and/or drop the connection if the faults say so once `sent` of `last` tokens are out."""
    if faults.hang_after_tokens is not None and min(faults.hang_after_tokens, last) == sent:
        await _wait(send, HANG_LIMIT_MS, faults.keepalive_ms if stream else None)
    if faults.reset_after_tokens is not None and min(faults.reset_after_tokens, last) == sent:
        raise _ResetConnection


async def _send_whole(send: Send, faults: Faults, content: object) -> None:
    payload = b'{"id": "broken' if faults.malformed == "json" else json.dumps(content).encode()
    if faults.hang_after_tokens is None and faults.reset_after_tokens is None:
        length = (b"content-length", str(len(payload)).encode())
        await send({"type": "http.response.start", "status": 200, "headers": [_JSON, length]})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": [_JSON]})
        await _interrupt(send, faults, sent=0, last=0, stream=False)
    await send({"type": "http.response.body", "body": payload})


async def _stream(send: Send, job: _Job) -> None:
    faults, completion = job.faults, _Completion(job)
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    if faults.malformed == "sse":
        await _send_part(send, b"data: {not json}\n\n")
    last = len(completion.pieces)
    await _interrupt(send, faults, sent=0, last=last, stream=True)  # hang=body, reset=after-headers
    if job.kind == "chat":
        await _send_event(send, completion.role_chunk())
    for index in range(last):
        if index:
            await _interrupt(send, faults, sent=index, last=last, stream=True)
        await _wait(send, faults.gap_ms if index else faults.ttft_ms, faults.keepalive_ms)
        await _send_event(send, completion.chunk(index))
    if last:
        await _interrupt(send, faults, sent=last, last=last, stream=True)
    await _send_event(send, completion.chunk(None))
    if job.include_usage:
        await _send_event(send, completion.usage_chunk())
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


async def _produce(send: Send, job: _Job) -> None:
    faults = job.faults
    send = partial(_with_headers, send, _OPENAI_HEADERS)
    if faults.close:
        send = partial(_with_headers, send, [(b"connection", b"close")])
    await anyio.sleep(faults.latency_ms / 1000)
    if faults.hang_before_headers:
        await anyio.sleep(HANG_LIMIT_MS / 1000)
    if faults.status is not None:
        type_ = "server_error" if faults.status >= 500 else "invalid_request_error"
        message = f"simulated HTTP {faults.status} (simulator knob status)"
        retry = (
            [] if faults.retry_after is None else [(b"retry-after", faults.retry_after.encode())]
        )
        await _send_json(send, faults.status, _error(message, type_, "sim_error"), *retry)
    elif job.kind == "embedding":
        await _send_whole(send, faults, _embeddings_body(job))
    elif job.stream:
        await _stream(send, job)
    else:
        completion = _Completion(job)  # generated whole before any of it is sent
        steps = max(0, len(completion.pieces) - 1)
        await anyio.sleep((faults.ttft_ms + steps * faults.gap_ms) / 1000)
        await _send_whole(send, faults, completion.whole())


async def _with_headers(send: Send, extra: list[Header], message: Message) -> None:
    if message["type"] == "http.response.start":
        message = {**message, "headers": [*message["headers"], *extra]}
    await send(message)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body, or None if the client went away first."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _run_until_disconnect(produce: Producer, receive: Receive, send: Send) -> Outcome:
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
        except _ResetConnection:
            outcome = "reset"
        except OSError:  # e.g. uvicorn's ClientDisconnected: the client is gone
            pass
        group.cancel_scope.cancel()
    return outcome


class _Endpoint:
    """A POST /v1 endpoint as a pure ASGI app, so that it sees `http.disconnect` while it works."""

    def __init__(self, kind: Kind, stats: SimulatorStats) -> None:
        self._kind = kind
        self._stats = stats

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {
            key.decode("latin-1").lower(): val.decode("latin-1") for key, val in scope["headers"]
        }
        self._stats.started(headers, tuple(scope.get("client") or ()))
        outcome: Outcome = "cancelled"
        try:
            if (raw := await _read_body(receive)) is not None:
                respond = partial(self._respond, headers, raw)
                outcome = await _run_until_disconnect(respond, receive, send)
        finally:
            self._stats.finished(outcome)
        # On "reset" we return with the response unfinished: the server drops the connection.

    async def _respond(self, headers: Knobs, raw: bytes, send: Send) -> None:
        try:
            self._stats.last_body = body = _parse_json(raw)
            job = _parse_job(self._kind, headers, body)
        except _BadRequest as exc:
            await _send_json(send, 400, exc.envelope)
            return
        flaky = job.faults.flaky
        if flaky is not None and not self._stats.flaky_failure(job.model, flaky):
            job = replace(job, faults=replace(job.faults, status=None))  # recovered
        await _produce(send, job)


async def _models(request: Request) -> JSONResponse:
    model = {"id": "sim", "object": "model", "created": 0, "owned_by": "simulator"}
    return JSONResponse({"object": "list", "data": [model]})


def create_simulator_app() -> Starlette:
    """A new simulator with its own counters, in `app.state.stats`."""
    stats = SimulatorStats()

    async def read_stats(request: Request) -> JSONResponse:
        return JSONResponse(stats.report())

    async def reset_stats(request: Request) -> JSONResponse:
        stats.clear()
        return JSONResponse(stats.report())

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", _Endpoint("chat", stats), methods=["POST"]),
            Route("/v1/completions", _Endpoint("text", stats), methods=["POST"]),
            Route("/v1/embeddings", _Endpoint("embedding", stats), methods=["POST"]),
            Route("/v1/models", _models, methods=["GET"]),
            Route("/sim/stats", read_stats, methods=["GET"]),
            Route("/sim/reset", reset_stats, methods=["POST"]),
        ]
    )
    app.state.stats = stats
    return app
