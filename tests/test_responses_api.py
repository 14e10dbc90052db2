"""/v1/responses end to end: the real `openai` SDK's `responses.create` and LangChain's
`ChatOpenAI(use_responses_api=True)` through a real gateway; the simulator speaks the API."""

from __future__ import annotations

import time
from typing import Any

import openai
import pytest
from langchain_openai import ChatOpenAI
from pydantic import SecretStr

from tests.conftest import GatewayFactory, Simulator, one_route, sdk, wait_until_idle

pytestmark = pytest.mark.anyio


async def test_responses_non_streaming_and_streaming(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@tokens=3"))
    async with sdk(server, max_retries=0) as client:
        response = await client.responses.create(model="m", input="hello", instructions="brief")
        sent = simulator.stats()["last_body"]
        stream = await client.responses.create(model="m", input="hello", stream=True)
        events = [event async for event in stream]
    assert response.output_text == "tok0 tok1 tok2 "
    assert response.status == "completed"
    assert response.usage is not None
    assert response.usage.output_tokens == 3
    assert sent["stream"] is True  # a non-streaming call is streamed upstream, then assembled
    assert sent["model"] == "sim@tokens=3"
    assert sent["instructions"] == "brief"
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == "tok0 tok1 tok2 "


async def test_responses_function_calls_come_back(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@tool-calls=1,tokens=2"))
    async with sdk(server, max_retries=0) as client:
        response = await client.responses.create(model="m", input="look it up")
    calls = [item for item in response.output if item.type == "function_call"]
    assert [call.name for call in calls] == ["tool_0"]


async def test_langchain_use_responses_api(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@tokens=2"))
    model = ChatOpenAI(
        model="m",
        base_url=f"{server.url}/v1",
        api_key=SecretStr("sk-client"),
        use_responses_api=True,
        max_retries=0,
        timeout=10,
    )
    answer = await model.ainvoke("hello")
    assert answer.text == "tok0 tok1 "
    pieces = [chunk.text async for chunk in model.astream("hello")]
    assert "".join(pieces) == "tok0 tok1 "


async def test_a_responses_stall_ends_in_an_error_event_the_sdk_raises(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@hang=after-2", budget={"idle_s": 0.5}))
    deltas: list[str] = []

    async def read_stream(client: openai.AsyncOpenAI) -> None:
        stream = await client.responses.create(model="m", input="hello", stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)

    async with sdk(server, max_retries=0) as client:
        started = time.monotonic()
        with pytest.raises(openai.APIError) as caught:
            await read_stream(client)
        elapsed = time.monotonic() - started
    assert deltas == ["tok0 ", "tok1 "]
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_idle_timeout"
    assert 0.45 <= elapsed < 3
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0)


async def test_a_non_streaming_responses_stall_is_a_504(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    budget = {"ttft_s": 0.5}
    server = gateway(one_route(target_model="sim@hang=body", budget=budget, retry={"attempts": 1}))
    async with sdk(server, max_retries=0) as client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.responses.create(model="m", input="hello")
    assert caught.value.status_code == 504
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_ttft_timeout"
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0)


async def test_a_responses_client_disconnect_cancels_the_upstream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@hang=after-1"))
    async with sdk(server, max_retries=0) as client:
        stream = await client.responses.create(model="m", input="hello", stream=True)
        async for event in stream:
            if event.type == "response.output_text.delta":
                break
        await stream.close()
    await simulator.until(lambda s: s["cancelled"] == 1 and s["open"] == 0, 2.0)
    wait_until_idle(server)


async def test_responses_need_an_openai_upstream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data: dict[str, Any] = one_route(upstream={"kind": "anthropic"})
    server = gateway(data)
    async with sdk(server, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.responses.create(model="m", input="hello")
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "unsupported_endpoint"
    assert simulator.stats()["total"] == 0
