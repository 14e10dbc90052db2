"""A key's quotas as the client package sees them: a 429 is the SDK's `RateLimitError` with its
wait readable, and a batch limited to the key's `max_concurrent` is never refused for it."""

from __future__ import annotations

import openai
import pytest

from gateway_client import async_openai, gather_within, retry_after

from conftest import GatewayFactory, routes

pytestmark = pytest.mark.anyio

CHAT: list[openai.types.chat.ChatCompletionMessageParam] = [{"role": "user", "content": "hi"}]


async def test_a_429_is_a_rate_limit_error_with_its_wait(gateway: GatewayFactory) -> None:
    data = routes(("m", "sim", {}))
    data["auth"] = {"keys": [{"name": "k", "key": "key-1", "limits": {"requests_per_min": 1}}]}
    server = gateway(data)
    async with async_openai(base_url=f"{server.url}/v1", api_key="key-1") as client:
        await client.chat.completions.create(model="m", messages=CHAT)
        with pytest.raises(openai.RateLimitError) as raised:
            await client.chat.completions.create(model="m", messages=CHAT)
    error = raised.value
    assert error.code == "rate_limit_exceeded"
    wait = retry_after(error.response.headers)
    assert wait is not None
    assert 55 < wait <= 60  # one request a minute: the next in about a minute
    assert error.response.headers["x-ratelimit-limit-requests"] == "1"


async def test_a_batch_limited_to_max_concurrent_is_never_refused(
    gateway: GatewayFactory,
) -> None:
    data = routes(("slow", "sim@latency-ms=200", {}))
    data["auth"] = {"keys": [{"name": "k", "key": "key-2", "limits": {"max_concurrent": 2}}]}
    server = gateway(data)
    async with async_openai(base_url=f"{server.url}/v1", api_key="key-2") as client:
        calls = [client.chat.completions.create(model="slow", messages=CHAT) for _ in range(6)]
        results = await gather_within(10, *calls, limit=2)
        assert not [r for r in results if isinstance(r, BaseException)], results
        unlimited = [client.chat.completions.create(model="slow", messages=CHAT) for _ in range(4)]
        refused = await gather_within(10, *unlimited)  # 4 at once: 2 over the key's cap
    assert sum(isinstance(r, openai.RateLimitError) for r in refused) == 2
