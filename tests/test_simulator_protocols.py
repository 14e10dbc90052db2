"""The simulator's Anthropic Messages and OpenAI Responses APIs, and the stream faults of every
API, over real sockets: driven by the real `anthropic` and `openai` SDKs, by LangChain, and by
raw httpx2 where the bytes matter (pings, keep-alives, error events)."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterable, AsyncIterator, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

import anthropic
import anyio
import httpx2
import openai
import pytest
from anthropic.types import MessageParam, TextBlock, ToolParam, ToolUseBlock
from langchain_openai import ChatOpenAI
from openai.types.chat import ChatCompletionChunk
from openai.types.responses import (
    Response,
    ResponseCompletedEvent,
    ResponseErrorEvent,
    ResponseFunctionToolCall,
)
from pydantic import SecretStr

from gateway.simulator import create_simulator_app
from gateway.testing import LiveServer
from tests.test_simulator import settled, stats_when

VERSION = {"anthropic-version": "2023-06-01"}
HELLO: list[MessageParam] = [{"role": "user", "content": "hello there"}]
PING = 'event: ping\ndata: {"type": "ping"}'
OVERLOAD = "simulated overload (simulator knob error-after)"


@dataclass(frozen=True)
class Wire:
    """What one streaming API looks like on the wire, for the tests that treat all alike."""

    path: str
    body: dict[str, Any]  # valid but for `model`
    headers: dict[str, str]
    preamble: int  # events sent before the first token
    keepalive: str
    malformed: str  # the first event with malformed=sse
    error: tuple[str | None, dict[str, Any]]  # the error-after event: its name and data


CHAT_ERROR = {"message": OVERLOAD, "type": "server_error", "param": None, "code": "sim_error"}
RESPONSES_ERROR = {"type": "error", "code": "server_error", "message": OVERLOAD, "param": None}
MESSAGES_ERROR = {"type": "overloaded_error", "message": "Overloaded (simulator knob error-after)"}
APIS = {
    "chat": Wire(
        path="/v1/chat/completions",
        body={"messages": [{"role": "user", "content": "hi"}]},
        headers={},
        preamble=1,
        keepalive=": keep-alive",
        malformed="data: {not json}",
        error=(None, {"error": CHAT_ERROR}),
    ),
    "responses": Wire(
        path="/v1/responses",
        body={"input": "hi"},
        headers={},
        preamble=4,
        keepalive=": keep-alive",
        malformed="event: response.created\ndata: {not json}",
        error=("error", RESPONSES_ERROR | {"sequence_number": 6}),  # 4 preamble events, 2 tokens
    ),
    "messages": Wire(
        path="/v1/messages",
        body={"max_tokens": 100, "messages": HELLO},
        headers=VERSION,
        preamble=3,
        keepalive=PING,
        malformed="event: message_start\ndata: {not json}",
        error=("error", {"type": "error", "error": MESSAGES_ERROR}),
    ),
}
T = TypeVar("T")
TOOL_INPUTS = [{"call": call, "words": "tok0 tok1 "} for call in range(2)]  # tool-calls=2,tokens=2


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    """One simulator for the module (starting one per test is most of the run time)."""
    with LiveServer(create_simulator_app()) as live:
        yield live


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx2.AsyncClient]:
    """A raw client, with the counters zeroed once the previous test's requests are over."""
    async with httpx2.AsyncClient(base_url=server.url, timeout=10) as client:
        await stats_when(client, settled())
        await client.post("/sim/reset")
        yield client


@pytest.fixture
async def claude(server: LiveServer) -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The Anthropic SDK, given the root URL: it appends /v1/messages itself."""
    async with anthropic.AsyncAnthropic(
        base_url=server.url, api_key="x", max_retries=0, timeout=10
    ) as client:
        yield client


@pytest.fixture
async def sdk(server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=10
    ) as client:
        yield client


def streaming(
    http: httpx2.AsyncClient, api: str, model: str
) -> AbstractAsyncContextManager[httpx2.Response]:
    """A streaming request to `api` for `model`, for `async with`."""
    wire = APIS[api]
    body = wire.body | {"model": model, "stream": True}
    return http.stream("POST", wire.path, json=body, headers=wire.headers)


async def raw_events(http: httpx2.AsyncClient, api: str, model: str) -> list[str]:
    """The whole stream, split into its events (each event's lines joined by newlines)."""
    with anyio.fail_after(10):
        async with streaming(http, api, model) as response:
            assert response.status_code == 200
            text = (await response.aread()).decode()
    assert text.endswith("\n\n")
    return text.removesuffix("\n\n").split("\n\n")


def parsed(event: str) -> tuple[str | None, Any]:
    """An event's `event:` name (None without one) and its JSON data."""
    fields = dict(line.split(": ", 1) for line in event.splitlines())
    return fields.get("event"), json.loads(fields["data"])


async def collect(items: AsyncIterable[T], into: list[T]) -> None:
    """Append each item to `into`, so that a test sees what arrived before an error."""
    async for item in items:
        into.append(item)


async def read_lines(http: httpx2.AsyncClient, api: str, model: str, into: list[str]) -> None:
    async with streaming(http, api, model) as response:
        await collect(response.aiter_lines(), into)


def tokens_in(lines: list[str]) -> int:
    return sum(bool(re.search(r"tok\d", line)) for line in lines)


async def next_line(lines: AsyncIterator[str]) -> str:
    """The next line that is not blank (a blank one ends each event)."""
    async for line in lines:
        if line:
            return line
    raise AssertionError("the stream ended")


def text_blocks(message: anthropic.types.Message) -> list[str]:
    blocks = [block for block in message.content if isinstance(block, TextBlock)]
    assert len(blocks) == len(message.content)
    return [block.text for block in blocks]


def tool_uses(message: anthropic.types.Message) -> list[tuple[str, str, object]]:
    blocks = [block for block in message.content if isinstance(block, ToolUseBlock)]
    assert len(blocks) == len(message.content)
    return [(block.id, block.name, block.input) for block in blocks]


def function_calls(response: Response) -> list[tuple[str | None, str, str, object]]:
    calls = [item for item in response.output if isinstance(item, ResponseFunctionToolCall)]
    assert len(calls) == len(response.output)
    return [(call.id, call.call_id, call.name, json.loads(call.arguments)) for call in calls]


def anthropic_error(caught: pytest.ExceptionInfo[anthropic.APIStatusError]) -> tuple[str, str]:
    """The error type and message of an Anthropic error body, checking its shape."""
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert set(body["error"]) == {"type", "message"}
    return body["error"]["type"], body["error"]["message"]


# Anthropic Messages, through the anthropic SDK


@pytest.mark.anyio
async def test_messages(claude: anthropic.AsyncAnthropic) -> None:
    raw = await claude.messages.with_raw_response.create(
        model="sim@tokens=3", max_tokens=100, messages=HELLO, system="be brief"
    )
    message = await raw.parse()
    assert message.id.startswith("msg_")
    assert message.model == "sim@tokens=3"
    assert text_blocks(message) == ["tok0 tok1 tok2 "]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 3)  # "user" counts
    assert raw.headers["request-id"].startswith("req_")
    assert raw.headers["anthropic-ratelimit-requests-limit"] == "1000"
    assert "openai-organization" not in raw.headers
    assert "retry-after" not in raw.headers


@pytest.mark.anyio
async def test_messages_are_cut_at_max_tokens(claude: anthropic.AsyncAnthropic) -> None:
    message = await claude.messages.create(model="sim@tokens=5", max_tokens=2, messages=HELLO)
    assert text_blocks(message) == ["tok0 tok1 "]
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 2)


@pytest.mark.anyio
async def test_messages_stream(claude: anthropic.AsyncAnthropic, http: httpx2.AsyncClient) -> None:
    stream = await claude.messages.create(
        model="sim@tokens=3", max_tokens=100, messages=HELLO, stream=True
    )
    types = [event.type async for event in stream]
    async with claude.messages.stream(model="sim@tokens=3", max_tokens=100, messages=HELLO) as s:
        texts = [text async for text in s.text_stream]
        final = await s.get_final_message()
    assert types == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 3,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert texts == ["tok0 ", "tok1 ", "tok2 "]
    assert text_blocks(final) == ["tok0 tok1 tok2 "]
    assert (final.stop_reason, final.usage.output_tokens) == ("end_turn", 3)
    await stats_when(http, settled(completed=2))


@pytest.mark.anyio
async def test_messages_stream_bytes(http: httpx2.AsyncClient) -> None:
    events = await raw_events(http, "messages", "sim@tokens=2")
    frames = [parsed(event) for event in events]
    assert [name for name, _ in frames] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[2] == PING
    assert all(data["type"] == name for name, data in frames)
    message = frames[0][1]["message"]
    assert (message["content"], message["stop_reason"]) == ([], None)
    assert message["usage"]["output_tokens"] == 1
    assert frames[1][1]["content_block"] == {"type": "text", "text": ""}
    assert frames[3][1]["delta"] == {"type": "text_delta", "text": "tok0 "}
    assert frames[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert frames[6][1]["usage"] == {"output_tokens": 2}


@pytest.mark.anyio
async def test_messages_tool_calls(
    claude: anthropic.AsyncAnthropic, http: httpx2.AsyncClient
) -> None:
    model = "sim@tool-calls=2,tokens=2"
    whole = await claude.messages.create(model=model, max_tokens=100, messages=HELLO)
    async with claude.messages.stream(model=model, max_tokens=100, messages=HELLO) as stream:
        streamed = await stream.get_final_message()
    frames = [parsed(event) for event in await raw_events(http, "messages", model)]
    expected = [(f"toolu_{i}", f"tool_{i}", TOOL_INPUTS[i]) for i in range(2)]
    assert tool_uses(whole) == tool_uses(streamed) == expected
    assert whole.stop_reason == streamed.stop_reason == "tool_use"
    blocks = [(name, data["index"]) for name, data in frames if name and "block" in name]
    per_block = ["content_block_start", *["content_block_delta"] * 2, "content_block_stop"]
    assert blocks == [(name, index) for index in range(2) for name in per_block]
    assert frames[1][1]["content_block"] == {
        "type": "tool_use",
        "id": "toolu_0",
        "name": "tool_0",
        "input": {},
    }
    deltas = [data["delta"] for name, data in frames if name == "content_block_delta"]
    pieces = [delta["partial_json"] for delta in deltas]
    assert [json.loads(pieces[0] + pieces[1]), json.loads(pieces[2] + pieces[3])] == TOOL_INPUTS


@pytest.mark.anyio
async def test_messages_tool_results_must_answer_earlier_tool_uses(
    claude: anthropic.AsyncAnthropic,
) -> None:
    use: MessageParam = {
        "role": "assistant",
        "content": [{"type": "tool_use", "id": "toolu_0", "name": "tool_0", "input": {}}],
    }
    result: MessageParam = {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_0", "content": "42"}],
    }
    tools: list[ToolParam] = [{"name": "tool_0", "input_schema": {"type": "object"}}]
    reply = await claude.messages.create(
        model="sim@tokens=1", max_tokens=10, messages=[*HELLO, use, result], tools=tools
    )
    assert text_blocks(reply) == ["tok0 "]
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(model="sim", max_tokens=10, messages=[*HELLO, result])
    kind, message = anthropic_error(caught)
    assert kind == "invalid_request_error"
    assert message.startswith("messages.1.content.0: unexpected `tool_use_id`")


@pytest.mark.anyio
async def test_messages_refuse_unknown_fields(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(
            model="sim", max_tokens=10, messages=HELLO, extra_body={"frequency_penalty": 1}
        )
    assert anthropic_error(caught) == (
        "invalid_request_error",
        "frequency_penalty: Extra inputs are not permitted",
    )


ORPHAN = [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_9"}]}]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "10"}, "max_tokens"),
        ({"model": None}, "model"),
        ({"colour": "red"}, "colour"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages.0.content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
            "messages.0.content.0.type",
        ),
        ({"messages": ORPHAN}, "messages.0.content.0"),
        ({"system": [{"type": "image"}]}, "system"),
        ({"tools": [{"name": "t"}]}, "tools.0.input_schema"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_p": "high"}, "top_p"),
    ],
)
@pytest.mark.anyio
async def test_messages_check_the_request(
    http: httpx2.AsyncClient, change: dict[str, Any], field: str
) -> None:
    body = {"model": "sim", "max_tokens": 10, "messages": HELLO} | change
    response = await http.post(
        "/v1/messages", json={k: v for k, v in body.items() if v is not None}, headers=VERSION
    )
    assert response.status_code == 400
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith((f"{field}: ", f"'{field}'"))
    assert response.headers["request-id"].startswith("req_")


@pytest.mark.anyio
async def test_messages_need_the_version_header(http: httpx2.AsyncClient) -> None:
    body = {"model": "sim", "max_tokens": 10, "messages": HELLO}
    response = await http.post("/v1/messages", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "anthropic-version: header is required"


@pytest.mark.anyio
async def test_messages_bad_knob(claude: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as caught:
        await claude.messages.create(model="sim@tokens=x", max_tokens=10, messages=HELLO)
    kind, message = anthropic_error(caught)
    assert kind == "invalid_request_error"
    assert message.startswith("invalid simulator knob tokens='x'")


@pytest.mark.parametrize(
    ("status", "error_class", "error_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (413, anthropic.ContentTooLargeError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (503, anthropic.ServiceUnavailableError, "overloaded_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
@pytest.mark.anyio
async def test_messages_status(
    claude: anthropic.AsyncAnthropic,
    status: int,
    error_class: type[anthropic.APIStatusError],
    error_type: str,
) -> None:
    with pytest.raises(error_class) as caught:
        await claude.messages.create(
            model=f"sim@status={status},retry-after=3", max_tokens=10, messages=HELLO
        )
    assert caught.value.status_code == status
    message = f"simulated HTTP {status} (simulator knob status)"
    assert anthropic_error(caught) == (error_type, message)
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.response.headers["request-id"].startswith("req_")


@pytest.mark.anyio
async def test_messages_error_after(
    claude: anthropic.AsyncAnthropic, http: httpx2.AsyncClient
) -> None:
    stream = await claude.messages.create(
        model="sim@error-after=2", max_tokens=100, messages=HELLO, stream=True
    )
    events: list[anthropic.types.RawMessageStreamEvent] = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        await collect(stream, events)
    texts = [
        e.delta.text
        for e in events
        if e.type == "content_block_delta" and e.delta.type == "text_delta"
    ]
    assert texts == ["tok0 ", "tok1 "]
    # Not an OverloadedError: the SDK picks the class by the HTTP status, the stream's 200.
    assert type(caught.value) is anthropic.APIStatusError
    assert caught.value.status_code == 200
    assert anthropic_error(caught) == (
        "overloaded_error",
        "Overloaded (simulator knob error-after)",
    )
    await stats_when(http, settled(completed=1))


@pytest.mark.anyio
async def test_messages_hang_then_leaving_counts_as_cancelled(
    claude: anthropic.AsyncAnthropic, http: httpx2.AsyncClient
) -> None:
    stream = await claude.messages.create(
        model="sim@hang=after-2", max_tokens=100, messages=HELLO, stream=True
    )
    events = stream.__aiter__()
    with anyio.fail_after(5):
        types = [(await anext(events)).type for _ in range(4)]  # the SDK drops the ping
    with anyio.move_on_after(0.3) as waited:
        await anext(events)
    await stream.close()
    assert types == ["message_start", "content_block_start", *["content_block_delta"] * 2]
    assert waited.cancelled_caught
    stats = await stats_when(http, settled(cancelled=1))
    assert stats["completed"] == 0


@pytest.mark.anyio
async def test_messages_reset(claude: anthropic.AsyncAnthropic, http: httpx2.AsyncClient) -> None:
    stream = await claude.messages.create(
        model="sim@reset=after-1", max_tokens=100, messages=HELLO, stream=True
    )
    events: list[anthropic.types.RawMessageStreamEvent] = []
    # The anthropic SDK lets the transport's error through (openai's wraps it).
    with pytest.raises(httpx2.RemoteProtocolError):
        await collect(stream, events)
    await stream.close()
    assert [event.type for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
    ]
    await stats_when(http, settled(reset=1))


@pytest.mark.anyio
async def test_messages_malformed_sse(claude: anthropic.AsyncAnthropic) -> None:
    stream = await claude.messages.create(
        model="sim@malformed=sse", max_tokens=100, messages=HELLO, stream=True
    )
    with pytest.raises(ValueError, match="Expecting property name"):
        async for _ in stream:
            pass
    await stream.close()


# OpenAI Responses, through the openai SDK and LangChain


@pytest.mark.anyio
async def test_responses(sdk: openai.AsyncOpenAI) -> None:
    raw = await sdk.responses.with_raw_response.create(
        model="sim@tokens=3", input="hello there", instructions="be brief", max_output_tokens=50
    )
    reply = raw.parse()
    assert reply.id.startswith("resp_")
    assert (reply.object, reply.status, reply.model) == ("response", "completed", "sim@tokens=3")
    assert reply.output_text == "tok0 tok1 tok2 "
    assert [item.type for item in reply.output] == ["message"]
    assert (reply.instructions, reply.max_output_tokens) == ("be brief", 50)
    assert reply.usage is not None
    assert (reply.usage.input_tokens, reply.usage.output_tokens) == (4, 3)
    assert reply.usage.total_tokens == 7
    assert raw.headers["openai-organization"] == "sim-org"


@pytest.mark.anyio
async def test_responses_stream(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    stream = await sdk.responses.create(model="sim@tokens=2", input="hi", stream=True)
    events = [event async for event in stream]
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [event.sequence_number for event in events] == list(range(10))
    completed = events[-1]
    assert isinstance(completed, ResponseCompletedEvent)
    assert completed.response.output_text == "tok0 tok1 "
    assert completed.response.status == "completed"
    frames = [parsed(event) for event in await raw_events(http, "responses", "sim@tokens=1")]
    assert all(name == data["type"] for name, data in frames)  # `event:` names every event
    await stats_when(http, settled(completed=2))


@pytest.mark.anyio
async def test_responses_tool_calls(sdk: openai.AsyncOpenAI) -> None:
    model = "sim@tool-calls=2,tokens=2"
    whole = await sdk.responses.create(model=model, input="hi")
    async with sdk.responses.stream(model=model, input="hi") as stream:
        types = [event.type async for event in stream]
        streamed = await stream.get_final_response()
    expected = [(f"fc_{i}", f"call_{i}", f"tool_{i}", TOOL_INPUTS[i]) for i in range(2)]
    assert function_calls(whole) == function_calls(streamed) == expected
    per_call = [
        "response.output_item.added",
        *["response.function_call_arguments.delta"] * 2,
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    assert types == [
        "response.created",
        "response.in_progress",
        *per_call * 2,
        "response.completed",
    ]


@pytest.mark.parametrize("given", [None, [], 5, ["not an item"]])
@pytest.mark.anyio
async def test_responses_need_input(http: httpx2.AsyncClient, given: object) -> None:
    body = {"model": "sim"} if given is None else {"model": "sim", "input": given}
    response = await http.post("/v1/responses", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "input"
    assert response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.anyio
async def test_responses_status(sdk: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.responses.create(model="sim@status=429,retry-after=2", input="hi")
    assert (caught.value.code, caught.value.type) == ("sim_error", "invalid_request_error")
    assert caught.value.response.headers["retry-after"] == "2"


@pytest.mark.anyio
async def test_responses_error_after(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    stream = await sdk.responses.create(model="sim@error-after=1", input="hi", stream=True)
    events = [event async for event in stream]  # the SDK yields the error event, raises nothing
    assert [event.type for event in events][-2:] == ["response.output_text.delta", "error"]
    error = events[-1]
    assert isinstance(error, ResponseErrorEvent)
    assert (error.code, error.message, error.sequence_number) == ("server_error", OVERLOAD, 5)
    async with sdk.responses.stream(model="sim@error-after=1", input="hi") as helper:
        async for _ in helper:
            pass
        with pytest.raises(RuntimeError, match=r"response\.completed"):
            await helper.get_final_response()
    await stats_when(http, settled(completed=2))


@pytest.mark.anyio
async def test_langchain_uses_the_responses_api(server: LiveServer) -> None:
    async with httpx2.AsyncClient() as client:
        llm = ChatOpenAI(
            model="sim@tokens=3",
            base_url=f"{server.url}/v1",
            api_key=SecretStr("x"),
            use_responses_api=True,
            max_retries=0,
            http_async_client=client,
        )
        reply = await llm.ainvoke("hello there")
        chunks = [chunk.text async for chunk in llm.astream("hello there")]
    assert reply.text == "tok0 tok1 tok2 "
    assert reply.usage_metadata is not None
    assert reply.usage_metadata["output_tokens"] == 3
    assert reply.response_metadata["id"].startswith("resp_")
    assert "".join(chunks) == "tok0 tok1 tok2 "
    assert "tok0 " in chunks  # streamed token by token


# Every streaming API alike, seen raw


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_error_after_ends_the_stream_cleanly(http: httpx2.AsyncClient, api: str) -> None:
    events = await raw_events(http, api, "sim@error-after=2,tokens=5")
    assert parsed(events[-1]) == APIS[api].error
    assert "tok1 " in events[-2]
    assert not any("tok2" in event or "[DONE]" in event for event in events)
    await stats_when(http, settled(completed=1))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_error_after_every_token(http: httpx2.AsyncClient, api: str) -> None:
    events = await raw_events(http, api, "sim@error-after=9,tokens=2")
    assert parsed(events[-1]) == APIS[api].error
    assert "tok1 " in events[-2]  # no closing events


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_error_after_is_an_error_status_when_not_streaming(
    http: httpx2.AsyncClient, api: str
) -> None:
    """What fails mid-stream fails a whole answer too: the API's error status and shape."""
    wire = APIS[api]
    body = wire.body | {"model": "sim@error-after=1,tokens=3"}
    response = await http.post(wire.path, json=body, headers=wire.headers)
    assert response.status_code == (529 if api == "messages" else 500)
    error = response.json()["error"]
    assert error["type"] == ("overloaded_error" if api == "messages" else "server_error")
    assert error["message"] == OVERLOAD


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_keepalives_while_hanging(http: httpx2.AsyncClient, api: str) -> None:
    lines: list[str] = []
    with anyio.fail_after(5):
        async with streaming(http, api, "sim@hang=body,keepalive-ms=50") as response:
            async for line in response.aiter_lines():
                lines.append(line)
                if lines.count("") == 3:
                    break
    assert "\n".join(lines) == "\n\n".join([APIS[api].keepalive] * 3) + "\n"
    await stats_when(http, settled(cancelled=1))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_preamble_then_keepalives_until_the_first_token(
    http: httpx2.AsyncClient, api: str
) -> None:
    started = time.monotonic()
    events = await raw_events(http, api, "sim@ttft-ms=400,keepalive-ms=100,tokens=1")
    wire = APIS[api]
    after_preamble = events[wire.preamble : wire.preamble + 4]
    assert after_preamble[:3] == [wire.keepalive] * 3  # at 100, 200 and 300 ms
    assert "tok0" in after_preamble[3]
    assert 0.4 <= time.monotonic() - started < 5
    await stats_when(http, settled(completed=1))


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_hang_after_tokens_then_leaving_counts_as_cancelled(
    http: httpx2.AsyncClient, api: str
) -> None:
    seen: list[str] = []
    async with streaming(http, api, "sim@hang=after-2") as response:
        lines = response.aiter_lines()
        with anyio.fail_after(5):
            while tokens_in(seen) < 2:
                seen.append(await next_line(lines))
        with anyio.move_on_after(0.3) as waited:
            seen.append(await next_line(lines))
    assert waited.cancelled_caught
    assert "tok1" in seen[-1]
    stats = await stats_when(http, settled(cancelled=1))
    assert stats["completed"] == 0


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_reset_mid_stream(http: httpx2.AsyncClient, api: str) -> None:
    lines: list[str] = []
    with pytest.raises(httpx2.RemoteProtocolError):
        await read_lines(http, api, "sim@reset=after-1", lines)
    assert tokens_in(lines) == 1
    stats = await stats_when(http, settled(reset=1))
    assert (stats["completed"], stats["cancelled"]) == (0, 0)


@pytest.mark.parametrize("api", APIS)
@pytest.mark.anyio
async def test_malformed_first_event(http: httpx2.AsyncClient, api: str) -> None:
    events = await raw_events(http, api, "sim@malformed=sse,tokens=1")
    assert events[0] == APIS[api].malformed
    with pytest.raises(ValueError, match="Expecting property name"):
        parsed(events[0])


@pytest.mark.anyio
async def test_chat_error_after(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.chat.completions.create(
        model="sim@error-after=1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError, match="error-after") as caught:
        await collect(stream, chunks)
    assert [chunk.choices[0].delta.content for chunk in chunks] == ["", "tok0 "]
    assert (caught.value.code, caught.value.type) == ("sim_error", "server_error")


@pytest.mark.anyio
async def test_all_apis_share_the_counters(
    sdk: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic, http: httpx2.AsyncClient
) -> None:
    await sdk.chat.completions.create(model="sim", messages=[{"role": "user", "content": "hi"}])
    await sdk.responses.create(model="sim", input="hi")
    await claude.messages.create(model="sim", max_tokens=10, messages=HELLO)
    with pytest.raises(openai.APITimeoutError):
        await sdk.responses.create(model="sim@latency-ms=5000", input="hi", timeout=0.3)
    with pytest.raises(anthropic.APITimeoutError):
        await claude.messages.create(
            model="sim@hang=headers", max_tokens=10, messages=HELLO, timeout=0.3
        )
    stats = await stats_when(http, settled(completed=3, cancelled=2))
    assert stats["total"] == 5
    assert stats["last_body"]["messages"] == HELLO
    assert "anthropic-version" in stats["last_headers"]  # the SDK sends its own
