"""LangChain's `ChatOpenAI` from `chat_openai`, against a real gateway and the simulator."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import (
    AbstractAsyncContextManager,
    asynccontextmanager,
    contextmanager,
    nullcontext,
)

import anyio
import pytest
from langchain_core.messages import BaseMessageChunk
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from gateway_client import DeadlineExceeded, GatewayTimeout, chat_openai, deadline

from conftest import SLACK_S, GatewayFactory, LiveServer, Simulator, close_chat_model, routes

PROMPT = ChatPromptTemplate.from_template("Extract metrics from this data: {data}")

ROUTES = routes(
    ("hang", "sim@hang=headers", {"total_s": 30}),
    ("ok", "sim@tokens=5,gap-ms=10", {}),
    ("slow", "sim@latency-ms=100,tokens=1", {}),
    ("stall", "sim@hang=after-2,keepalive-ms=50", {"idle_s": 0.4}),
)


@asynccontextmanager
async def chat(server: LiveServer, model: str) -> AsyncIterator[ChatOpenAI]:
    """`chat_openai` for a route, its connections closed at the end (as an app would on
    shutdown; the tests' warnings-as-errors would report them otherwise)."""
    llm = chat_openai(model, base_url=f"{server.url}/v1")
    try:
        yield llm
    finally:
        await close_chat_model(llm)


@contextmanager
def sync_chat(server: LiveServer, model: str) -> Iterator[ChatOpenAI]:
    llm = chat_openai(model, base_url=f"{server.url}/v1")
    try:
        yield llm
    finally:
        assert llm.http_client is not None
        llm.http_client.close()


def text(chunks: Sequence[BaseMessageChunk]) -> str:
    return "".join(str(chunk.content) for chunk in chunks).strip()


@pytest.mark.anyio
async def test_a_chain_under_a_deadline_fails_in_time_facing_a_hung_upstream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(ROUTES)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async with chat(server, "hang") as llm, deadline(1):
            await (PROMPT | llm).ainvoke({"data": "Q3 revenue 12.1M"})
    assert 0.8 < time.monotonic() - started < 1 + SLACK_S
    assert 0 < simulator.budget_seen_ms() <= 1000
    await anyio.to_thread.run_sync(simulator.wait_for, lambda s: s["cancelled"] == 1)


@pytest.mark.anyio
async def test_the_budget_sent_shrinks_across_sequential_calls(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(ROUTES)
    seen: list[int] = []
    async with chat(server, "slow") as model, deadline(5):
        for _ in range(3):
            await model.ainvoke("hi")
            seen.append(await anyio.to_thread.run_sync(simulator.budget_seen_ms))
    assert seen[0] <= 5000
    assert seen[0] > seen[1] > seen[2]
    assert seen[0] - seen[2] >= 200  # two calls of at least 100 ms each


@pytest.mark.anyio
async def test_nested_deadlines_tighten_but_never_extend(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(ROUTES)
    async with chat(server, "ok") as model:

        async def budget_of_a_call() -> int:
            await model.ainvoke("hi")
            return await anyio.to_thread.run_sync(simulator.budget_seen_ms)

        async with deadline(5):
            async with deadline(1):
                assert await budget_of_a_call() <= 1000  # tightened
            assert 1000 < await budget_of_a_call() <= 5000  # the outer budget again
        async with deadline(1), deadline(30):
            assert await budget_of_a_call() <= 1000  # not extended


def test_the_synchronous_form_bounds_invoke(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(ROUTES)
    with sync_chat(server, "ok") as llm, deadline(5):
        assert str(llm.invoke("hi").content).strip() == "tok0 tok1 tok2 tok3 tok4"
    assert 0 < simulator.budget_seen_ms() <= 5000
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded), sync_chat(server, "hang") as llm, deadline(1):
        llm.invoke("hi")
    assert 0.8 < time.monotonic() - started < 1 + SLACK_S
    assert 0 < simulator.budget_seen_ms() <= 1000


@pytest.mark.anyio
async def test_astream_yields_tokens(gateway: GatewayFactory) -> None:
    server = gateway(ROUTES)
    async with chat(server, "ok") as llm, deadline(5):
        chunks = [chunk async for chunk in llm.astream("hi")]
    assert text(chunks) == "tok0 tok1 tok2 tok3 tok4"
    assert len([chunk for chunk in chunks if chunk.content]) >= 5


@pytest.mark.anyio
@pytest.mark.parametrize("in_deadline", [False, True])
async def test_a_stall_ends_the_stream_with_an_error(
    gateway: GatewayFactory, in_deadline: bool
) -> None:
    server = gateway(ROUTES)
    received: list[BaseMessageChunk] = []
    scope: AbstractAsyncContextManager[object] = deadline(10) if in_deadline else nullcontext()

    async def stream() -> None:
        async with chat(server, "stall") as llm, scope:
            async for chunk in llm.astream("hi"):
                received.append(chunk)

    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        await stream()
    assert 0.3 < time.monotonic() - started < 0.4 + SLACK_S
    assert text(received) == "tok0 tok1"
    error = caught.value
    assert isinstance(error, DeadlineExceeded if in_deadline else GatewayTimeout)
    assert getattr(error, "code", None) == "upstream_idle_timeout"


@pytest.mark.anyio
async def test_the_client_cancels_even_when_the_gateway_ignores_its_header(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """With client hints off, only the client's own cancel scope ends the call: it closes the
    connection, the gateway sees the disconnect and cancels the upstream request."""
    server = gateway({**ROUTES, "server": {"deadline": {"client_headers": False}}})
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async with chat(server, "hang") as llm, deadline(0.5):
            await llm.ainvoke("hi")
    assert 0.45 < time.monotonic() - started < 0.5 + SLACK_S
    stats = await anyio.to_thread.run_sync(simulator.wait_for, lambda s: s["cancelled"] == 1)
    assert stats["open"] == 0


def test_the_synchronous_form_is_bounded_by_its_own_timeouts_too(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway({**ROUTES, "server": {"deadline": {"client_headers": False}}})
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded), sync_chat(server, "hang") as llm, deadline(0.5):
        llm.invoke("hi")
    assert 0.45 < time.monotonic() - started < 0.5 + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1)
