"""OpenAI's chat completions, completions and embeddings, and what all OpenAI APIs share."""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import time
import uuid
from collections.abc import Mapping
from typing import Any

from gateway.simulator.answer import (
    ERROR_AFTER_MESSAGE,
    Answer,
    Api,
    BadRequest,
    StreamedAnswer,
    request_faults,
    sse_data,
)
from gateway.simulator.asgi import Header
from gateway.simulator.content import Part, count_tokens, make_parts
from gateway.simulator.faults import Faults

EMBEDDING_DIMS = 8
# What OpenAI sends with every answer: rate limits a client acts on, and what it must not get
# through a gateway (the organization billed, a cookie).
_OPENAI_HEADERS = [
    (b"openai-organization", b"sim-org"),
    (b"openai-processing-ms", b"7"),
    (b"x-ratelimit-limit-requests", b"10000"),
    (b"x-ratelimit-remaining-requests", b"9999"),
    (b"set-cookie", b"__sim=1; path=/; HttpOnly"),
]


def openai_error(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class OpenAIApi(Api):
    """OpenAI's headers and error envelope."""

    def error(self, status: int, message: str, code: str, param: str | None = None) -> object:
        type_ = "server_error" if status >= 500 else "invalid_request_error"
        return openai_error(message, type_, code, param)

    def headers(self) -> list[Header]:
        return _OPENAI_HEADERS


class CompletionsApi(OpenAIApi):
    """POST /v1/chat/completions (`chat`) or /v1/completions."""

    def __init__(self, *, chat: bool) -> None:
        self._chat = chat

    def parse(self, headers: Mapping[str, str], body: object) -> Answer:
        body, model, faults = request_faults(headers, body)
        options = body.get("stream_options")
        prompt = body.get("messages" if self._chat else "prompt")
        return Completion(
            model,
            faults,
            chat=self._chat,
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            prompt_tokens=max(1, count_tokens(prompt)),
        )


class Completion(StreamedAnswer):
    """A chat or text completion: tokens (or chat tool calls) as `data:` chunks, then `[DONE]`."""

    def __init__(
        self,
        model: str,
        faults: Faults,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
        prompt_tokens: int,
    ) -> None:
        parts = make_parts(faults.tokens, faults.tool_calls if chat else 0)
        super().__init__(model, faults, stream=stream, parts=parts)
        self._chat, self._include_usage = chat, include_usage
        self._id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self._created = int(time.time())
        self._usage = {"prompt_tokens": prompt_tokens, "completion_tokens": self.tokens}
        self._usage["total_tokens"] = prompt_tokens + self.tokens
        self._finish = "tool_calls" if parts[0].is_call else "stop"

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        chat = "chat.completion.chunk" if chunk else "chat.completion"
        obj = chat if self._chat else "text_completion"
        head = {"id": self._id, "object": obj, "created": self._created, "model": self.model}
        return head | {"system_fingerprint": None}

    def body(self) -> object:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": self._finish}
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if not self._chat:
            choice["text"] = self.parts[0].text
        elif self.parts[0].is_call:
            choice["message"] = message | {"tool_calls": [_tool_call(p) for p in self.parts]}
        else:
            choice["message"] = message | {"content": self.parts[0].text}
        return self._envelope(chunk=False) | {"choices": [choice], "usage": self._usage}

    def head(self) -> list[bytes]:
        """What OpenAI's chat sends first, at once: a role and no content (not a token)."""
        if not self._chat:
            return []
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
        return [sse_data(self._envelope(chunk=True) | {"choices": [choice]})]

    def delta(self, part: Part, n: int) -> bytes:
        return self._chunk(_piece(part, n, chat=self._chat), None)

    def tail(self) -> list[bytes]:
        final = [self._chunk({}, self._finish)]
        if self._include_usage:
            final.append(
                sse_data(self._envelope(chunk=True) | {"choices": [], "usage": self._usage})
            )
        return [*final, b"data: [DONE]\n\n"]

    def error(self) -> bytes:
        return sse_data(openai_error(ERROR_AFTER_MESSAGE, "server_error", "sim_error"))

    def _chunk(self, piece: dict[str, Any], finish: str | None) -> bytes:
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": finish}
        if self._chat:
            choice["delta"] = piece
        else:
            choice["text"] = piece.get("text", "")
        return sse_data(self._envelope(chunk=True) | {"choices": [choice]})


def _tool_call(part: Part) -> dict[str, Any]:
    function = {"name": part.name, "arguments": part.text}
    return {"id": f"call_{part.index}", "type": "function", "function": function}


def _piece(part: Part, n: int, *, chat: bool) -> dict[str, Any]:
    """A chunk's delta (chat) or text (completions) for piece `n` of `part`."""
    if not part.is_call:
        return {"content" if chat else "text": part.pieces[n]}
    tool: dict[str, Any] = {"index": part.index, "function": {"arguments": part.pieces[n]}}
    if n == 0:  # the first piece names the call
        tool |= {"id": f"call_{part.index}", "type": "function"}
        tool["function"]["name"] = part.name
    return {"tool_calls": [tool]}


class EmbeddingsApi(OpenAIApi):
    """POST /v1/embeddings: deterministic vectors, never streamed."""

    def parse(self, headers: Mapping[str, str], body: object) -> Answer:
        body, model, faults = request_faults(headers, body)
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise BadRequest("'encoding_format' must be float or base64")
        inputs = _embedding_inputs(body.get("input"))
        return Embeddings(model, faults, inputs=inputs, base64=encoding == "base64")


class Embeddings(Answer):
    def __init__(self, model: str, faults: Faults, *, inputs: tuple[str, ...], base64: bool):
        super().__init__(model, faults)
        self._inputs, self._base64 = inputs, base64

    def body(self) -> object:
        data = []
        for index, text in enumerate(self._inputs):
            digest = hashlib.sha256(text.encode()).digest()
            vector = [(byte - 128) / 128 for byte in digest[:EMBEDDING_DIMS]]  # exact in float32
            packed = base64.b64encode(struct.pack(f"<{EMBEDDING_DIMS}f", *vector)).decode()
            embedding = packed if self._base64 else vector
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(map(count_tokens, self._inputs))
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": self.model, "usage": usage}


def _embedding_inputs(value: object) -> tuple[str, ...]:
    """One text per vector; a token array is kept as its JSON."""
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(item, int) for item in value):
        return (json.dumps(value),)
    if isinstance(value, list) and value and all(isinstance(item, str | list) for item in value):
        return tuple(item if isinstance(item, str) else json.dumps(item) for item in value)
    raise BadRequest("'input' must be a string or a non-empty array", param="input")
