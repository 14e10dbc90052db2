"""Chat Completions to an Anthropic upstream (pure): the request as a Messages request, the
answer (whole or streamed) back as a chat completion, Anthropic's errors as OpenAI envelopes.

What cannot be said to Anthropic is a 400 naming every such parameter, never dropped: a caller
that asks for `n: 3` or `logprobs` must not get one plain answer and believe it got what it
asked for. Parameters at their no-op value (`n: 1`, `presence_penalty: 0`, null) are fine.
The table is in the README ("Anthropic upstreams").
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Mapping
from typing import Any

from gateway import jsonbody
from gateway.errors import BadRequest, UpstreamStatus
from gateway.protocols import anthropic

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# Parameters that mean nothing to Anthropic, accepted only at these values (or null).
_NO_OPS: dict[str, tuple[object, ...]] = {
    "n": (1,),
    "presence_penalty": (0,),
    "frequency_penalty": (0,),
    "logprobs": (False,),
    "logit_bias": ({},),
    "store": (False,),
    "modalities": (["text"],),
    "response_format": ({"type": "text"},),
    "service_tier": ("auto", "default"),
}
# Parameters that steer nothing the caller sees; let through whatever their value.
_IGNORED = frozenset({"model", "stream", "stream_options", "metadata"})
_TRANSLATED = frozenset(
    {"messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop"}
    | {"tools", "tool_choice", "parallel_tool_calls", "user"}
)
_DATA_URL = re.compile(r"data:(image/[a-z0-9.+-]+);base64,(.*)", re.DOTALL | re.IGNORECASE)


class _Refusals:
    """Every untranslatable parameter found, so one 400 names them all."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def add(self, name: str) -> None:
        self.names.append(name)

    def raise_any(self) -> None:
        if self.names:
            raise BadRequest(
                "These parameters cannot be translated for an Anthropic upstream: "
                + ", ".join(self.names),
                code="unsupported_parameter",
                param=self.names[0],
            )


def to_messages(
    payload: Mapping[str, Any], model: str, *, stream: bool, max_tokens: int
) -> dict[str, Any]:
    """The Messages request for a chat completion request; `max_tokens` is the default when
    the caller set none (Anthropic requires one)."""
    refusals = _Refusals()
    for key, value in payload.items():
        if key in _TRANSLATED or key in _IGNORED or value is None:
            continue
        if key not in _NO_OPS or value not in _NO_OPS[key]:
            refusals.add(key)
    request: dict[str, Any] = {"model": model}
    system, messages = _conversation(payload.get("messages"), refusals)
    if system:
        request["system"] = system
    request["messages"] = messages
    limit = _first(payload, "max_completion_tokens", "max_tokens")
    request["max_tokens"] = max_tokens if limit is None else limit
    if _present(payload, "temperature"):
        temperature = payload["temperature"]
        if isinstance(temperature, int | float) and temperature > 1:
            refusals.add("temperature (above 1, Anthropic's maximum)")
        request["temperature"] = temperature
    if _present(payload, "top_p"):
        request["top_p"] = payload["top_p"]
    stop = payload.get("stop")
    if stop is not None:
        request["stop_sequences"] = [stop] if isinstance(stop, str) else stop
    _tools(payload, request, refusals)
    if isinstance(payload.get("user"), str):
        request["metadata"] = {"user_id": payload["user"]}
    if stream:
        request["stream"] = True
    refusals.raise_any()
    return request


def _present(payload: Mapping[str, Any], key: str) -> bool:
    return payload.get(key) is not None


def _first(payload: Mapping[str, Any], *keys: str) -> Any:
    for key in keys:
        if payload.get(key) is not None:
            return payload[key]
    return None


def _conversation(
    given: object, refusals: _Refusals
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """System blocks and the turns, consecutive turns of one role merged into one (tool
    results must all sit in the user turn right after the tool calls)."""
    if not isinstance(given, list) or not given:
        raise BadRequest("'messages' must be a non-empty array.", code="invalid_request")
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(given):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise BadRequest(f"'{where}' must be an object.", code="invalid_request")
        role = message.get("role")
        if message.get("name") is not None:
            refusals.add(f"{where}.name")
        if role in ("system", "developer"):
            system += _text_blocks(message.get("content"), where, refusals)
            continue
        if role == "user":
            blocks = _user_blocks(message.get("content"), where, refusals)
        elif role == "assistant":
            blocks = _assistant_blocks(message, where, refusals)
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise BadRequest(
                    f"'{where}.tool_call_id' must name the tool call it answers.",
                    code="invalid_request",
                    param=f"{where}.tool_call_id",
                )
            blocks = [_tool_result(message, where, refusals)]
            role = "user"
        else:
            refusals.add(f"{where}.role ({role!r})")
            continue
        if not blocks:
            continue
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": role, "content": blocks})
    if not turns and not refusals.names:
        raise BadRequest(
            "'messages' has no user or assistant message with content to send.",
            code="invalid_request",
            param="messages",
        )
    return system, turns


def _text_blocks(content: object, where: str, refusals: _Refusals) -> list[dict[str, Any]]:
    if content is None:  # an assistant turn of tool calls only
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    blocks = []
    for index, part in enumerate(content if isinstance(content, list) else [None]):
        if isinstance(part, Mapping) and part.get("type") in ("text", "refusal"):
            text = part.get("text", part.get("refusal"))
            if isinstance(text, str) and text:
                blocks.append({"type": "text", "text": text})
        else:
            refusals.add(f"{where}.content[{index}]")
    return blocks


def _user_blocks(content: object, where: str, refusals: _Refusals) -> list[dict[str, Any]]:
    if not isinstance(content, list):
        return _text_blocks(content, where, refusals)
    blocks = []
    for index, part in enumerate(content):
        if isinstance(part, Mapping) and part.get("type") == "image_url":
            image = _image(part.get("image_url"))
            if image is None:
                refusals.add(f"{where}.content[{index}].image_url")
            elif part["image_url"].get("detail") not in (None, "auto"):
                refusals.add(f"{where}.content[{index}].image_url.detail")
            else:
                blocks.append(image)
        else:
            blocks += _text_blocks([part], f"{where}.content[{index}]", refusals)
    return blocks


def _image(given: object) -> dict[str, Any] | None:
    url = given.get("url") if isinstance(given, Mapping) else None
    if not isinstance(url, str):
        return None
    inline = _DATA_URL.fullmatch(url)
    if inline is not None:
        source = {"type": "base64", "media_type": inline[1].lower(), "data": inline[2]}
        return {"type": "image", "source": source}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    return None


def _assistant_blocks(
    message: Mapping[str, Any], where: str, refusals: _Refusals
) -> list[dict[str, Any]]:
    blocks = _text_blocks(message.get("content"), where, refusals)
    if message.get("function_call") is not None:
        refusals.add(f"{where}.function_call (use tool_calls)")
    calls = message.get("tool_calls") or []
    for index, call in enumerate(calls if isinstance(calls, list) else [None]):
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(call, Mapping) or not isinstance(name, str):
            refusals.add(f"{where}.tool_calls[{index}]")
            continue
        assert isinstance(function, Mapping)
        arguments = function.get("arguments") or "{}"
        try:
            tool_input = json.loads(arguments) if isinstance(arguments, str) else None
        except ValueError:
            tool_input = None
        if not isinstance(tool_input, dict):
            refusals.add(f"{where}.tool_calls[{index}].function.arguments (not a JSON object)")
            continue
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": name, "input": tool_input})
    return blocks


def _tool_result(message: Mapping[str, Any], where: str, refusals: _Refusals) -> dict[str, Any]:
    content = message.get("content")
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    if isinstance(content, str):
        result["content"] = content
    else:
        result["content"] = _text_blocks(content, where, refusals)
    return result


def _tools(payload: Mapping[str, Any], request: dict[str, Any], refusals: _Refusals) -> None:
    tools = payload.get("tools")
    if tools is not None:
        request["tools"] = []
        for index, tool in enumerate(tools if isinstance(tools, list) else [None]):
            function = tool.get("function") if isinstance(tool, Mapping) else None
            if (
                not isinstance(tool, Mapping)
                or tool.get("type") != "function"
                or not (isinstance(function, Mapping) and isinstance(function.get("name"), str))
            ):
                refusals.add(f"tools[{index}] (only function tools translate)")
                continue
            if function.get("strict"):  # Anthropic does not promise schema-exact input
                refusals.add(f"tools[{index}].function.strict")
            entry = {"name": function["name"], "input_schema": function.get("parameters")}
            if entry["input_schema"] is None:
                entry["input_schema"] = {"type": "object", "properties": {}}
            if isinstance(function.get("description"), str):
                entry["description"] = function["description"]
            request["tools"].append(entry)
    choice = _tool_choice(payload.get("tool_choice"), refusals)
    if payload.get("parallel_tool_calls") is False:
        choice = {"type": "auto", **(choice or {}), "disable_parallel_tool_use": True}
    if choice is not None:
        request["tool_choice"] = choice


def _tool_choice(choice: object, refusals: _Refusals) -> dict[str, Any] | None:
    if choice is None:
        return None
    named = {"auto": "auto", "required": "any", "none": "none"}
    if isinstance(choice, str) and choice in named:
        return {"type": named[choice]}
    function = choice.get("function") if isinstance(choice, Mapping) else None
    if isinstance(function, Mapping) and isinstance(function.get("name"), str):
        return {"type": "tool", "name": function["name"]}
    refusals.add("tool_choice")
    return None


def completion(message: Mapping[str, Any]) -> dict[str, Any]:
    """A whole Messages answer as a `chat.completion`."""
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    content = message.get("content")
    for block in content if isinstance(content, list) else ():
        if not isinstance(block, Mapping):
            continue
        if block.get("type") == "text" and isinstance(block.get("text"), str):
            text.append(block["text"])
        elif block.get("type") == "tool_use":
            arguments = json.dumps(block.get("input", {}))
            function = {"name": block.get("name"), "arguments": arguments}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
    reply: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(text) or (None if calls else ""),
        "refusal": None,
    }
    if calls:
        reply["tool_calls"] = calls
    choice = {"index": 0, "message": reply, "logprobs": None}
    choice["finish_reason"] = FINISH_REASONS.get(str(message.get("stop_reason")), "stop")
    body = _head(message.get("id"), message.get("model"), "chat.completion")
    body |= {"choices": [choice], "usage": _usage(anthropic.usage_counts(message))}
    return body


def _head(id_: object, model: object, kind: str) -> dict[str, Any]:
    return {"id": id_, "object": kind, "created": int(time.time()), "model": model}


def _usage(counts: Mapping[str, Any] | None) -> dict[str, int]:
    prompt = (counts or {}).get("prompt_tokens", 0)
    done = (counts or {}).get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


class ChunkTranslator:
    """A Messages stream, event by event, as `chat.completion.chunk`s: `message_start` is the
    role chunk, text and tool input deltas are content, `message_delta` the finish, then the
    usage chunk (if asked for); `ended` then says `[DONE]` is due. Pings and block boundaries
    become nothing, so they cannot pass for tokens. An `error` event raises: before the first
    token it falls over, after it the client gets an OpenAI error event."""

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._id: object = None
        self._model: object = None
        self._created = int(time.time())
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self.usage: dict[str, Any] = {}  # Anthropic always reports it: for the metrics
        self.ended = False  # `message_stop` came

    def feed(self, event: object) -> list[dict[str, Any]]:
        if not isinstance(event, Mapping):
            return []
        error = anthropic.error_of(event)
        if error is not None:
            raise _translated_error(anthropic.STATUS_BY_TYPE.get(error[0], 502), *error)
        self.usage |= anthropic.usage_counts(event) or {}
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, Mapping):
                self._id, self._model = message.get("id"), message.get("model")
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(event.get("index"), event.get("content_block"))
        if kind == "content_block_delta":
            return self._delta(event.get("index"), event.get("delta"))
        if kind == "message_delta":
            delta = event.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, Mapping) else None
            return [self._chunk({}, finish=FINISH_REASONS.get(str(reason), "stop"))]
        if kind == "message_stop":
            self.ended = True
            return [self._usage_chunk()] if self._include_usage else []
        return []

    def _block_start(self, index: object, block: object) -> list[dict[str, Any]]:
        if not isinstance(block, Mapping) or not isinstance(index, int):
            return []
        if block.get("type") == "tool_use":
            call = self._tools.setdefault(index, len(self._tools))
            function = {"name": block.get("name"), "arguments": ""}
            tool = {"index": call, "id": block.get("id"), "type": "function", "function": function}
            return [self._chunk({"tool_calls": [tool]})]
        if block.get("type") == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        return []

    def _delta(self, index: object, delta: object) -> list[dict[str, Any]]:
        if not isinstance(delta, Mapping):
            return []
        if delta.get("type") == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if delta.get("type") == "input_json_delta" and delta.get("partial_json"):
            call = self._tools.get(index if isinstance(index, int) else -1)
            if call is not None:
                tool = {"index": call, "function": {"arguments": delta["partial_json"]}}
                return [self._chunk({"tool_calls": [tool]})]
        return []  # thinking and signatures have no place in a chat completion

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        head = _head(self._id, self._model, "chat.completion.chunk") | {"created": self._created}
        return head | {"choices": [choice]}

    def _usage_chunk(self) -> dict[str, Any]:
        head = _head(self._id, self._model, "chat.completion.chunk") | {"created": self._created}
        return head | {"choices": [], "usage": _usage(self.usage)}


def _envelope(type_: str, message: str) -> bytes:
    inner = {"message": message, "type": type_, "param": None, "code": type_}
    return json.dumps({"error": inner}).encode()


def _translated_error(status: int, type_: str, message: str) -> UpstreamStatus:
    return UpstreamStatus(status, _envelope(type_, message), {}, {})


def translate_error(status: int, body: bytes) -> tuple[int, bytes]:
    """An Anthropic error answer as the OpenAI envelope, and the status we answer it with."""
    try:
        error = anthropic.error_of(jsonbody.loads(body))
    except ValueError:
        error = None
    type_, message = error or (anthropic.error_type(status), body.decode("utf-8", "replace"))
    return anthropic.upstream_status(status), _envelope(type_, message[:4096])
