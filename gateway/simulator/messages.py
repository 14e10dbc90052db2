"""Anthropic's Messages API, POST /v1/messages: strict request checks, answers, `event:` streams."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import Any

from gateway.simulator.answer import (
    Answer,
    Api,
    BadRequest,
    StreamedAnswer,
    request_faults,
    typed_event,
)
from gateway.simulator.asgi import Header
from gateway.simulator.content import Part, count_tokens, make_parts
from gateway.simulator.faults import Faults
from gateway.simulator.messages_request import check_request

PING = typed_event("ping")
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
}


class MessagesApi(Api):
    """Anthropic's error shape and headers, and its request checks."""

    def parse(self, headers: Mapping[str, str], body: object) -> Answer:
        if "anthropic-version" not in headers:
            raise BadRequest("anthropic-version: header is required")
        body, model, faults = request_faults(headers, body)
        check_request(body)
        prompt = count_tokens([body["messages"], body.get("system")])
        stream, max_tokens = body.get("stream") is True, body["max_tokens"]
        return Message(model, faults, stream=stream, max_tokens=max_tokens, prompt_tokens=prompt)

    def error(self, status: int, message: str, code: str, param: str | None = None) -> object:
        default = "api_error" if status >= 500 else "invalid_request_error"
        error = {"type": _ERROR_TYPES.get(status, default), "message": message}
        return {"type": "error", "error": error}

    def headers(self) -> list[Header]:
        return [
            (b"request-id", f"req_{uuid.uuid4().hex[:24]}".encode()),
            (b"anthropic-ratelimit-requests-limit", b"1000"),
            (b"anthropic-ratelimit-requests-remaining", b"999"),
        ]


class CountTokensApi(MessagesApi):
    """POST /v1/messages/count_tokens: the size of a Messages request's prompt, never streamed."""

    def parse(self, headers: Mapping[str, str], body: object) -> Answer:
        if "anthropic-version" not in headers:
            raise BadRequest("anthropic-version: header is required")
        body, model, faults = request_faults(headers, body)
        check_request({**body, "max_tokens": 1})  # the same checks; it takes no max_tokens
        return TokenCount(model, faults, count_tokens([body["messages"], body.get("system")]))


class TokenCount(Answer):
    def __init__(self, model: str, faults: Faults, tokens: int) -> None:
        super().__init__(model, faults)
        self._tokens = tokens

    def body(self) -> object:
        return {"input_tokens": self._tokens}


class Message(StreamedAnswer):
    """A message of text (cut at `max_tokens`) or of tool_use blocks; streamed as Anthropic's
    message_start, then per block content_block_start, deltas and content_block_stop, then
    message_delta and message_stop."""

    error_status = 529  # Anthropic's overloaded_error
    keepalive = PING
    malformed = b"event: message_start\ndata: {not json}\n\n"

    def __init__(
        self, model: str, faults: Faults, *, stream: bool, max_tokens: int, prompt_tokens: int
    ) -> None:
        parts = make_parts(faults.tokens, faults.tool_calls, limit=max_tokens)
        super().__init__(model, faults, stream=stream, parts=parts)
        self._id = f"msg_{uuid.uuid4().hex[:24]}"
        self._input_tokens = prompt_tokens
        cut = faults.tokens > max_tokens
        self._stop = "tool_use" if parts[0].is_call else "max_tokens" if cut else "end_turn"

    def _message(self, content: list[Any], stop: str | None, output_tokens: int) -> dict[str, Any]:
        usage = {"input_tokens": self._input_tokens, "output_tokens": output_tokens}
        return {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": None,
            "usage": usage,
        }

    def body(self) -> object:
        content = [_block(part, whole=True) for part in self.parts]
        return self._message(content, self._stop, self.tokens)

    def head(self) -> list[bytes]:
        return [typed_event("message_start", message=self._message([], None, 1))]

    def preamble(self) -> list[bytes]:
        return [*super().preamble(), PING]  # as Anthropic: a ping after the first block starts

    def open(self, part: Part) -> list[bytes]:
        block = _block(part, whole=False)
        return [typed_event("content_block_start", index=part.index, content_block=block)]

    def delta(self, part: Part, n: int) -> bytes:
        piece = part.pieces[n]
        delta = (
            {"type": "input_json_delta", "partial_json": piece}
            if part.is_call
            else {"type": "text_delta", "text": piece}
        )
        return typed_event("content_block_delta", index=part.index, delta=delta)

    def close(self, part: Part) -> list[bytes]:
        return [typed_event("content_block_stop", index=part.index)]

    def tail(self) -> list[bytes]:
        delta = {"stop_reason": self._stop, "stop_sequence": None}
        usage = {"output_tokens": self.tokens}
        return [
            typed_event("message_delta", delta=delta, usage=usage),
            typed_event("message_stop"),
        ]

    def error(self) -> bytes:
        message = "Overloaded (simulator knob error-after)"
        return typed_event("error", error={"type": "overloaded_error", "message": message})


def _block(part: Part, *, whole: bool) -> dict[str, Any]:
    """The content block of `part`: complete, or empty as content_block_start carries it."""
    if not part.is_call:
        return {"type": "text", "text": part.text if whole else ""}
    tool_input = json.loads(part.text) if whole else {}
    return {"type": "tool_use", "id": f"toolu_{part.index}", "name": part.name, "input": tool_input}
