"""The endpoints the gateway serves, each bound to its wire format (pure), and how a request to
one reaches each kind of upstream: passed through, or translated.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, Protocol

from gateway import jsonbody
from gateway.config import UpstreamConfig
from gateway.errors import BadRequest, GatewayError, UpstreamStatus
from gateway.protocols import anthropic, chat_to_messages
from gateway.protocols.anthropic import AnthropicErrors, MessagesStream
from gateway.protocols.openai import OpenAIErrors, OpenAIStream
from gateway.protocols.responses import ResponsesErrors, ResponsesStream

UpstreamKind = Literal["openai", "anthropic"]


class Assembly(Protocol):
    finished: bool

    def feed(self, event: object) -> None: ...
    def result(self) -> dict[str, Any]: ...


class StreamRules(Protocol):
    """How one wire format's stream marks content, keep-alives, its end and its errors."""

    terminal_required: bool  # a stream that ends without its last event was cut
    stream_fields: Mapping[str, Any]  # what asks an upstream for a stream

    def carries_token(self, event: object) -> bool: ...
    def is_keepalive(self, event: object) -> bool: ...
    def is_terminal(self, event: object) -> bool: ...
    def failure(self, event: object) -> GatewayError | None: ...
    def usage(self, event: object) -> dict[str, Any] | None: ...
    def streamable(self, payload: Mapping[str, Any]) -> bool: ...
    def assembler(self) -> Assembly: ...


class ErrorFormat(Protocol):
    def body(self, error: GatewayError) -> bytes: ...
    def event(self, error: GatewayError) -> bytes: ...


@dataclass(frozen=True, eq=False)
class Api:
    """One endpoint: its path (relative to `/v1/` and to an upstream's `base_url`), its stream
    rules (None: whole answers only), its error shape, the upstream kinds that can serve it,
    and the client headers every upstream gets."""

    path: str
    stream: StreamRules | None
    errors: ErrorFormat
    served_by: frozenset[UpstreamKind]
    forwarded: tuple[str, ...] = ("openai-beta",)
    key_header: str | None = None  # besides `Authorization: Bearer`, where clients send keys

    def translation(self, upstream: UpstreamConfig) -> Translation:
        if self.path == "chat/completions" and upstream.kind == "anthropic":
            return ChatViaMessages(upstream.default_max_tokens)
        return self._passthrough

    @cached_property
    def _passthrough(self) -> Passthrough:  # one per endpoint: it is asked on every attempt
        return Passthrough(self)


_OPENAI: frozenset[UpstreamKind] = frozenset({"openai"})
APIS = {
    api.path: api
    for api in (
        Api("chat/completions", OpenAIStream("chat"), OpenAIErrors(), _OPENAI | {"anthropic"}),
        Api("completions", OpenAIStream("text"), OpenAIErrors(), _OPENAI),
        Api("embeddings", None, OpenAIErrors(), _OPENAI),
        Api("responses", ResponsesStream(), ResponsesErrors(), _OPENAI),
        *(
            Api(
                path,
                stream,
                AnthropicErrors(),
                frozenset({"anthropic"}),
                forwarded=("anthropic-version", "anthropic-beta"),
                key_header="x-api-key",
            )
            for path, stream in (("messages", MessagesStream()), ("messages/count_tokens", None))
        ),
    )
}


class Translation(Protocol):
    """A request on its way to one upstream and its answer on the way back."""

    path: str  # the upstream's endpoint, relative to its base_url
    forwarded: tuple[str, ...]  # client headers the upstream gets (the protocol's own)

    def check(self, payload: Mapping[str, Any]) -> None:
        """400 if the request cannot be said to this kind of upstream."""

    def request(self, body: bytes, payload: dict[str, Any], model: str, *, stream: bool) -> bytes:
        """The body to send; `stream`: the answer is read as a stream."""

    def events(self, include_usage: bool) -> EventTranslator | None: ...
    def whole(self, body: bytes) -> bytes: ...
    def error(
        self, status: int, body: bytes, headers: Mapping[str, str], passed: Mapping[str, str]
    ) -> UpstreamStatus:
        """An upstream's error answer, in the client's protocol."""


class EventTranslator(Protocol):
    """An upstream's stream, event by event, as the client's events; `ended` once the
    upstream's last event came (the client's stream then ends too)."""

    ended: bool
    usage: dict[str, Any]  # token counts so far, in OpenAI's names, asked for or not

    def feed(self, event: object) -> list[dict[str, Any]]: ...


class Passthrough:
    """The same protocol on both sides: the client's bytes with only `model` swapped (and a
    stream asked for when the gateway assembles the answer)."""

    def __init__(self, api: Api) -> None:
        self.path = api.path
        self.forwarded = api.forwarded
        self._stream_fields = dict(api.stream.stream_fields) if api.stream else {}
        self._anthropic = "anthropic" in api.served_by

    def check(self, payload: Mapping[str, Any]) -> None:
        return None

    def request(self, body: bytes, payload: dict[str, Any], model: str, *, stream: bool) -> bytes:
        if stream and payload.get("stream") is not True:
            return jsonbody.with_fields(body, payload, model, self._stream_fields)
        return jsonbody.with_model(body, payload, model)

    def events(self, include_usage: bool) -> EventTranslator | None:
        return None

    def whole(self, body: bytes) -> bytes:
        return body

    def error(
        self, status: int, body: bytes, headers: Mapping[str, str], passed: Mapping[str, str]
    ) -> UpstreamStatus:
        if self._anthropic:  # its 529 counts as the 503 that retry policies name
            status = anthropic.upstream_status(status)
        return UpstreamStatus(status, body, headers, passed)


class ChatViaMessages:
    """A chat completion served by an Anthropic upstream (`gateway.protocols.chat_to_messages`)."""

    path = "messages"
    forwarded: tuple[
        str, ...
    ] = ()  # the client spoke OpenAI: none of its headers mean anything here

    def __init__(self, default_max_tokens: int) -> None:
        self._max_tokens = default_max_tokens

    def check(self, payload: Mapping[str, Any]) -> None:
        self._translate(payload, "-", stream=False)

    def request(self, body: bytes, payload: dict[str, Any], model: str, *, stream: bool) -> bytes:
        return jsonbody.dumps(self._translate(payload, model, stream=stream))

    def _translate(self, payload: Mapping[str, Any], model: str, *, stream: bool) -> dict[str, Any]:
        return chat_to_messages.to_messages(
            payload, model, stream=stream, max_tokens=self._max_tokens
        )

    def events(self, include_usage: bool) -> EventTranslator:
        return chat_to_messages.ChunkTranslator(include_usage)

    def whole(self, body: bytes) -> bytes:
        message = jsonbody.loads(body)
        if not isinstance(message, dict):
            raise ValueError("the upstream's answer is not a JSON object")
        return jsonbody.dumps(chat_to_messages.completion(message))

    def error(
        self, status: int, body: bytes, headers: Mapping[str, str], passed: Mapping[str, str]
    ) -> UpstreamStatus:
        status, envelope = chat_to_messages.translate_error(status, body)
        return UpstreamStatus(status, envelope, {}, passed)


def unsupported(api: Api, model: str) -> BadRequest:
    return BadRequest(
        f"The model {model!r} is served by upstreams that cannot answer /v1/{api.path} "
        f"(it needs an upstream of kind {' or '.join(sorted(api.served_by))}).",
        code="unsupported_endpoint",
        param="model",
    )
