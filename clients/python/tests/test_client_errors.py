"""Each gateway error code this package maps, produced by a real gateway, through the real
`openai` SDK (and LangChain where it could re-wrap errors), inside and outside `deadline()`."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import Any

import anyio
import openai
import pytest

from gateway_client import (
    DeadlineExceeded,
    GatewayTimeout,
    Overloaded,
    async_openai,
    chat_openai,
    deadline,
)

from conftest import SLACK_S, GatewayFactory, LiveServer, Simulator, close_chat_model, routes

pytestmark = pytest.mark.anyio

CHAT: list[Any] = [{"role": "user", "content": "hi"}]


@asynccontextmanager
async def sdk(server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with async_openai(base_url=f"{server.url}/v1") as client:
        yield client


def maybe_deadline(inside: bool) -> AbstractAsyncContextManager[object]:
    return deadline(10) if inside else nullcontext()


async def call(server: LiveServer, model: str, *, inside: bool, stream: bool = False) -> None:
    async with sdk(server) as client, maybe_deadline(inside):
        if not stream:
            await client.chat.completions.create(model=model, messages=CHAT)
            return
        async for _ in await client.chat.completions.create(
            model=model, messages=CHAT, stream=True
        ):
            pass


async def expect_timeout(
    server: LiveServer, model: str, code: str, *, inside: bool, stream: bool = False
) -> float:
    """One call; assert `code` arrived as the error for where it was made; return seconds."""
    started = time.monotonic()
    with pytest.raises(TimeoutError) as caught:
        await call(server, model, inside=inside, stream=stream)
    error = caught.value
    if inside:
        assert isinstance(error, DeadlineExceeded)
        assert isinstance(error.__cause__, GatewayTimeout)
    else:
        assert isinstance(error, GatewayTimeout)
        mid_stream = stream and code == "upstream_idle_timeout"  # after tokens went out
        assert error.status_code == (None if mid_stream else 504)
    assert getattr(error, "code", None) == code
    return time.monotonic() - started


TIMEOUT_ROUTES = routes(
    ("total", "sim@hang=headers", {"total_s": 0.4}),
    ("ttft", "sim@ttft-ms=5000", {"ttft_s": 0.4}),
    ("idle", "sim@hang=after-2,keepalive-ms=50", {"idle_s": 0.4}),
)


@pytest.mark.parametrize("inside", [False, True])
@pytest.mark.parametrize(
    ("model", "code", "stream"),
    [
        ("total", "deadline_exceeded", False),
        ("ttft", "upstream_ttft_timeout", False),
        ("ttft", "upstream_ttft_timeout", True),
        ("idle", "upstream_idle_timeout", False),
        ("idle", "upstream_idle_timeout", True),  # mid-stream: the final SSE error event
    ],
)
async def test_a_504_budget_code(
    gateway: GatewayFactory, model: str, code: str, stream: bool, inside: bool
) -> None:
    server = gateway(TIMEOUT_ROUTES)
    elapsed = await expect_timeout(server, model, code, inside=inside, stream=stream)
    assert elapsed < 0.4 + SLACK_S  # the SDK did not retry


@pytest.mark.parametrize("inside", [False, True])
async def test_connect_timeout(
    gateway: GatewayFactory, unaccepting_port: int, inside: bool
) -> None:
    data = routes(("m", "sim", {}), connect_s=0.3)
    data["upstreams"][0]["base_url"] = f"http://127.0.0.1:{unaccepting_port}/v1"
    server = gateway(data)
    await expect_timeout(server, "m", "upstream_connect_timeout", inside=inside)


async def hold_the_only_connection(server: LiveServer) -> None:
    async with sdk(server) as client:
        await client.chat.completions.create(model="hold", messages=CHAT)


ONE_CONNECTION: list[tuple[str, str, dict[str, float]]] = [
    ("hold", "sim@hang=headers", {"total_s": 30}),  # takes the upstream's one connection
    ("queued", "sim@hang=headers", {"total_s": 0.5}),
]


@pytest.mark.parametrize("inside", [False, True])
async def test_pool_timeout(gateway: GatewayFactory, simulator: Simulator, inside: bool) -> None:
    server = gateway(routes(*ONE_CONNECTION, max_connections=1))
    async with anyio.create_task_group() as group:
        group.start_soon(hold_the_only_connection, server)
        await anyio.to_thread.run_sync(simulator.wait_for, lambda s: s["open"] == 1)
        await expect_timeout(server, "queued", "upstream_pool_timeout", inside=inside)
        group.cancel_scope.cancel()


@pytest.mark.parametrize("inside", [False, True])
async def test_a_full_queue_is_overloaded(
    gateway: GatewayFactory, simulator: Simulator, inside: bool
) -> None:
    server = gateway(routes(*ONE_CONNECTION, max_connections=1, max_pending=0))
    async with anyio.create_task_group() as group:
        group.start_soon(hold_the_only_connection, server)
        await anyio.to_thread.run_sync(simulator.wait_for, lambda s: s["open"] == 1)
        with pytest.raises(Overloaded) as caught:
            async with sdk(server) as client, maybe_deadline(inside):
                await client.chat.completions.create(model="queued", messages=CHAT)
        group.cancel_scope.cancel()
    assert caught.value.code == "upstream_saturated"
    assert caught.value.status_code == 503
    assert caught.value.retry_after is not None
    assert caught.value.retry_after >= 1


async def test_an_ejected_upstream_is_overloaded_through_langchain(gateway: GatewayFactory) -> None:
    data = routes(("m", "sim@status=500", {}))
    data["upstreams"][0]["outlier"] = {"consecutive_failures": 1, "base_ejection_s": 5}
    data["routes"][0]["outlier_mode"] = "fail_fast"  # the default (panic) would still send it
    server = gateway(data)
    llm = chat_openai("m", base_url=f"{server.url}/v1")
    try:
        with pytest.raises(openai.APIError) as first:  # the upstream's own 500, passed through
            await llm.ainvoke("hi")
        assert not isinstance(first.value, Overloaded)
        with pytest.raises(Overloaded) as caught:
            await llm.ainvoke("hi")
    finally:
        await close_chat_model(llm)
    assert caught.value.code == "circuit_open"
    assert caught.value.retry_after is not None
    assert 1 <= caught.value.retry_after <= 5


async def test_a_gateway_timeout_passes_through_langchain_unchanged(
    gateway: GatewayFactory,
) -> None:
    server = gateway(TIMEOUT_ROUTES)
    llm = chat_openai("ttft", base_url=f"{server.url}/v1")
    try:
        with pytest.raises(GatewayTimeout) as caught:
            await llm.ainvoke("hi")
    finally:
        await close_chat_model(llm)
    assert caught.value.code == "upstream_ttft_timeout"
