"""The protocol adapters, without sockets: content per wire format, the chat ↔ Messages
translation both ways, reassembly, and each endpoint's error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.errors import BadRequest, BudgetExceeded, Overloaded, UpstreamStatus
from gateway.protocols import chat_to_messages
from gateway.protocols.anthropic import AnthropicErrors, MessageAssembler, MessagesStream
from gateway.protocols.chat_to_messages import ChunkTranslator, completion, to_messages
from gateway.protocols.openai import Assembler, OpenAIErrors
from gateway.protocols.responses import ResponseAssembler, ResponsesErrors, ResponsesStream

PING = {"type": "ping"}


def message_stream(*blocks: dict[str, Any], stop: str = "end_turn") -> list[dict[str, Any]]:
    """An Anthropic stream: `blocks` are (start block, [deltas]) pairs flattened as dicts."""
    start: dict[str, Any] = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [], "stop_reason": None, "usage": {"input_tokens": 7, "output_tokens": 1},
    }  # fmt: skip
    events: list[dict[str, Any]] = [{"type": "message_start", "message": start}, PING]
    for index, block in enumerate(blocks):
        events.append({"type": "content_block_start", "index": index, "content_block": block})
        for delta in block.pop("_deltas"):
            events.append({"type": "content_block_delta", "index": index, "delta": delta})
        events.append({"type": "content_block_stop", "index": index})
    events.append({"type": "message_delta", "delta": {"stop_reason": stop, "stop_sequence": None},
                   "usage": {"output_tokens": 5}})  # fmt: skip
    events.append({"type": "message_stop"})
    return events


def text_block(*pieces: str) -> dict[str, Any]:
    deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
    return {"type": "text", "text": "", "_deltas": deltas}


def tool_block(call_id: str, name: str, *json_pieces: str) -> dict[str, Any]:
    deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in json_pieces]
    return {"type": "tool_use", "id": call_id, "name": name, "input": {}, "_deltas": deltas}


# --- what carries content --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("event", "token"),
    [
        (PING, False),
        ({"type": "message_start", "message": {}}, False),
        ({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}, False),
        ({"type": "content_block_delta", "delta": {"type": "text_delta", "text": ""}}, False),
        ({"type": "content_block_delta", "delta": {"type": "text_delta", "text": "hi"}}, True),
        ({"type": "content_block_delta", "delta": {"partial_json": '{"a'}}, True),
        ({"type": "message_delta", "delta": {"stop_reason": None}}, False),
        ({"type": "message_delta", "delta": {"stop_reason": "end_turn"}}, True),
    ],
)
def test_anthropic_content_is_generated_text_or_the_end(event: object, token: bool) -> None:
    assert MessagesStream().carries_token(event) is token


def test_a_ping_is_a_keepalive_and_message_stop_the_end() -> None:
    rules = MessagesStream()
    assert rules.is_keepalive(PING)
    assert not rules.is_keepalive({"type": "content_block_stop"})
    assert rules.is_terminal({"type": "message_stop"})
    assert not rules.is_terminal({"type": "message_delta"})


def test_an_anthropic_overload_event_is_a_503_that_can_fall_over() -> None:
    event = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    failure = MessagesStream().failure(event)
    assert isinstance(failure, UpstreamStatus)
    assert failure.status == 503
    assert json.loads(failure.body()) == event  # the client of /v1/messages gets its words
    assert MessagesStream().failure(PING) is None


@pytest.mark.parametrize(
    ("kind", "token"),
    [
        ("response.created", False),
        ("response.in_progress", False),
        ("response.output_item.added", False),
        ("response.content_part.added", False),
        ("response.output_text.delta", True),
        ("response.function_call_arguments.delta", True),
        ("response.completed", True),
    ],
)
def test_responses_content_is_a_delta_or_the_end(kind: str, token: bool) -> None:
    assert ResponsesStream().carries_token({"type": kind, "delta": "x"}) is token


def test_a_responses_error_event_maps_its_code_to_a_status() -> None:
    rules = ResponsesStream()
    overloaded = rules.failure({"type": "error", "code": "server_is_overloaded", "message": "m"})
    assert isinstance(overloaded, UpstreamStatus)
    assert overloaded.status == 503
    failed = {"type": "response.failed", "response": {"error": {"code": "server_error"}}}
    failure = rules.failure(failed)
    assert isinstance(failure, UpstreamStatus)
    assert failure.status == 500
    assert rules.failure({"type": "response.created"}) is None


def test_usage_is_read_in_openai_names() -> None:
    events = message_stream(text_block("a"))
    counts: dict[str, Any] = {}
    for event in events:
        counts |= MessagesStream().usage(event) or {}
    assert counts == {"prompt_tokens": 7, "completion_tokens": 5}
    done = {"type": "response.completed", "response": {"usage": {"input_tokens": 3,
                                                                  "output_tokens": 4}}}  # fmt: skip
    assert ResponsesStream().usage(done) == {"prompt_tokens": 3, "completion_tokens": 4}


# --- reassembly ----------------------------------------------------------------------------------


def test_a_message_is_rebuilt_from_its_stream() -> None:
    assembler = MessageAssembler()
    for event in message_stream(
        text_block("Hel", "lo"), tool_block("toolu_1", "lookup", '{"q": ', '"x"}'), stop="tool_use"
    ):
        assembler.feed(event)
    assert assembler.finished
    message = assembler.result()
    assert message["content"] == [
        {"type": "text", "text": "Hello"},
        {"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": {"q": "x"}},
    ]
    assert message["stop_reason"] == "tool_use"
    assert message["usage"] == {"input_tokens": 7, "output_tokens": 5}


def test_a_response_is_the_one_its_last_event_holds() -> None:
    assembler = ResponseAssembler()
    assembler.feed({"type": "response.created", "response": {"status": "in_progress"}})
    assert not assembler.finished
    assembler.feed({"type": "response.completed", "response": {"id": "r", "status": "completed"}})
    assert assembler.finished
    assert assembler.result() == {"id": "r", "status": "completed"}


# --- chat → Messages -----------------------------------------------------------------------------


def test_a_chat_request_translates_to_messages() -> None:
    payload = {
        "model": "gpt",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
            ]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "w", "arguments": '{"a":1}'}},
                {"id": "c2", "type": "function", "function": {"name": "w", "arguments": "{}"}},
            ]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
            {"role": "tool", "tool_call_id": "c2", "content": "rain"},
        ],
        "tools": [{"type": "function", "function": {"name": "w", "description": "weather",
                                                    "parameters": {"type": "object"}}}],
        "tool_choice": "required",
        "stop": "END",
        "temperature": 0.5,
        "top_p": 0.9,
        "max_completion_tokens": 64,
        "n": 1,
        "presence_penalty": 0,
        "user": "u-1",
        "stream_options": {"include_usage": True},
    }  # fmt: skip
    request = to_messages(payload, "claude-x", stream=True, max_tokens=4096)
    assert request == {
        "model": "claude-x",
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "AAAA"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "c1", "name": "w", "input": {"a": 1}},
                {"type": "tool_use", "id": "c2", "name": "w", "input": {}},
            ]},
            {"role": "user", "content": [  # both results in the one turn after the calls
                {"type": "tool_result", "tool_use_id": "c1", "content": "sunny"},
                {"type": "tool_result", "tool_use_id": "c2", "content": "rain"},
            ]},
        ],
        "max_tokens": 64,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "tools": [{"name": "w", "input_schema": {"type": "object"}, "description": "weather"}],
        "tool_choice": {"type": "any"},
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }  # fmt: skip


def test_max_tokens_defaults_and_parallel_tool_calls_off_translates() -> None:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}],
               "tools": [{"type": "function", "function": {"name": "f"}}],
               "parallel_tool_calls": False}  # fmt: skip
    request = to_messages(payload, "c", stream=False, max_tokens=321)
    assert request["max_tokens"] == 321
    assert request["tool_choice"] == {"type": "auto", "disable_parallel_tool_use": True}
    assert request["tools"][0]["input_schema"] == {"type": "object", "properties": {}}
    assert "stream" not in request


def test_what_cannot_be_translated_is_a_400_naming_every_parameter() -> None:
    payload = {
        "model": "m",
        "messages": [
            {"role": "user", "content": "hi", "name": "bob"},
            {
                "role": "user",
                "content": [
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://x/a.png", "detail": "high"},
                    },
                    {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                ],
            },
        ],
        "tools": [{"type": "function", "function": {"name": "f", "strict": True}}],
        "n": 2,
        "logprobs": True,
        "seed": 7,
        "temperature": 1.5,
        "presence_penalty": 0,  # a no-op: fine
        "frequency_penalty": None,  # null: fine
    }
    with pytest.raises(BadRequest) as caught:
        to_messages(payload, "c", stream=False, max_tokens=10)
    error = caught.value
    assert error.status == 400
    assert error.code == "unsupported_parameter"
    for name in ("n", "logprobs", "seed", "temperature", "messages[0].name",
                 "messages[1].content[0].image_url.detail", "messages[1].content[1]",
                 "tools[0].function.strict"):  # fmt: skip
        assert name in error.message
    assert "presence_penalty" not in error.message
    assert "frequency_penalty" not in error.message


def test_a_stream_translates_to_chat_chunks_that_assemble_to_a_completion() -> None:
    translator = ChunkTranslator(include_usage=True)
    chunks: list[dict[str, Any]] = []
    events = message_stream(
        text_block("Let me ", "look."), tool_block("toolu_9", "lookup", '{"q"', ': 1}'),
        stop="tool_use",
    )  # fmt: skip
    for event in events:
        produced = translator.feed(event)
        if event is PING or event["type"] in ("content_block_stop",):
            assert produced == []  # keep-alives and block edges are not content
        chunks += produced
    assert translator.ended
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assembler = Assembler("chat")
    for chunk in chunks:
        assembler.feed(chunk)
    answer = assembler.result()
    message = answer["choices"][0]["message"]
    assert message["content"] == "Let me look."
    assert message["tool_calls"] == [
        {
            "id": "toolu_9",
            "type": "function",
            "function": {"name": "lookup", "arguments": '{"q": 1}'},
        }
    ]
    assert answer["choices"][0]["finish_reason"] == "tool_calls"
    assert answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    assert answer["id"] == "msg_1"
    assert answer["model"] == "claude-x"


def test_a_stream_error_event_raises_in_openai_shape() -> None:
    event = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(UpstreamStatus) as caught:
        ChunkTranslator(include_usage=False).feed(event)
    assert caught.value.status == 503
    assert json.loads(caught.value.body())["error"]["type"] == "overloaded_error"


def test_a_whole_message_translates_to_a_chat_completion() -> None:
    message = {"id": "msg_2", "type": "message", "model": "claude-x", "stop_reason": "max_tokens",
               "content": [{"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hi"}],
               "usage": {"input_tokens": 2, "output_tokens": 1}}  # fmt: skip
    answer = completion(message)
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["message"]["content"] == "Hi"  # thinking is not the answer
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"] == {"prompt_tokens": 2, "completion_tokens": 1, "total_tokens": 3}


def test_an_anthropic_529_becomes_a_503_openai_envelope() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    status, envelope = chat_to_messages.translate_error(529, body)
    assert status == 503
    assert json.loads(envelope)["error"] == {
        "message": "Overloaded", "type": "overloaded_error", "param": None,
        "code": "overloaded_error",
    }  # fmt: skip


# --- error shapes --------------------------------------------------------------------------------


def test_openai_errors_are_the_envelope_and_a_data_event() -> None:
    frame = OpenAIErrors().event(BudgetExceeded("idle", "stalled"))
    assert frame.startswith(b'data: {"error": ')
    assert b'"code": "upstream_idle_timeout"' in frame
    assert frame.endswith(b"\n\n")


@pytest.mark.parametrize(
    ("error", "type_"),
    [
        (BadRequest("bad", code="invalid_json"), "invalid_request_error"),
        (Overloaded("busy", code="upstream_saturated"), "overloaded_error"),
        (BudgetExceeded("ttft", "slow"), "timeout_error"),
    ],
)
def test_anthropic_errors_have_anthropics_shape(error: Any, type_: str) -> None:
    errors = AnthropicErrors()
    body = json.loads(errors.body(error))
    assert body == {"type": "error", "error": {"type": type_, "message": error.message,
                                              "code": error.code}}  # fmt: skip
    frame = errors.event(error)
    assert frame.startswith(b"event: error\ndata: ")
    assert json.loads(frame.split(b"data: ", 1)[1]) == body


def test_a_responses_stream_error_is_both_its_event_and_the_envelope() -> None:
    frame = ResponsesErrors().event(BudgetExceeded("idle", "stalled"))
    assert frame.startswith(b"event: error\ndata: ")
    data = json.loads(frame.split(b"data: ", 1)[1])
    assert data["type"] == "error"
    assert data["code"] == data["error"]["code"] == "upstream_idle_timeout"
