"""OpenAI Chat Completions and Completions (pure): which event carries a token, the
non-streaming answer rebuilt from the events, and the error envelope.

The gateway asks upstreams for a stream even when the client did not, so `ttft_s`, `idle_s`
and hedging guard every call; the client still gets the body the upstream would have sent
without streaming (`chat.completion` or `text_completion`), `model` as the upstream reported
it. A role-only chunk (`{"role": "assistant", "content": ""}`, sent at once by OpenAI and
others) is not a token: an upstream that sends it and then stalls is stalled.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from gateway.errors import GatewayError

Kind = Literal["chat", "text"]

_TOKEN_FIELDS = ("content", "tool_calls", "function_call", "refusal")
_HEAD_FIELDS = ("id", "created", "model", "system_fingerprint", "service_tier")


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
    """Whether a non-streaming request may be asked of the upstream as a stream."""
    best_of = payload.get("best_of")
    return not (kind == "text" and isinstance(best_of, int) and best_of > 1)


class Assembler:
    """Feed it every parsed event of a stream; `result()` is the non-streaming body."""

    def __init__(self, kind: Kind) -> None:
        self.kind = kind
        self._head: dict[str, Any] = {}
        self._choices: dict[int, _Choice] = {}
        self._usage: Any = None
        self.finished = False  # some choice reported a finish_reason

    def feed(self, chunk: object) -> None:
        if not isinstance(chunk, Mapping):
            return
        for key in _HEAD_FIELDS:
            if key in chunk and key not in self._head:
                self._head[key] = chunk[key]
        if chunk.get("usage") is not None:
            self._usage = chunk["usage"]
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else ():
            if isinstance(choice, Mapping):
                index = choice.get("index", 0)
                index = index if isinstance(index, int) else 0
                self._choices.setdefault(index, _Choice(self.kind, index)).feed(choice)
                self.finished = self.finished or choice.get("finish_reason") is not None

    def result(self) -> dict[str, Any]:
        head = self._head
        body: dict[str, Any] = {
            "id": head.get("id"),
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": head.get("created"),
            "model": head.get("model"),
            "choices": [self._choices[index].result() for index in sorted(self._choices)],
            "usage": self._usage,
        }
        for key in ("system_fingerprint", "service_tier"):
            if key in head:
                body[key] = head[key]
        return body


class _Choice:
    def __init__(self, kind: Kind, index: int) -> None:
        self.kind = kind
        self.index = index
        self.role = "assistant"
        self.text: list[str] = []
        self.refusal: list[str] = []
        self.tool_calls: dict[int, dict[str, Any]] = {}
        self.function_call: dict[str, str] | None = None
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: Any = None

    def feed(self, choice: Mapping[str, Any]) -> None:
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]
        if isinstance(choice.get("logprobs"), Mapping):
            self._merge_logprobs(choice["logprobs"])
        if self.kind == "text":
            if isinstance(choice.get("text"), str):
                self.text.append(choice["text"])
            return
        delta = choice.get("delta")
        if not isinstance(delta, Mapping):
            return
        if isinstance(delta.get("role"), str):
            self.role = delta["role"]
        if isinstance(delta.get("content"), str):
            self.text.append(delta["content"])
        if isinstance(delta.get("refusal"), str):
            self.refusal.append(delta["refusal"])
        if isinstance(delta.get("tool_calls"), list):
            for call in delta["tool_calls"]:
                if isinstance(call, Mapping):
                    self._merge_tool_call(call)
        if isinstance(delta.get("function_call"), Mapping):
            self.function_call = _merge_function(self.function_call, delta["function_call"])

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
        merged = self.logprobs if self.logprobs is not None else {}
        for key, value in logprobs.items():
            if isinstance(value, list):
                merged.setdefault(key, []).extend(value)
        self.logprobs = merged

    def result(self) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": self.index}
        text = "".join(self.text)
        if self.kind == "text":
            choice["text"] = text
        else:
            calls = [self.tool_calls[index] for index in sorted(self.tool_calls)]
            message: dict[str, Any] = {
                "role": self.role,
                # As OpenAI answers: no text next to tool calls or a refusal is null, not "".
                "content": text or (None if calls or self.function_call or self.refusal else ""),
                "refusal": "".join(self.refusal) or None,
            }
            if calls:
                message["tool_calls"] = calls
            if self.function_call is not None:
                message["function_call"] = self.function_call
            choice["message"] = message
        choice["logprobs"] = self.logprobs
        choice["finish_reason"] = self.finish_reason
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
        return None

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
