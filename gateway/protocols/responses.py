"""The OpenAI Responses API (pure): which stream event carries content, the response rebuilt
from a stream, and the error event.

A stream is `response.created`, `response.in_progress`, items and parts being added, their
`*.delta` events (the content), the matching `*.done` events, then one of `response.completed`,
`response.incomplete` or `response.failed`, which holds the whole response. Every event is
framed `event: <type>` + `data: <json>` with the type repeated in the data.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from gateway.errors import GatewayError, UpstreamStatus

_ENDS = frozenset({"response.completed", "response.incomplete", "response.failed"})
# `error` codes of a stream that mean "try elsewhere"; anything else is a plain 500.
_STATUS_BY_CODE = {"rate_limit_exceeded": 429, "server_is_overloaded": 503, "overloaded": 503}


class ResponsesStream:
    """The stream rules of the Responses API."""

    terminal_required = True
    stream_fields: Mapping[str, Any] = {"stream": True}

    def carries_token(self, event: object) -> bool:
        if not isinstance(event, Mapping):
            return False
        kind = event.get("type")
        if not isinstance(kind, str):
            return False
        if kind.endswith(".delta"):  # output text, refusal, tool arguments, reasoning, audio
            return bool(event.get("delta"))
        return kind in _ENDS

    def is_keepalive(self, event: object) -> bool:
        return False

    def is_terminal(self, event: object) -> bool:
        return isinstance(event, Mapping) and event.get("type") in _ENDS

    def failure(self, event: object) -> GatewayError | None:
        """An `error` event, or a response that failed: before the first token, an attempt's
        failure that can fall over; after it, passed on as it came."""
        if not isinstance(event, Mapping):
            return None
        kind = event.get("type")
        if kind == "response.failed":  # its response says what went wrong
            response = event.get("response")
            event = response.get("error") if isinstance(response, Mapping) else None
            if not isinstance(event, Mapping):
                event = {}
        elif kind != "error":
            return None
        code, message = event.get("code"), event.get("message")
        status = _STATUS_BY_CODE.get(code, 500) if isinstance(code, str) else 500
        inner = {"message": message, "type": "server_error", "param": None, "code": code}
        return UpstreamStatus(status, json.dumps({"error": inner}).encode(), {}, {})

    def usage(self, event: object) -> dict[str, Any] | None:
        """Token counts of a response or the event that ends its stream, in OpenAI's names."""
        if not isinstance(event, Mapping):
            return None
        response = event.get("response", event)
        usage = response.get("usage") if isinstance(response, Mapping) else None
        if not isinstance(usage, Mapping):
            return None
        counts = {"input_tokens": "prompt_tokens", "output_tokens": "completion_tokens"}
        return {ours: usage[theirs] for theirs, ours in counts.items() if theirs in usage}

    def streamable(self, payload: Mapping[str, Any]) -> bool:
        return payload.get("background") is not True  # a background response is not waited on

    def assembler(self) -> ResponseAssembler:
        return ResponseAssembler()


class ResponseAssembler:
    """The last event of a stream holds the whole response: that is the answer."""

    def __init__(self) -> None:
        self._response: dict[str, Any] = {}
        self.finished = False

    def feed(self, event: object) -> None:
        if isinstance(event, Mapping) and event.get("type") in _ENDS:
            response = event.get("response")
            self._response = dict(response) if isinstance(response, Mapping) else {}
            self.finished = True

    def result(self) -> dict[str, Any]:
        return self._response


class ResponsesErrors:
    """The OpenAI envelope; mid-stream, an `event: error` frame in the Responses shape that
    also carries the envelope's `error`, on which the `openai` SDK raises."""

    def body(self, error: GatewayError) -> bytes:
        return error.body()

    def event(self, error: GatewayError) -> bytes:
        inner = {"message": error.message, "type": error.type, "param": error.param}
        inner["code"] = error.code
        frame: dict[str, object] = {"type": "error", "code": error.code, "message": error.message}
        frame |= {"param": error.param, "error": inner}
        return b"event: error\ndata: " + json.dumps(frame).encode() + b"\n\n"
