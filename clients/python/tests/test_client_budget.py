"""The client keeps its word: `gather_within`, `as_completed_within` and `deadline()` return
within 50 ms of their budget, with 10 and 100 stragglers that never answer.

Two kinds of straggler: `llm-gateway serve` (a real process, the built-in demo) whose upstream
never sends headers (`demo-hang`: the gateway ends each call with a 504 a margin before the
budget), and a socket that is listened on and never answered (the kernel completes the
connection; nothing is ever read or written). Each test first runs one tiny call the same way,
so the first use of the error paths (Python's lazy imports, not the helpers) is not timed, and
the objects alive before it are frozen out of the garbage collector: in this test process (the
gateway, hypothesis, LangChain, ...) a full collection takes 200 to 300 ms on this machine,
which would land in a budget's last 50 ms now and then whatever the helpers did.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import openai
import pytest
from langchain_core.prompts import ChatPromptTemplate
from langchain_openai import ChatOpenAI

import gateway_client
from gateway_client import (
    DeadlineExceeded,
    as_completed_within,
    async_openai,
    chat_openai,
    deadline,
    gather_within,
)

from conftest import close_chat_model

pytestmark = pytest.mark.anyio

BUDGET_S = 0.5
WITHIN_S = 0.05  # the figure, on this shared 2-core machine
# The gateway ends a call its margin (server.deadline.margin_s, 50 ms) before the budget, so that
# its 504 arrives first: a batch may end that much early.
EARLY_S = 0.1
PROMPT = ChatPromptTemplate.from_template("Extract metrics from this data: {data}")


@pytest.fixture(autouse=True)
def no_full_collections_of_old_objects() -> Iterator[None]:
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1024)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"


@pytest.fixture(params=["gateway", "silent socket"])
def straggler_url(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue("demo_url" if request.param == "gateway" else "silent_url")
    return url


@asynccontextmanager
async def clients(url: str) -> AsyncIterator[tuple[ChatOpenAI, openai.AsyncOpenAI]]:
    llm = chat_openai("demo-hang", base_url=url)
    sdk = async_openai(base_url=url)
    try:
        yield llm, sdk
    finally:
        await close_chat_model(llm)
        await sdk.close()


def chains(llm: ChatOpenAI, count: int) -> list[Awaitable[Any]]:
    return [(PROMPT | llm).ainvoke({"data": f"chunk {i}"}) for i in range(count)]


def sdk_calls(sdk: openai.AsyncOpenAI, count: int) -> list[Awaitable[Any]]:
    return [
        sdk.chat.completions.create(
            model="demo-hang", messages=[{"role": "user", "content": f"chunk {i}"}]
        )
        for i in range(count)
    ]


async def timed(run: Callable[[], Awaitable[list[object]]]) -> tuple[float, list[object]]:
    started = time.monotonic()
    outcomes = await run()
    return time.monotonic() - started, outcomes


def assert_cut_off(outcomes: list[object], count: int) -> None:
    """Every straggler came back as `DeadlineExceeded`, of a class the package exports."""
    assert len(outcomes) == count
    for outcome in outcomes:
        assert isinstance(outcome, DeadlineExceeded), repr(outcome)
        assert type(outcome).__name__ in gateway_client.__all__, type(outcome)


def assert_in_time(elapsed: float) -> None:
    assert BUDGET_S - EARLY_S <= elapsed <= BUDGET_S + WITHIN_S, f"{elapsed:.3f} s"


@pytest.mark.parametrize("count", [10, 100])
async def test_gather_within(straggler_url: str, count: int) -> None:
    async with clients(straggler_url) as (llm, _):
        await gather_within(0.05, *chains(llm, 1))
        elapsed, outcomes = await timed(lambda: gather_within(BUDGET_S, *chains(llm, count)))
    assert_cut_off(outcomes, count)
    assert_in_time(elapsed)


@pytest.mark.parametrize("count", [10, 100])
async def test_as_completed_within(straggler_url: str, count: int) -> None:
    async def each_as_it_comes(calls: list[Awaitable[Any]]) -> list[object]:
        return [outcome async for _, outcome in as_completed_within(BUDGET_S, calls)]

    async with clients(straggler_url) as (_, sdk):
        await each_as_it_comes(sdk_calls(sdk, 1))
        elapsed, outcomes = await timed(lambda: each_as_it_comes(sdk_calls(sdk, count)))
    assert_cut_off(outcomes, count)
    assert_in_time(elapsed)


@pytest.mark.parametrize("count", [10, 100])
async def test_deadline(straggler_url: str, count: int) -> None:
    """The seed's pattern: `asyncio.gather` of SDK calls, in one `deadline()` block."""

    async def gathered(calls: list[Awaitable[Any]]) -> list[object]:
        try:
            async with deadline(BUDGET_S):
                await asyncio.gather(*calls)
        except DeadlineExceeded as exceeded:
            return [exceeded]
        return []

    async with clients(straggler_url) as (_, sdk):
        await gathered(sdk_calls(sdk, 1))
        elapsed, outcomes = await timed(lambda: gathered(sdk_calls(sdk, count)))
    assert_cut_off(outcomes, 1)
    # The first failure ends a gather, and the gateway may refuse a queued call at once (the
    # demo caps an upstream at 32 connections; a call that cannot start within its budget is a
    # 504 at once): only the upper bound is the client's word here.
    assert elapsed <= BUDGET_S + WITHIN_S, f"{elapsed:.3f} s"
