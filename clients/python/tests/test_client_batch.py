"""`gather_within` and `as_completed_within`: partial results within one budget."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from langchain_core.messages import BaseMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

from gateway_client import (
    DeadlineExceeded,
    as_completed_within,
    chat_openai,
    deadline,
    gather_within,
    remaining,
)

from conftest import SLACK_S, GatewayFactory, LiveServer, Simulator, close_chat_model, routes

pytestmark = pytest.mark.anyio

PROMPT = ChatPromptTemplate.from_template("Extract metrics from this data: {data}")
ROUTES = routes(
    ("ok", "sim@tokens=3,gap-ms=10", {}),
    ("slow", "sim@latency-ms=400,tokens=1", {}),
    ("hang", "sim@hang=headers", {"total_s": 30}),
)


@asynccontextmanager
async def chat(server: LiveServer, model: str) -> AsyncIterator[ChatOpenAI]:
    llm = chat_openai(model, base_url=f"{server.url}/v1")
    try:
        yield llm
    finally:
        await close_chat_model(llm)


@pytest.mark.parametrize("gateway_honours_the_budget", [True, False])
async def test_a_batch_with_three_hung_calls_returns_seven_results_in_time(
    gateway: GatewayFactory, simulator: Simulator, gateway_honours_the_budget: bool
) -> None:
    """Whether the gateway ends the hung calls (it got the budget) or the client's own cancel
    scope does (the gateway ignores client hints), the upstream work is cancelled."""
    config: dict[str, Any] = dict(ROUTES)
    if not gateway_honours_the_budget:
        config["server"] = {"deadline": {"client_headers": False}}
    server = gateway(config)
    hung = {2, 5, 8}
    async with chat(server, "ok") as ok, chat(server, "hang") as hang:
        calls = [
            (PROMPT | (hang if index in hung else ok)).ainvoke({"data": f"chunk {index}"})
            for index in range(10)
        ]
        started = time.monotonic()
        results = await gather_within(1, *calls)
        elapsed = time.monotonic() - started
    assert elapsed < 1 + SLACK_S
    for index, result in enumerate(results):
        if index in hung:
            assert isinstance(result, DeadlineExceeded), result
        else:
            assert isinstance(result, BaseMessage), result
            assert str(result.content).strip() == "tok0 tok1 tok2"
    stats = await anyio.to_thread.run_sync(
        simulator.wait_for, lambda s: s["cancelled"] == 3 and s["open"] == 0
    )
    assert stats["completed"] == 7


async def test_as_completed_within_yields_the_fast_ones_first(
    gateway: GatewayFactory,
) -> None:
    server = gateway(ROUTES)
    async with chat(server, "slow") as slow, chat(server, "hang") as hang, chat(server, "ok") as ok:
        started = time.monotonic()
        arrivals: list[tuple[int, object, float]] = []
        async for index, outcome in as_completed_within(
            1.5, [slow.ainvoke("a"), hang.ainvoke("b"), ok.ainvoke("c")]
        ):
            arrivals.append((index, outcome, time.monotonic() - started))
    assert [index for index, _, _ in arrivals] == [2, 0, 1]
    assert arrivals[0][2] < 0.4  # the fast answer came as soon as it was ready
    assert isinstance(arrivals[1][1], BaseMessage)
    assert isinstance(arrivals[2][1], DeadlineExceeded)
    assert arrivals[2][2] < 1.5 + SLACK_S


async def test_limit_bounds_concurrency(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(ROUTES)
    async with chat(server, "slow") as slow:
        results = await gather_within(10, *(slow.ainvoke(str(i)) for i in range(4)), limit=2)
    assert all(isinstance(result, BaseMessage) for result in results)
    assert simulator.stats()["peak_open"] == 2


async def test_exceptions_are_returned_in_place() -> None:
    async def fails() -> int:
        raise ValueError("bad chunk")

    async def answers() -> int:
        return 42

    results = await gather_within(1, answers(), fails(), answers())
    assert results[0] == results[2] == 42
    assert isinstance(results[1], ValueError)


async def test_stragglers_and_unstarted_calls_end_at_the_deadline() -> None:
    """With `limit=1` most coroutines never start: they are closed (no "never awaited"
    warning, which this test run turns into an error) and reported as cut off."""
    started = time.monotonic()
    results = await gather_within(0.2, *(asyncio.sleep(10) for _ in range(5)), limit=1)
    assert time.monotonic() - started < 0.2 + SLACK_S
    assert all(isinstance(result, DeadlineExceeded) for result in results)


async def test_each_call_runs_under_the_batch_deadline() -> None:
    async def budget() -> float | None:
        return remaining()

    [seen] = await gather_within(2, budget())
    assert isinstance(seen, float)
    assert 1 < seen <= 2


async def test_an_enclosing_tighter_deadline_ends_the_whole_block() -> None:
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded):
        async with deadline(0.2):
            await gather_within(10, asyncio.sleep(5), asyncio.sleep(5))
    assert time.monotonic() - started < 0.2 + SLACK_S


async def test_stopping_early_cancels_the_rest() -> None:
    cancelled = 0

    async def sleeps(seconds: float) -> float:
        nonlocal cancelled
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return seconds

    async with as_completed_within(10, [sleeps(5), sleeps(0), sleeps(5)]) as completions:
        async for index, outcome in completions:
            assert (index, outcome) == (1, 0)
            break
    assert cancelled == 2


async def test_an_empty_batch() -> None:
    assert await gather_within(1) == []
    empty: list[Awaitable[int]] = []
    assert [item async for item in as_completed_within(1, empty)] == []
