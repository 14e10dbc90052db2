"""OpenAI Chat Completions and Completions (pure): which event carries a token, the
non-streaming answer rebuilt from the events, and the error envelope.

The gateway asks upstreams for a stream even when the client did not, so `ttft_s`, `idle_s`
and hedging guard every call; the client still gets the body the upstream would have sent
without streaming (`chat.completion` or `text_completion`), `model` as the upstream reported
it, every key the chunks carried kept. A role-only chunk (`{"role": "assistant", "content":
""}`, sent at once by OpenAI and others) is not a token: an upstream that sends it and then
stalls is stalled. An error event (`{"error": ...}`, vLLM's flat `{"object": "error"}`) is the
attempt's failure before the first token, and all of an assembled answer's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from gateway import jsonbody
from gateway.errors import GatewayError, UpstreamStatus

Kind = Literal["chat", "text"]

_TOKEN_FIELDS = ("content", "tool_calls", "function_call", "refusal")
_STATUS_BY_TYPE = {
    "invalid_request_error": 400,
    "BadRequestError": 400,  # vLLM
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "NotFoundError": 404,
    "rate_limit_error": 429,
}
# Top-level keys of a chunk that are not the answer's (OpenAI pads chunks with `obfuscation`).
_STREAM_ONLY = frozenset({"id", "object", "created", "model", "choices", "usage", "obfuscation"})


def carries_token(chunk: object) -> bool:
    """Whether a parsed stream event carries generated content, or ends a choice."""
    if not isinstance(chunk, Mapping):
        return False
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        if choice.get("finish_reason") is not None or choice.get("text"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, Mapping) and any(delta.get(key) for key in _TOKEN_FIELDS):
            return True
    return False


def streamable(kind: Kind, payload: Mapping[str, Any]) -> bool:
    """Whether a non-streaming request may be asked of the upstream as a stream: not when the
    stream cannot carry what the plain answer would (completions' `echo` and `best_of` above
    1; vLLM's `prompt_logprobs`, which it refuses to stream)."""
    if payload.get("prompt_logprobs") is not None:
        return False
    if kind == "chat":
        return True
    best_of = payload.get("best_of")
    return payload.get("echo") is not True and not (isinstance(best_of, int) and best_of > 1)


def stream_failure(event: object) -> UpstreamStatus | None:
    """An error event in a stream (`{"error": ...}`, or vLLM's flat `{"object": "error"}`):
    the status its non-streaming answer would have had, and the event as its body."""
    if not isinstance(event, dict) or "choices" in event:  # every chunk: one lookup
        return None
    error = event.get("error")
    if error is None and event.get("object") == "error":
        error = event
    if error is None:
        return None
    code = error.get("code") if isinstance(error, Mapping) else None
    kind = error.get("type") if isinstance(error, Mapping) else None
    if isinstance(code, int) and 400 <= code <= 599:
        status = code
    else:
        status = _STATUS_BY_TYPE.get(kind, 500) if isinstance(kind, str) else 500
    return UpstreamStatus(status, jsonbody.dumps(event), {}, {})


class Assembler:
    """Feed it every parsed event of a stream; `result()` is the non-streaming body.

    Every key the chunks carry is kept, known or not (`timings`, `stop_reason`,
    `logprobs.refusal`, `reasoning_content`, ...): strings in a delta are pieces, joined; other
    values keep the last one that is not null. `usage` is there only if the stream had it.
    """

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self.finished = False  # some choice reported a finish_reason

    def feed(self, chunk: object) -> None:
        if not isinstance(chunk, Mapping):
            return
        head = self._head
        for key, value in chunk.items():
            if value is not None or key not in head:
                head[key] = value
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, Mapping):
                index = choice.get("index", 0)
                index = index if isinstance(index, int) else 0
                known = self._choices.get(index)
                if known is None:
                    known = self._choices[index] = _Choice(self.kind, index)
                known.feed(choice)
                if choice.get("finish_reason") is not None:
                    self.finished = True

    def result(self) -> dict[str, Any]:
        head = self._head
        body: dict[str, Any] = {
            "id": head.get("id"),
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": head.get("created"),
            "model": head.get("model"),
        }
        body.update((key, value) for key, value in head.items() if key not in _STREAM_ONLY)
        body["choices"] = [self._choices[index].result() for index in sorted(self._choices)]
        if head.get("usage") is not None:
            body["usage"] = head["usage"]
        return body


class _Choice:
    def __init__(self, kind: Kind, index: int) -> None:
        self.kind = kind
        self.index = index
        self.role = "assistant"
        self.pieces: dict[str, list[str]] = {}  # text; content, refusal, reasoning_content...
        self.message: dict[str, Any] = {}  # the delta's other keys, as last carried
        self.extra: dict[str, Any] = {}  # the choice's keys of its own (vLLM's stop_reason)
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.calls_carried = False  # a delta had `tool_calls` (vLLM's may be empty)
        self.function_call: dict[str, str] | None = None
        self.logprobs: dict[str, Any] | None = None
        self.finish_reason: Any = None

    def feed(self, choice: Mapping[str, Any]) -> None:
        for key, value in choice.items():
            if key == "delta":
                if isinstance(value, Mapping):
                    self._feed_delta(value)
            elif key == "text":
                if isinstance(value, str):
                    self._piece("text", value)
            elif key == "finish_reason":
                if value is not None:
                    self.finish_reason = value
            elif key == "logprobs":
                if isinstance(value, Mapping):
                    self._merge_logprobs(value)
            elif key != "index" and (value is not None or key not in self.extra):
                self.extra[key] = value

    def _feed_delta(self, delta: Mapping[str, Any]) -> None:
        for key, value in delta.items():
            if isinstance(value, str):
                if key == "role":
                    self.role = value
                else:
                    self._piece(key, value)
            elif key == "tool_calls":
                if isinstance(value, list):
                    self.calls_carried = True
                    for call in value:
                        if isinstance(call, Mapping):
                            self._merge_tool_call(call)
            elif key == "function_call":
                if isinstance(value, Mapping):
                    self.function_call = _merge_function(self.function_call, value)
            elif value is not None or key not in self.message:
                self.message[key] = value

    def _piece(self, key: str, value: str) -> None:
        pieces = self.pieces.get(key)
        if pieces is None:
            self.pieces[key] = [value]
        else:
            pieces.append(value)

    def _merge_tool_call(self, call: Mapping[str, Any]) -> None:
        index = call.get("index", len(self.tool_calls))
        entry = self.tool_calls.setdefault(
            index if isinstance(index, int) else len(self.tool_calls),
            {"id": None, "type": "function", "function": {"name": "", "arguments": ""}},
        )
        if isinstance(call.get("id"), str):
            entry["id"] = call["id"]
        if isinstance(call.get("type"), str):
            entry["type"] = call["type"]
        if isinstance(call.get("function"), Mapping):
            entry["function"] = _merge_function(entry["function"], call["function"])

    def _merge_logprobs(self, logprobs: Mapping[str, Any]) -> None:
        """Lists (`content`, `tokens`, ...) add up; the rest (`refusal: null`) is kept."""
        merged = self.logprobs if self.logprobs is not None else {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
            elif value is not None or key not in merged:
                merged[key] = value
        self.logprobs = merged

    def result(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": self.index}
        joined = {key: "".join(pieces) for key, pieces in self.pieces.items()}
        if self.kind == "text":
            choice["text"] = joined.get("text", "")
        else:
            calls = [self.tool_calls[index] for index in sorted(self.tool_calls)]
            text = joined.pop("content", "")
            # As OpenAI answers: no text next to tool calls or a refusal is null, not "".
            empty = None if calls or self.function_call or joined.get("refusal") else ""
            message: dict[str, Any] = {"role": None, "content": None, **self.message, **joined}
            message["role"], message["content"] = self.role, text or empty
            if self.calls_carried:
                message["tool_calls"] = calls
            if self.function_call is not None:
                message["function_call"] = self.function_call
            choice["message"] = message
        choice["logprobs"] = self.logprobs
        choice["finish_reason"] = self.finish_reason
        choice.update(self.extra)
        return choice


def _merge_function(known: dict[str, str] | None, delta: Mapping[str, Any]) -> dict[str, str]:
    """A function call's name comes once; its arguments come in pieces to concatenate."""
    merged = dict(known) if known is not None else {"name": "", "arguments": ""}
    if isinstance(delta.get("name"), str) and not merged["name"]:
        merged["name"] = delta["name"]
    if isinstance(delta.get("arguments"), str):
        merged["arguments"] += delta["arguments"]
    return merged


class OpenAIStream:
    """The stream rules of Chat Completions (`chat`) and Completions (`text`): content is a
    token or a finish; the stream ends with `data: [DONE]`, which some servers leave out."""

    terminal_required = False
    stream_fields: Mapping[str, Any] = {"stream": True, "stream_options": {"include_usage": True}}

    def __init__(self, kind: Kind) -> None:
        self.kind = kind

    def carries_token(self, event: object) -> bool:
        return carries_token(event)

    def is_keepalive(self, event: object) -> bool:
        return False

    def is_terminal(self, event: object) -> bool:
        return False  # `data: [DONE]` is not JSON: the reader sees it first

    def failure(self, event: object) -> GatewayError | None:
        return stream_failure(event)

    def usage(self, event: object) -> dict[str, Any] | None:
        usage = event.get("usage") if isinstance(event, Mapping) else None
        return dict(usage) if isinstance(usage, Mapping) else None

    def streamable(self, payload: Mapping[str, Any]) -> bool:
        return streamable(self.kind, payload)

    def assembler(self) -> Assembler:
        return Assembler(self.kind)


class OpenAIErrors:
    """The OpenAI error envelope; mid-stream, one `data:` event with it (the SDK raises)."""

    def body(self, error: GatewayError) -> bytes:
        return error.body()

    def event(self, error: GatewayError) -> bytes:
        return b"data: " + error.body() + b"\n\n"
