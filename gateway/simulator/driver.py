"""The fault driver: sends any protocol's answer with the faults a request asked for."""

from __future__ import annotations

import http
import json
from dataclasses import dataclass

import anyio
from starlette.types import Send

from gateway.simulator.answer import ERROR_AFTER_MESSAGE, Answer, Api, StreamedAnswer, flat_error
from gateway.simulator.asgi import JSON_TYPE, ResetConnection, send_json, send_part
from gateway.simulator.faults import HANG_LIMIT_MS, Faults

_KNOWN = frozenset(http.HTTPStatus)
_SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache")]


async def produce(send: Send, api: Api, answer: Answer, faults: Faults) -> None:
    """Answer after `latency-ms`: the `status` error, a refusal, the stream, or the whole
    answer (the `error-after` error status, if one)."""
    await anyio.sleep(faults.latency_ms / 1000)
    if faults.hang_before_headers:
        await anyio.sleep(HANG_LIMIT_MS / 1000)
    streamed = isinstance(answer, StreamedAnswer) and answer.stream
    if faults.status is not None:
        message = f"simulated HTTP {faults.status} (simulator knob status)"
        await _send_status(send, api, faults, faults.status, message)
    elif (refusal := answer.refusal()) is not None:
        await (_send_refused_stream(send, refusal) if streamed else send_json(send, 400, refusal))
    elif isinstance(answer, StreamedAnswer) and answer.stream:
        await _stream(_Pacer(send, faults, answer.keepalive), answer)
    elif isinstance(answer, StreamedAnswer) and faults.error_after_tokens is not None:
        await anyio.sleep(answer.generation_ms() / 1000)  # what failed in the stream fails here
        await _send_status(send, api, faults, answer.error_status, ERROR_AFTER_MESSAGE)
    else:
        await anyio.sleep(answer.generation_ms() / 1000)  # generated whole before any is sent
        await _send_whole(_Pacer(send, faults, None), answer.body())


async def _send_status(send: Send, api: Api, faults: Faults, status: int, message: str) -> None:
    """An error status: its body in the API's shape, vLLM's flat one, or plain text."""
    retry = [] if faults.retry_after is None else [(b"retry-after", faults.retry_after.encode())]
    if faults.error_body == "text":  # what a crashed server or a proxy in front answers
        text = (http.HTTPStatus(status).phrase if status in _KNOWN else "Error").encode()
        headers = [(b"content-type", b"text/plain; charset=utf-8"), *retry]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": text})
        return
    flat = faults.error_body == "flat"
    error = flat_error(status, message) if flat else api.error(status, message, "sim_error")
    await send_json(send, status, error, *retry)


async def _send_refused_stream(send: Send, refusal: object) -> None:
    """A refused request asked for a stream, as llama.cpp answers it: 200 and one SSE `error:`
    line, which SSE readers ignore, so they see an empty stream."""
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    await send_part(send, b"error: " + json.dumps(refusal).encode() + b"\n\n")
    await send({"type": "http.response.body", "body": b""})


@dataclass(frozen=True)
class _Pacer:
    """The timing faults of one answer: sleeps, keep-alives (`None`: not streaming), hangs."""

    send: Send
    faults: Faults
    keepalive: bytes | None

    async def wait(self, ms: int) -> None:
        """Sleep `ms`, sending a keep-alive every `keepalive-ms` meanwhile if streaming."""
        every = self.faults.keepalive_ms
        if every is None or self.keepalive is None:
            await anyio.sleep(ms / 1000)
            return
        start = anyio.current_time()
        for beat_ms in range(every, ms, every):
            await anyio.sleep_until(start + beat_ms / 1000)
            await send_part(self.send, self.keepalive)
        await anyio.sleep_until(start + ms / 1000)

    async def interrupt(self, *, sent: int, last: int) -> None:
        """Hang and/or drop the connection if the faults say so once `sent` of `last` tokens
        are out."""
        if _due(self.faults.hang_after_tokens, sent, last):
            await self.wait(HANG_LIMIT_MS)
        if _due(self.faults.reset_after_tokens, sent, last):
            raise ResetConnection


def _due(after: int | None, sent: int, last: int) -> bool:
    """Whether a fault set to strike after `after` tokens strikes now (at the end at the latest)."""
    return after is not None and min(after, last) == sent


async def _send_whole(pacer: _Pacer, content: object) -> None:
    faults, send = pacer.faults, pacer.send
    payload = b'{"id": "broken' if faults.malformed == "json" else json.dumps(content).encode()
    if faults.hang_after_tokens is None and faults.reset_after_tokens is None:
        length = (b"content-length", str(len(payload)).encode())
        await send({"type": "http.response.start", "status": 200, "headers": [JSON_TYPE, length]})
    else:
        await send({"type": "http.response.start", "status": 200, "headers": [JSON_TYPE]})
        await pacer.interrupt(sent=0, last=0)
    await send({"type": "http.response.body", "body": payload})


async def _stream(pacer: _Pacer, answer: StreamedAnswer) -> None:
    faults, send = pacer.faults, pacer.send
    await send({"type": "http.response.start", "status": 200, "headers": _SSE})
    if faults.malformed == "sse":
        await send_part(send, answer.malformed)
    await pacer.interrupt(sent=0, last=answer.tokens)  # hang=body, reset=after-headers
    await _send_events(send, answer.preamble())
    sent = await _send_tokens(pacer, answer)
    failed = _due(faults.error_after_tokens, sent, answer.tokens)
    await _send_events(send, [answer.error()] if failed else answer.closing())
    await send({"type": "http.response.body", "body": b""})  # a clean end, even after an error


async def _send_tokens(pacer: _Pacer, answer: StreamedAnswer) -> int:
    """Send the tokens as paced, until the faults interrupt; return how many went out."""
    faults, last = pacer.faults, answer.tokens
    for index in range(last):
        if index:
            await pacer.interrupt(sent=index, last=last)
        if _due(faults.error_after_tokens, index, last):
            return index
        await pacer.wait(faults.gap_ms if index else faults.ttft_ms)
        await _send_events(pacer.send, answer.token(index))
    if last:
        await pacer.interrupt(sent=last, last=last)
    return last


async def _send_events(send: Send, events: list[bytes]) -> None:
    for event in events:
        await send_part(send, event)
