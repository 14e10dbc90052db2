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
    flat_error,
    request_faults,
    sse_data,
)
from gateway.simulator.asgi import Header
from gateway.simulator.content import Part, count_tokens, make_parts
from gateway.simulator.faults import Faults

EMBEDDING_DIMS = 8
MAX_CHOICES = 128
LOGPROB = -0.5  # every token's
STOP_REASON = 2  # vLLM's stop_reason with extra-keys: the id of the token that stopped it
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
        choices = 1 if body.get("n") is None else body["n"]
        if type(choices) is not int or not 1 <= choices <= MAX_CHOICES:
            raise BadRequest(f"'n' must be an integer from 1 to {MAX_CHOICES}", param="n")
        logprobs = body.get("logprobs")
        return Completion(
            model,
            faults,
            chat=self._chat,
            stream=body.get("stream") is True,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
            prompt_tokens=max(1, count_tokens(prompt)),
            choices=choices,
            logprobs=logprobs is True if self._chat else type(logprobs) is int,
            echo=_echoed(prompt) if not self._chat and body.get("echo") is True else "",
        )


class Completion(StreamedAnswer):
    """A chat or text completion: tokens (or chat tool calls) as `data:` chunks, then `[DONE]`;
    `choices` alike (`n`), with logprobs if asked, the prompt first if echoed (not streaming)."""

    def __init__(
        self,
        model: str,
        faults: Faults,
        *,
        chat: bool,
        stream: bool,
        include_usage: bool,
        prompt_tokens: int,
        choices: int = 1,
        logprobs: bool = False,
        echo: str = "",
    ) -> None:
        parts = make_parts(faults.tokens, faults.tool_calls if chat else 0)
        super().__init__(model, faults, stream=stream, parts=parts)
        self._chat, self._choices, self._logprobs = chat, choices, logprobs
        self._include_usage = include_usage and not faults.ignore_include_usage
        self._echo = "" if stream else echo  # a stream does not echo: what a gateway must see
        self._id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self._created = int(time.time())
        self._usage = {"prompt_tokens": prompt_tokens, "completion_tokens": self.tokens}
        self._usage["total_tokens"] = prompt_tokens + self.tokens
        self._finish = "tool_calls" if parts[0].is_call else "stop"

    def refusal(self) -> object | None:
        limit, tokens = self.faults.context_limit, self._usage["prompt_tokens"]
        if limit is None or tokens <= limit:
            return None
        what = "messages" if self._chat else "prompt"
        message = (
            f"This model's maximum context length is {limit} tokens. However, your {what} "
            f"resulted in {tokens} tokens. Please reduce the length of the {what}."
        )
        return openai_error(message, "invalid_request_error", "context_length_exceeded", what)

    def _envelope(self, chunk: bool) -> dict[str, Any]:
        chat = "chat.completion.chunk" if chunk else "chat.completion"
        obj = chat if self._chat else "text_completion"
        head = {"id": self._id, "object": obj, "created": self._created, "model": self.model}
        return head | {"system_fingerprint": None}

    def body(self) -> object:
        part = self.parts[0]
        choice: dict[str, Any] = {"index": 0, "logprobs": None, "finish_reason": self._finish}
        message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None}
        if not self._chat:
            choice["text"] = self._echo + part.text
        elif part.is_call:
            choice["message"] = message | {"tool_calls": [_tool_call(p) for p in self.parts]}
        else:
            choice["message"] = message | {"content": part.text}
        if self._logprobs and not part.is_call and part.pieces:
            pieces = [self._logprob(part, n) for n in range(len(part.pieces))]
            logprobs = {key: [v for p in pieces for v in p[key]] for key in pieces[0]}
            choice["logprobs"] = logprobs | ({"refusal": None} if self._chat else {})
        body = self._envelope(chunk=False) | {"usage": self._usage}
        if self.faults.extra_keys:  # llama.cpp's timings, vLLM's stop_reason, a reasoning
            body["timings"] = self._timings()
            choice["stop_reason"] = STOP_REASON
            if self._chat and not part.is_call:
                choice["message"]["reasoning_content"] = "".join(map(_reasoning, part.pieces))
        return body | {"choices": [choice | {"index": i} for i in range(self._choices)]}

    def head(self) -> list[bytes]:
        """What OpenAI's chat sends first, at once: a role and no content (not a token)."""
        if not self._chat:
            return []
        delta = {"role": "assistant", "content": "", "refusal": None}
        return [self._chunk(delta, None, None)]

    def delta(self, part: Part, n: int) -> bytes:
        piece = _piece(part, n, chat=self._chat)
        if self.faults.extra_keys and self._chat and not part.is_call:
            piece["reasoning_content"] = _reasoning(part.pieces[n])
        logprobs: dict[str, Any] | None = None
        if self._logprobs and not part.is_call:
            logprobs = self._logprob(part, n) | ({"refusal": None} if self._chat else {})
        return self._chunk(piece, None, logprobs)

    def tail(self) -> list[bytes]:
        top = {"timings": self._timings()} if self.faults.extra_keys else {}
        final = [self._chunk({}, self._finish, None, top)]
        if self._include_usage:
            final.append(
                sse_data(self._envelope(chunk=True) | {"choices": [], "usage": self._usage})
            )
        return [*final, b"data: [DONE]\n\n"]

    def error(self) -> bytes:
        if self.faults.error_body == "flat":
            return sse_data(flat_error(500, ERROR_AFTER_MESSAGE))
        return sse_data(openai_error(ERROR_AFTER_MESSAGE, "server_error", "sim_error"))

    def _chunk(
        self,
        piece: dict[str, Any],
        finish: str | None,
        logprobs: dict[str, Any] | None,
        top: dict[str, Any] | None = None,
    ) -> bytes:
        """One event per choice (`n`), all alike but for the index."""
        choice: dict[str, Any] = {"index": 0, "logprobs": logprobs, "finish_reason": finish}
        if self._chat:
            choice["delta"] = piece
        else:
            choice["text"] = piece.get("text", "")
        if self.faults.extra_keys:
            choice["stop_reason"] = None if finish is None else STOP_REASON
        envelope = self._envelope(chunk=True) | (top or {})
        return b"".join(
            sse_data(envelope | {"choices": [choice | {"index": i}]}) for i in range(self._choices)
        )

    def _logprob(self, part: Part, n: int) -> dict[str, list[Any]]:
        """The logprobs of piece `n`, in chat's shape or completions' (one token each)."""
        token = part.pieces[n]
        if self._chat:
            entry = {"token": token, "logprob": LOGPROB, "bytes": list(token.encode())}
            return {"content": [entry | {"top_logprobs": []}]}
        offset = len(self._echo) + sum(map(len, part.pieces[:n]))
        return {
            "tokens": [token],
            "token_logprobs": [LOGPROB],
            "top_logprobs": [{token: LOGPROB}],
            "text_offset": [offset],
        }

    def _timings(self) -> dict[str, int]:
        return {"prompt_n": self._usage["prompt_tokens"], "predicted_n": self.tokens}


def _echoed(prompt: object) -> str:
    """The prompt a completion echoes: a string, or a list of one."""
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    return prompt if isinstance(prompt, str) else ""


def _reasoning(token: str) -> str:
    return "why " if token else ""


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
