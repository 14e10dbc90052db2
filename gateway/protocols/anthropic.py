"""The Anthropic Messages API (pure): which stream event carries content, the message rebuilt
from a stream, Anthropic's error shape, and its error types as our statuses.

A stream is `message_start`, then per content block `content_block_start`, deltas and
`content_block_stop`, then `message_delta` (the stop reason) and `message_stop`; `ping` may come
at any time and is a keep-alive. Every event is framed `event: <type>` + `data: <json>`, and the
`anthropic` SDK ignores a frame without its `event:` line.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError, UpstreamStatus

# Anthropic's error types and the statuses we answer them with. `overloaded_error` comes as a
# 529, which no retry policy names: it is a 503 here, so `retry_on: [503]` falls over on it.
STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "overloaded_error": 503,
    "timeout_error": 504,
}
_TYPE_BY_STATUS = {status: type_ for type_, status in STATUS_BY_TYPE.items()} | {502: "api_error"}
OVERLOADED = 529


def upstream_status(status: int) -> int:
    return 503 if status == OVERLOADED else status


def error_type(status: int) -> str:
    return _TYPE_BY_STATUS.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_of(body: object) -> tuple[str, str] | None:
    """The (type, message) of an Anthropic error body or `error` event, if it is one."""
    if not isinstance(body, Mapping) or body.get("type") != "error":
        return None
    error = body.get("error")
    if not isinstance(error, Mapping):
        return ("api_error", "The upstream sent an error without details.")
    type_, message = error.get("type"), error.get("message")
    return (
        type_ if isinstance(type_, str) else "api_error",
        message if isinstance(message, str) else "The upstream sent an error.",
    )


class MessagesStream:
    """The stream rules of the Messages API."""

    terminal_required = True  # a stream cut before `message_stop` is not a whole answer
    stream_fields: Mapping[str, Any] = {"stream": True}

    def carries_token(self, event: object) -> bool:
        if not isinstance(event, Mapping):
            return False
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event.get("delta")
            return isinstance(delta, Mapping) and any(
                value for key, value in delta.items() if key != "type"
            )
        if kind == "message_delta":  # the stop reason ends the answer, empty or not
            delta = event.get("delta")
            return isinstance(delta, Mapping) and delta.get("stop_reason") is not None
        return kind == "message_stop"

    def is_keepalive(self, event: object) -> bool:
        return isinstance(event, Mapping) and event.get("type") == "ping"

    def is_terminal(self, event: object) -> bool:
        return isinstance(event, Mapping) and event.get("type") == "message_stop"

    def failure(self, event: object) -> GatewayError | None:
        """An `error` event: before the first token it is an attempt's failure (an overload
        falls over like a 503); after it, the client gets the event as it came."""
        error = error_of(event)
        if error is None:
            return None
        status = STATUS_BY_TYPE.get(error[0], 502)
        return UpstreamStatus(status, json.dumps(event).encode(), {}, {})

    def usage(self, event: object) -> dict[str, Any] | None:
        return usage_counts(event)

    def streamable(self, payload: Mapping[str, Any]) -> bool:
        return True

    def assembler(self) -> MessageAssembler:
        return MessageAssembler()


def usage_counts(event: object) -> dict[str, Any] | None:
    """Token counts of a message, `message_start` or `message_delta`, in OpenAI's names."""
    if not isinstance(event, Mapping):
        return None
    message = event.get("message")
    start = event.get("type") == "message_start"
    usage = (message if start and isinstance(message, Mapping) else event).get("usage")
    if not isinstance(usage, Mapping):
        return None
    counts: dict[str, Any] = {}
    prompt = [usage.get(key) for key in ("input_tokens", "cache_read_input_tokens")]
    prompt.append(usage.get("cache_creation_input_tokens"))
    if isinstance(prompt[0], int):
        counts["prompt_tokens"] = sum(n for n in prompt if isinstance(n, int))
    # `message_start` holds a provisional output count; the final one is in `message_delta`.
    if isinstance(usage.get("output_tokens"), int) and not start:
        counts["completion_tokens"] = usage["output_tokens"]
    return counts or None


class MessageAssembler:
    """Feed it every event of a Messages stream; `result()` is the non-streaming message."""

    def __init__(self) -> None:
        self._message: dict[str, Any] = {}
        self._blocks: dict[int, dict[str, Any]] = {}
        self._json: dict[int, list[str]] = {}  # tool inputs arrive as JSON in pieces
        self.finished = False

    def feed(self, event: object) -> None:
        if not isinstance(event, Mapping):
            return
        kind, index = event.get("type"), event.get("index")
        if kind == "message_start" and isinstance(event.get("message"), Mapping):
            self._message = dict(event["message"])
        elif kind == "content_block_start" and isinstance(index, int):
            block = event.get("content_block")
            self._blocks[index] = dict(block) if isinstance(block, Mapping) else {}
        elif kind == "content_block_delta" and index in self._blocks:
            assert isinstance(index, int)
            self._delta(index, event.get("delta"))
        elif kind == "message_delta":
            delta = event.get("delta")
            self._message.update(delta if isinstance(delta, Mapping) else {})
            usage = event.get("usage")
            if isinstance(usage, Mapping):
                self._message["usage"] = {**self._message.get("usage", {}), **usage}
        elif kind == "message_stop":
            self.finished = True

    def _delta(self, index: int, delta: object) -> None:
        if not isinstance(delta, Mapping):
            return
        block = self._blocks[index]
        for key in ("text", "thinking"):
            if isinstance(delta.get(key), str):
                block[key] = block.get(key, "") + delta[key]
        if isinstance(delta.get("partial_json"), str):
            self._json.setdefault(index, []).append(delta["partial_json"])
        if isinstance(delta.get("signature"), str):
            block["signature"] = delta["signature"]
        if isinstance(delta.get("citation"), Mapping):
            block.setdefault("citations", []).append(delta["citation"])

    def result(self) -> dict[str, Any]:
        for index, pieces in self._json.items():
            joined = "".join(pieces)
            self._blocks[index]["input"] = json.loads(joined) if joined else {}
        return {**self._message, "content": [self._blocks[i] for i in sorted(self._blocks)]}


class AnthropicErrors:
    """Anthropic's error shape, `{"type": "error", "error": {"type", "message"}}`, with our
    code beside them; mid-stream, an `event: error` frame, which the `anthropic` SDK raises."""

    def body(self, error: GatewayError) -> bytes:
        if isinstance(error, UpstreamStatus):  # an Anthropic upstream's own words
            return error.body()
        inner = {"type": error_type(error.status), "message": error.message, "code": error.code}
        return json.dumps({"type": "error", "error": inner}).encode()

    def event(self, error: GatewayError) -> bytes:
        return b"event: error\ndata: " + self.body(error) + b"\n\n"
