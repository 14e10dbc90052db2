"""Anthropic upstreams end to end: the real `openai` SDK and LangChain through translated chat
completions, the real `anthropic` SDK on /v1/messages; the simulator speaks the Messages API."""

from __future__ import annotations

import json
import time
from typing import Any

import anthropic
import anyio
import httpx2 as httpx
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI
from openai.types.chat import (
    ChatCompletionMessageFunctionToolCall,
    ChatCompletionMessageParam,
    ChatCompletionToolParam,
)
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from tests.conftest import CHAT, GatewayFactory, LiveServer, Simulator, sdk, wait_until_idle

pytestmark = pytest.mark.anyio

UPSTREAM_KEY = "sk-ant-upstream-secret"
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "tool_0",
            "description": "looks something up",
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }
]
USER: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello"}]


def config(
    *routes: tuple[str, list[tuple[str, str]]],
    budget: dict[str, float] | None = None,
    retry: dict[str, Any] | None = None,
    auth: bool = False,
) -> dict[str, Any]:
    """Upstreams `claude` (kind anthropic) and `oai` on the simulator; routes are
    (model, [(upstream, target model)])."""
    data: dict[str, Any] = {
        "upstreams": [
            {"name": "claude", "base_url": "${SIM}", "kind": "anthropic", "api_key": UPSTREAM_KEY},
            {"name": "oai", "base_url": "${SIM}"},
        ],
        "routes": [
            {
                "model": model,
                "targets": [{"upstream": up, "model": target} for up, target in targets],
                "budget": budget or {},
                "retry": retry or {},
            }
            for model, targets in routes
        ],
    }
    if auth:
        data["auth"] = {"keys": [{"name": "team", "key": "sk-gateway"}]}
    return data


def claude(target: str = "claude", **route: Any) -> dict[str, Any]:
    return config(("m", [("claude", target)]), **route)


def messages_sdk(server: LiveServer, **kwargs: Any) -> anthropic.AsyncAnthropic:
    """The real `anthropic` SDK pointed at a gateway (it appends /v1/messages itself)."""
    kwargs.setdefault("api_key", "sk-client")
    kwargs.setdefault("max_retries", 0)
    return anthropic.AsyncAnthropic(base_url=server.url, **kwargs)


# --- chat completions, translated ----------------------------------------------------------------


async def test_chat_to_anthropic_with_a_tool_call_round_trip(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        config(("tools", [("claude", "claude@tool-calls=1,tokens=3")]), ("m", [("claude", "c")]))
    )
    async with sdk(server, max_retries=0) as client:
        first = await client.chat.completions.create(
            model="tools",
            messages=[{"role": "system", "content": "Be brief."}, *CHAT],
            tools=TOOLS,
            tool_choice="auto",
        )
        sent = simulator.stats()
        call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
        assert first.choices[0].finish_reason == "tool_calls"
        assert isinstance(call, ChatCompletionMessageFunctionToolCall)
        assert call.function.name == "tool_0"
        assert json.loads(call.function.arguments)["call"] == 0
        assert first.usage is not None
        assert first.usage.completion_tokens > 0
        # The result goes back in the next turn; the simulator refuses a tool_result whose
        # tool_use_id no assistant turn made, so a 200 proves the round trip translated.
        history: list[ChatCompletionMessageParam] = [
            *CHAT,
            first.choices[0].message.model_dump(exclude_none=True),  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": call.id, "content": "42"},
        ]
        second = await client.chat.completions.create(model="m", messages=history, tools=TOOLS)
    assert second.choices[0].message.content == "tok0 tok1 tok2 tok3 tok4 tok5 tok6 tok7 "
    assert second.choices[0].finish_reason == "stop"
    headers, body = sent["last_headers"], sent["last_body"]
    assert headers["x-api-key"] == UPSTREAM_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in headers
    assert body["system"] == [{"type": "text", "text": "Be brief."}]
    assert body["max_tokens"] == 4096  # the documented default
    assert body["tools"][0]["input_schema"]["properties"] == {"q": {"type": "string"}}
    last = simulator.stats()["last_body"]["messages"]
    assert last[1]["content"][0]["type"] == "tool_use"
    assert last[2]["content"][0] == {"type": "tool_result", "tool_use_id": call.id, "content": "42"}


async def test_chat_to_anthropic_streams_text_tools_and_usage(gateway: GatewayFactory) -> None:
    server = gateway(
        config(("m", [("claude", "claude@tokens=3")]), ("tools", [("claude", "c@tool-calls=2")]))
    )
    async with sdk(server, max_retries=0) as client:
        stream = await client.chat.completions.create(
            model="m", messages=CHAT, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        calls: dict[int, dict[str, str]] = {}
        tool_stream = await client.chat.completions.create(
            model="tools", messages=CHAT, tools=TOOLS, stream=True
        )
        async for chunk in tool_stream:
            for delta in chunk.choices[0].delta.tool_calls or [] if chunk.choices else []:
                entry = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                assert delta.function is not None
                entry["name"] += delta.function.name or ""
                entry["arguments"] += delta.function.arguments or ""
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "tok0 tok1 tok2 "
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 3
    assert [calls[i]["name"] for i in sorted(calls)] == ["tool_0", "tool_1"]
    assert [json.loads(calls[i]["arguments"])["call"] for i in sorted(calls)] == [0, 1]


async def test_langchain_chat_openai_through_an_anthropic_route(gateway: GatewayFactory) -> None:
    server = gateway(claude("claude@tokens=4"))
    model = ChatOpenAI(
        model="m",
        base_url=f"{server.url}/v1",
        api_key=SecretStr("sk-client"),
        max_retries=0,
        timeout=10,
    )
    answer = await model.ainvoke("hello")
    assert isinstance(answer, AIMessage)
    assert answer.content == "tok0 tok1 tok2 tok3 "
    pieces = [chunk.content async for chunk in model.astream("hello")]
    assert "".join(str(piece) for piece in pieces) == "tok0 tok1 tok2 tok3 "


async def test_untranslatable_parameters_are_a_400_naming_them(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(claude())
    async with sdk(server, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="m", messages=CHAT, n=2, seed=7)
    error = caught.value.body
    assert isinstance(error, dict)
    assert error["code"] == "unsupported_parameter"
    assert "n, seed" in error["message"]
    assert simulator.stats()["total"] == 0  # refused before any upstream was called


async def test_pings_without_text_end_at_ttft_and_fall_over_to_openai(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        config(
            ("m", [("claude", "claude@ttft-ms=9000,keepalive-ms=50"), ("oai", "sim@tokens=2")]),
            budget={"ttft_s": 0.5},
            retry={"retry_on": ["ttft"]},
        )
    )
    async with sdk(server, max_retries=0) as client:
        started = time.monotonic()
        response = await client.chat.completions.with_raw_response.create(
            model="m", messages=CHAT, stream=True
        )
        chunks = [chunk async for chunk in response.parse()]
        elapsed = time.monotonic() - started
    assert response.headers["x-gateway-upstream"] == "oai"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok0 tok1 "
    assert 0.45 <= elapsed < 3  # the pings did not count as a first token
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0)


async def test_an_overload_event_before_any_token_falls_over(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        config(("m", [("claude", "claude@error-after=0"), ("oai", "sim@tokens=2")])),
    )
    async with sdk(server, max_retries=0) as client:
        response = await client.chat.completions.with_raw_response.create(model="m", messages=CHAT)
    assert response.headers["x-gateway-upstream"] == "oai"
    assert response.headers["x-gateway-attempts"] == "2"
    assert response.parse().choices[0].message.content == "tok0 tok1 "


async def test_anthropic_overloaded_is_a_503_openai_error(gateway: GatewayFactory) -> None:
    server = gateway(claude("claude@status=529", retry={"attempts": 1}))
    async with sdk(server, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(model="m", messages=CHAT)
    assert caught.value.status_code == 503
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "overloaded_error"


# --- /v1/messages ---------------------------------------------------------------------------------


async def test_messages_non_streaming_and_streaming(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(claude("claude@tokens=3", auth=True))
    counted = token_counts(server, "claude")  # the registry is the process's: count from here
    async with messages_sdk(server, api_key="sk-gateway") as client:
        message = await client.messages.create(model="m", max_tokens=50, messages=USER)
        sent = simulator.stats()
        async with client.messages.stream(
            model="m", max_tokens=50, messages=USER, extra_headers={"anthropic-beta": "b-1"}
        ) as stream:
            text = [piece async for piece in stream.text_stream]
            final = await stream.get_final_message()
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "tok0 tok1 tok2 "  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.output_tokens == 3
    assert "".join(text) == "tok0 tok1 tok2 "
    assert final.stop_reason == "end_turn"
    assert sent["last_headers"]["x-api-key"] == UPSTREAM_KEY  # the gateway's key, not the client's
    assert sent["last_headers"]["anthropic-version"] == client.default_headers["anthropic-version"]
    assert simulator.stats()["last_headers"]["anthropic-beta"] == "b-1"
    assert sent["last_body"]["model"] == "claude@tokens=3"
    assert sent["last_body"]["stream"] is True  # a non-streaming call is streamed upstream
    # Two calls, each read in Anthropic's names.
    assert await tokens_added(server, counted, {"prompt": 4.0, "completion": 6.0})


def token_counts(server: LiveServer, upstream: str) -> dict[str, float]:
    """`llm_gateway_tokens_total` by kind for one upstream, all routes summed: usage read in
    Anthropic's names."""
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "llm_gateway_tokens_total" and sample.labels["upstream"] == upstream:
                kind = sample.labels["kind"]
                counts[kind] = counts.get(kind, 0.0) + sample.value
    return counts


async def test_messages_retry_an_overload_and_hedge_a_slow_first_token(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = config(
        ("retried", [("claude", "claude@status=529,flaky=1,tokens=2")]),
        ("hedged", [("claude", "slow@ttft-ms=5000"), ("claude", "fast@tokens=2")]),
        retry={"attempts": 2, "backoff_s": 0.01, "retry_on": [503]},
    )
    data["routes"][1]["hedge"] = {"after_s": 0.2}  # a second target races the first's silence
    server = gateway(data)
    async with messages_sdk(server) as client:
        retried = await client.messages.with_raw_response.create(
            model="retried", max_tokens=50, messages=USER
        )
        started = time.monotonic()
        hedged = await client.messages.with_raw_response.create(
            model="hedged", max_tokens=50, messages=USER
        )
        elapsed = time.monotonic() - started
    assert retried.headers["x-gateway-attempts"] == "2"  # the 529 counted as a retryable 503
    assert (await retried.parse()).content[0].text == "tok0 tok1 "  # type: ignore[union-attr]
    assert (await hedged.parse()).content[0].text == "tok0 tok1 "  # type: ignore[union-attr]
    assert elapsed < 3  # the hedge answered, not the slow first target
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0)  # the loser


async def test_messages_keys_are_checked_in_anthropic_shape(gateway: GatewayFactory) -> None:
    server = gateway(claude(auth=True))
    async with messages_sdk(server, api_key="sk-wrong") as client:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await client.messages.create(model="m", max_tokens=5, messages=USER)
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "authentication_error",
            "message": "Missing or invalid API key: send 'Authorization: Bearer <key>' "
            "or 'x-api-key: <key>'.",
            "code": "invalid_api_key",
        },
    }
    bearer = {"authorization": "Bearer sk-gateway", "anthropic-version": "2023-06-01"}
    body = {"model": "m", "max_tokens": 5, "messages": USER}
    response = httpx.post(f"{server.url}/v1/messages", json=body, headers=bearer, timeout=10)
    assert response.status_code == 200


async def test_a_messages_stall_ends_in_an_anthropic_error_event(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(claude("claude@hang=after-2,keepalive-ms=50", budget={"idle_s": 0.5}))
    texts: list[str] = []

    async def read_stream(client: anthropic.AsyncAnthropic) -> None:
        stream = await client.messages.create(model="m", max_tokens=50, messages=USER, stream=True)
        async for event in stream:
            if event.type == "content_block_delta" and event.delta.type == "text_delta":
                texts.append(event.delta.text)

    async with messages_sdk(server) as client:
        started = time.monotonic()
        with pytest.raises(anthropic.APIStatusError) as caught:
            await read_stream(client)
        elapsed = time.monotonic() - started
    assert texts == ["tok0 ", "tok1 "]
    assert caught.value.body == {
        "type": "error",
        "error": {
            "type": "timeout_error",
            "message": "No token for idle_s (0.5s) mid-stream.",
            "code": "upstream_idle_timeout",
        },
    }
    assert 0.45 <= elapsed < 3  # the pings relayed meanwhile did not reset idle_s
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0)


async def test_messages_pings_alone_end_at_ttft_with_a_504(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        claude("claude@ttft-ms=9000,keepalive-ms=50", budget={"ttft_s": 0.5}, retry={"attempts": 1})
    )
    async with messages_sdk(server) as client:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await client.messages.create(model="m", max_tokens=50, messages=USER)
    assert caught.value.status_code == 504
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["code"] == "upstream_ttft_timeout"
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0)  # it saw the cut


async def test_a_messages_client_disconnect_cancels_the_upstream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(claude("claude@hang=after-1,keepalive-ms=50"))
    async with messages_sdk(server) as client:
        stream = await client.messages.create(model="m", max_tokens=50, messages=USER, stream=True)
        async for event in stream:
            if event.type == "content_block_delta":
                break
        await stream.close()
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0, 2.0)
    wait_until_idle(server)


async def test_messages_need_an_anthropic_upstream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(config(("m", [("oai", "sim")])))
    async with messages_sdk(server) as client:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await client.messages.create(model="m", max_tokens=5, messages=USER)
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["code"] == "unsupported_endpoint"
    assert simulator.stats()["total"] == 0


def test_sdk_generated_hints_are_ignored_and_explicit_ones_strict(gateway: GatewayFactory) -> None:
    server = gateway(claude("claude@tokens=1"))
    body = {"model": "m", "max_tokens": 5, "messages": USER, "stream": True}
    base = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
    sloppy = {**base, "x-stainless-timeout": "NOT_GIVEN", "x-stainless-read-timeout": "NOT_GIVEN"}
    response = httpx.post(f"{server.url}/v1/messages", json=body, headers=sloppy, timeout=10)
    assert response.status_code == 200
    assert b"event: message_stop" in response.content
    bad = {**base, "x-request-timeout-ms": "soon"}
    response = httpx.post(f"{server.url}/v1/messages", json=body, headers=bad, timeout=10)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_deadline_header"
    assert response.json()["type"] == "error"


async def test_a_messages_stream_is_relayed_event_by_event(gateway: GatewayFactory) -> None:
    """Every event keeps its `event:` line (the SDK ignores frames without one), pings too."""
    server = gateway(claude("claude@tokens=2,gap-ms=20"))
    body = {"model": "m", "max_tokens": 5, "messages": USER, "stream": True}
    headers = {"anthropic-version": "2023-06-01"}
    async with (
        httpx.AsyncClient(timeout=10) as client,
        client.stream("POST", f"{server.url}/v1/messages", json=body, headers=headers) as response,
    ):
        raw = b"".join([chunk async for chunk in response.aiter_bytes()])
    names = [line[7:] for line in raw.split(b"\n") if line.startswith(b"event: ")]
    assert names[0] == b"message_start"
    assert b"ping" in names
    assert names[-3:] == [b"content_block_stop", b"message_delta", b"message_stop"]
    assert names.count(b"content_block_delta") == 2


@pytest.mark.parametrize("path", ["/v1/messages", "/v1/chat/completions"])
def test_anthropic_garbage_is_a_502_in_the_endpoints_shape(
    gateway: GatewayFactory, path: str
) -> None:
    server = gateway(claude("claude@malformed=sse", retry={"attempts": 1}))
    body = {"model": "m", "max_tokens": 5, "messages": USER, "stream": True}
    headers = {"anthropic-version": "2023-06-01"}
    response = httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=10)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_protocol_error"
    assert error["type"] == ("api_error" if path == "/v1/messages" else "upstream_error")


async def test_a_messages_stream_cut_mid_way_ends_in_an_error_event(
    gateway: GatewayFactory,
) -> None:
    server = gateway(claude("claude@reset=after-2"))
    body = {"model": "m", "max_tokens": 5, "messages": USER, "stream": True}
    headers = {"anthropic-version": "2023-06-01"}
    response = httpx.post(f"{server.url}/v1/messages", json=body, headers=headers, timeout=10)
    assert response.status_code == 200  # committed at the first token
    frames = response.content.split(b"\n\n")
    assert frames.count(b"") == 1  # the body ends with one blank line: no half frame
    last = frames[-2]
    assert last.startswith(b"event: error\ndata: ")
    assert json.loads(last.split(b"data: ", 1)[1])["error"]["code"] == "upstream_protocol_error"
    assert b"message_stop" not in response.content


async def test_the_anthropic_sdk_counts_tokens_and_lists_models(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        config(("m", [("claude", "claude")]), ("gpt", [("oai", "sim")]), auth=True),
    )
    async with messages_sdk(server, api_key="sk-gateway") as client:
        counted = await client.messages.count_tokens(model="m", messages=USER, system="be brief")
        sent = simulator.stats()
        models = [model async for model in client.models.list()]
    assert counted.input_tokens == 4  # the simulator's words: role, content, and the system
    assert sent["last_body"]["model"] == "claude"
    assert sent["last_headers"]["x-api-key"] == UPSTREAM_KEY
    assert [model.id for model in models] == ["m", "gpt"]
    assert all(model.type == "model" and model.created_at.year >= 2026 for model in models)


async def test_translated_streams_count_tokens_even_unasked(gateway: GatewayFactory) -> None:
    """Anthropic reports usage on every stream: the metrics get it whether or not the client
    asked for a usage chunk (`stream_options`)."""
    server = gateway(claude("claude@tokens=3"))
    counted = token_counts(server, "claude")
    async with sdk(server, max_retries=0) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        chunks = [chunk async for chunk in stream]
    assert all(chunk.usage is None for chunk in chunks)  # none asked, none sent
    assert await tokens_added(server, counted, {"prompt": 3.0, "completion": 3.0})


async def tokens_added(
    server: LiveServer, before: dict[str, float], expected: dict[str, float]
) -> dict[str, float]:
    """The tokens counted since `before`, once they are `expected` (a request is counted as it
    ends, just after its last byte reached the client); fails with what was counted."""
    give_up = time.monotonic() + 2
    while True:
        now = token_counts(server, "claude")
        added = {kind: n - before.get(kind, 0) for kind, n in now.items()}
        if added == expected:
            return added
        assert time.monotonic() < give_up, f"counted {added}, expected {expected}"
        await anyio.sleep(0.02)


async def test_the_anthropic_sdks_read_timeout_bounds_gaps_not_the_stream(
    gateway: GatewayFactory,
) -> None:
    """Given a per-call timeout, the SDK sends its read timeout (1 s here) as
    `x-stainless-timeout` too; a stream of 1.8 s whose tokens come every 0.15 s is not cut."""
    server = gateway(claude("claude@tokens=12,gap-ms=150"))
    timeout = httpx.Timeout(60, read=1.0)
    async with messages_sdk(server) as client:
        started = time.monotonic()
        async with client.messages.stream(
            model="m", max_tokens=50, messages=USER, timeout=timeout
        ) as stream:
            final = await stream.get_final_message()
    assert final.stop_reason == "end_turn"
    assert time.monotonic() - started > 1.5
