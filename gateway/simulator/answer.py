"""The shape every protocol fills in: an API checks a request and answers it, whole or as a stream
of framed events that the fault driver (`driver.py`) sends, paces and breaks."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

from gateway.simulator.asgi import Header
from gateway.simulator.content import Part
from gateway.simulator.faults import FaultError, Faults, parse_faults

SSE_KEEPALIVE = b": keep-alive\n\n"
ERROR_AFTER_MESSAGE = "simulated overload (simulator knob error-after)"


class BadRequest(Exception):
    """A request the API refuses with a 400; `code` and `param` go where the protocol has them."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def sse_data(content: object) -> bytes:
    return b"data: " + json.dumps(content).encode() + b"\n\n"


def sse_event(name: str, content: object) -> bytes:
    return f"event: {name}\n".encode() + sse_data(content)


def flat_error(status: int, message: str) -> dict[str, Any]:
    """vLLM's error body: flat, typed by exception class, the status as its code."""
    kind = "InternalServerError" if status >= 500 else "BadRequestError"
    return {"object": "error", "message": message, "type": kind, "param": None, "code": status}


def typed_event(type_: str, **fields: object) -> bytes:
    """An `event: <type>` event whose data names its type too, as Anthropic and Responses do."""
    return sse_event(type_, {"type": type_, **fields})


def request_faults(headers: Mapping[str, str], body: object) -> tuple[dict[str, Any], str, Faults]:
    """The checks every API starts with: a JSON object, its `model`, and the faults asked for."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", param="model")
    try:
        return body, model, parse_faults(headers, model)
    except FaultError as exc:
        raise BadRequest(str(exc), "invalid_sim_knob", exc.knob) from exc


class Answer(ABC):
    """One valid request's answer, sent whole."""

    stream = False

    def __init__(self, model: str, faults: Faults) -> None:
        self.model = model
        self.faults = faults

    @abstractmethod
    def body(self) -> object:
        """The non-streaming answer, as JSON."""

    def refusal(self) -> object | None:
        """The 400 body of a request refused once read (a prompt past `context-limit`)."""
        return None

    def generation_ms(self) -> int:
        """How long the model server takes to generate all of it (before it sends any)."""
        return 0


class StreamedAnswer(Answer):
    """An answer made of `parts` (see `content.py`): whole, or streamed token by token.

    A stream is a preamble (`head` and the first part's `open`), one `delta` per token with
    `close` and `open` events where the part changes, then the last `close` and the `tail`.
    """

    keepalive: ClassVar[bytes] = SSE_KEEPALIVE
    error_status: ClassVar[int] = 500  # not streaming, `error-after` answers this status
    malformed: ClassVar[bytes] = b"data: {not json}\n\n"

    def __init__(self, model: str, faults: Faults, *, stream: bool, parts: list[Part]) -> None:
        super().__init__(model, faults)
        self.stream = stream
        self.parts = parts
        self._steps = [(part, n) for part in parts for n in range(len(part.pieces))]

    @property
    def tokens(self) -> int:
        return len(self._steps)

    def generation_ms(self) -> int:
        return self.faults.ttft_ms + max(0, self.tokens - 1) * self.faults.gap_ms

    def preamble(self) -> list[bytes]:
        """What is sent at once, before the first token: the role-only chunk's analogue."""
        return [*self.head(), *self.open(self.parts[0])]

    def token(self, index: int) -> list[bytes]:
        part, n = self._steps[index]
        previous = self._steps[index - 1][0] if index else part
        switch = [] if previous is part else [*self.close(previous), *self.open(part)]
        return [*switch, self.delta(part, n)]

    def closing(self) -> list[bytes]:
        return [*self.close(self.parts[-1]), *self.tail()]

    def head(self) -> list[bytes]:
        return []

    def open(self, part: Part) -> list[bytes]:
        return []

    def close(self, part: Part) -> list[bytes]:
        return []

    @abstractmethod
    def delta(self, part: Part, n: int) -> bytes:
        """The event carrying piece `n` of `part`."""

    @abstractmethod
    def tail(self) -> list[bytes]:
        """The events that end a complete stream."""

    @abstractmethod
    def error(self) -> bytes:
        """The protocol's in-stream error event (the `error-after` knob)."""


class Api(ABC):
    """One endpoint's protocol: its request checks, its answers, its headers and error shape."""

    @abstractmethod
    def parse(self, headers: Mapping[str, str], body: object) -> Answer:
        """The answer to a request, or `BadRequest`."""

    @abstractmethod
    def error(self, status: int, message: str, code: str, param: str | None = None) -> object:
        """The error body answered with `status`."""

    @abstractmethod
    def headers(self) -> list[Header]:
        """The headers the real API sends with every answer."""
