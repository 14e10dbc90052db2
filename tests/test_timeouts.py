"""One test per deadline phase, each triggering exactly its error, through the real openai SDK.

The SDK keeps its default `max_retries=2`: every elapsed-time bound below is far under what a
single SDK retry would add (another full budget plus its backoff), so passing proves the
gateway's `x-should-retry: false` stopped the SDK from multiplying the caller's wait.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest

from tests.conftest import (
    CHAT,
    GatewayFactory,
    Simulator,
    one_route,
    raw_http,
    sdk,
    wait_until_idle,
)

pytestmark = pytest.mark.anyio

SLACK_S = 1.0  # scheduling noise on a loaded 2-core machine


async def expect_status_error(
    client: openai.AsyncOpenAI,
    code: str,
    *,
    stream: bool = False,
    headers: dict[str, Any] | None = None,
) -> float:
    """Call once; assert a 504-class API error with `code`; return the seconds it took."""
    started = anyio.current_time()
    with pytest.raises(openai.APIStatusError) as caught:
        await client.chat.completions.create(
            model="m", messages=CHAT, stream=stream, extra_headers=headers
        )
    elapsed = anyio.current_time() - started
    body = caught.value.body
    assert isinstance(body, dict), body
    assert body["code"] == code, body
    assert caught.value.response.headers["x-should-retry"] == "false"
    return elapsed


async def test_pool_wait_times_out(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(one_route(target_model="sim@hang=headers", upstream={"max_connections": 1}))
    async with sdk(server) as client, anyio.create_task_group() as group:
        group.start_soon(_hold_slot, client)
        await simulator.until(lambda s: s["open"] == 1)
        elapsed = await expect_status_error(
            client, "upstream_pool_timeout", headers={"x-request-timeout-ms": "1000"}
        )
        group.cancel_scope.cancel()
    assert 0.8 < elapsed < 1 + SLACK_S
    assert simulator.stats()["total"] == 1  # the queued request never reached the upstream
    wait_until_idle(server)


async def _hold_slot(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="m", messages=CHAT)


async def test_connect_times_out(gateway: GatewayFactory, unaccepting_port: int) -> None:
    data = one_route(upstream={"connect_s": 0.5})
    data["upstreams"][0]["base_url"] = f"http://127.0.0.1:{unaccepting_port}/v1"
    server = gateway(data)
    async with sdk(server) as client:
        elapsed = await expect_status_error(client, "upstream_connect_timeout")
    assert 0.4 < elapsed < 0.5 + SLACK_S


async def test_first_token_times_out(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(one_route(target_model="sim@ttft-ms=10000", budget={"ttft_s": 0.5}))
    async with sdk(server) as client:
        elapsed = await expect_status_error(client, "upstream_ttft_timeout", stream=True)
    assert 0.4 < elapsed < 0.5 + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0)


async def test_keepalive_comments_do_not_count_as_tokens(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """An upstream that sends `: keep-alive` but no tokens is stalled, not slow."""
    server = gateway(
        one_route(target_model="sim@hang=body,keepalive-ms=100", budget={"ttft_s": 0.8})
    )
    async with sdk(server) as client:
        elapsed = await expect_status_error(client, "upstream_ttft_timeout", stream=True)
    assert 0.7 < elapsed < 0.8 + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1)


async def test_gap_between_tokens_times_out_mid_stream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """After the first token the status is sent: a stall becomes one terminal SSE error event."""
    server = gateway(
        one_route(target_model="sim@hang=after-2,keepalive-ms=100", budget={"idle_s": 0.5})
    )
    received: list[str] = []
    started = anyio.current_time()
    async with sdk(server) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        with pytest.raises(openai.APIError) as caught:
            await _collect(stream, received)
    elapsed = anyio.current_time() - started
    assert len(received) == 2
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "upstream_idle_timeout"
    assert elapsed < 0.5 + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1)


async def _collect(stream: AsyncIterator[Any], received: list[str]) -> None:
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received.append(chunk.choices[0].delta.content)


@pytest.mark.parametrize(
    ("budget", "bound_s"),
    [({"total_s": 10, "attempt_s": 0.5}, 0.5), ({"total_s": 0.7}, 0.7)],
    ids=["attempt", "total"],
)
async def test_attempt_and_total_budgets(
    gateway: GatewayFactory, simulator: Simulator, budget: dict[str, float], bound_s: float
) -> None:
    server = gateway(one_route(target_model="sim@latency-ms=10000", budget=budget))
    async with sdk(server) as client:
        elapsed = await expect_status_error(client, "deadline_exceeded")
    assert bound_s - 0.1 < elapsed < bound_s + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1)


async def test_total_budget_mid_stream(gateway: GatewayFactory, simulator: Simulator) -> None:
    """Tokens keep flowing, but slower than the total allows: a terminal event at the deadline."""
    server = gateway(one_route(target_model="sim@tokens=100,gap-ms=100", budget={"total_s": 0.8}))
    async with sdk(server) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        with pytest.raises(openai.APIError) as caught:
            await _collect(stream, [])
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["code"] == "deadline_exceeded"
    simulator.wait_for(lambda s: s["cancelled"] == 1)


async def test_expired_on_arrival_calls_no_upstream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route())
    async with sdk(server) as client:
        elapsed = await expect_status_error(
            client, "deadline_exceeded", headers={"x-request-timeout-ms": "0"}
        )
    assert elapsed < SLACK_S
    assert simulator.stats()["total"] == 0


# --- client hints ---------------------------------------------------------------------------

HINTS_OF_ABOUT_0_6_S = [
    ("x-request-timeout-ms", "600"),
    ("grpc-timeout", "600m"),
    ("x-stainless-timeout", "0.6"),
    ("x-litellm-timeout", "0.6"),
    ("x-stainless-read-timeout", "0.6"),
]


@pytest.mark.parametrize(("name", "value"), HINTS_OF_ABOUT_0_6_S)
async def test_each_hint_shortens_the_budget(
    gateway: GatewayFactory, simulator: Simulator, name: str, value: str
) -> None:
    server = gateway(one_route(target_model="sim@latency-ms=10000", budget={"total_s": 30}))
    headers: dict[str, Any] = {name: value}
    if name == "x-stainless-timeout":  # as the JS SDK sends it: alone, without the read hint
        headers["x-stainless-read-timeout"] = openai.omit
    async with sdk(server) as client:
        elapsed = await expect_status_error(client, "deadline_exceeded", headers=headers)
    assert 0.45 < elapsed < 0.6 + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1)


@pytest.mark.parametrize("name", [name for name, _ in HINTS_OF_ABOUT_0_6_S])
async def test_no_hint_lengthens_the_budget(gateway: GatewayFactory, name: str) -> None:
    long_value = "60000" if name == "x-request-timeout-ms" else "60S" if "grpc" in name else "60"
    server = gateway(one_route(target_model="sim@latency-ms=10000", budget={"total_s": 0.6}))
    async with sdk(server) as client:
        elapsed = await expect_status_error(client, "deadline_exceeded", headers={name: long_value})
    assert elapsed < 0.6 + SLACK_S


@pytest.mark.parametrize(
    "name", [name for name, _ in HINTS_OF_ABOUT_0_6_S if not name.startswith("x-stainless-")]
)
def test_malformed_hint_is_400(gateway: GatewayFactory, name: str, simulator: Simulator) -> None:
    server = gateway(one_route())
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m", "messages": CHAT},
        headers={name: "soon"},
        timeout=5,
    )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "invalid_deadline_header"
    assert error["param"] == name
    assert response.headers["x-should-retry"] == "false"
    assert simulator.stats()["total"] == 0


def test_an_sdk_sending_not_given_is_served(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m", "messages": CHAT},
        headers={"x-stainless-timeout": "NOT_GIVEN", "x-stainless-read-timeout": "NOT_GIVEN"},
        timeout=5,
    )
    assert response.status_code == 200


def test_hints_are_ignored_when_disabled(gateway: GatewayFactory) -> None:
    server = gateway(one_route(server={"deadline": {"client_headers": False}}))
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m", "messages": CHAT},
        headers={"x-request-timeout-ms": "0", "grpc-timeout": "garbage"},
        timeout=5,
    )
    assert response.status_code == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_sdk_read_timeout_gets_a_gateway_504_first(
    gateway: GatewayFactory, stream: bool
) -> None:
    """The SDK sends its own read timeout; the gateway answers before the SDK would give up."""
    server = gateway(one_route(target_model="sim@latency-ms=10000,ttft-ms=10000"))
    async with sdk(server, timeout=1.0) as client:  # max_retries stays at the default 2
        code = "upstream_ttft_timeout" if stream else "deadline_exceeded"
        elapsed = await expect_status_error(client, code, stream=stream)
    assert elapsed < 1.0 + SLACK_S  # an SDK timeout would retry: 3 x 1 s and backoff


# --- propagation ----------------------------------------------------------------------------


def test_remaining_budget_is_forwarded_upstream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(budget={"total_s": 2}, server={"deadline": {"margin_s": 0.1}}))
    response = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "m", "messages": CHAT}, timeout=5
    )
    assert response.status_code == 200
    forwarded = int(simulator.stats()["last_headers"]["x-request-timeout-ms"])
    assert 1000 < forwarded <= 2000 - 200  # total, less the margin twice (ours and the hop's)


async def test_chained_gateways_enforce_the_outer_callers_budget(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    inner = gateway(one_route(target_model="sim@hang=headers", budget={"total_s": 30}))
    outer_config = one_route(budget={"total_s": 30})
    outer_config["upstreams"][0]["base_url"] = f"{inner.url}/v1"
    outer_config["routes"][0]["targets"][0]["model"] = "m"
    outer = gateway(outer_config)
    async with sdk(outer) as client:
        started = anyio.current_time()
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(
                model="m", messages=CHAT, extra_headers={"x-request-timeout-ms": "1000"}
            )
        elapsed = anyio.current_time() - started
    assert caught.value.status_code == 504
    assert elapsed < 1 + SLACK_S
    stats = simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0)
    assert int(stats["last_headers"]["x-request-timeout-ms"]) < 1000 - 2 * 50


def test_a_slow_upload_counts_against_the_deadline(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """The deadline starts at arrival: a body that trickles in is cut off at the deadline."""
    server = gateway(one_route())
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"x-request-timeout-ms: 600\r\ncontent-length: 100\r\n\r\n"
    )
    started = time.monotonic()
    answer = raw_http(server, head, [b"{"])  # 1 byte of 100, and no more
    elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 504")
    assert b'"deadline_exceeded"' in answer
    assert 0.45 < elapsed < 0.6 + SLACK_S
    assert simulator.stats()["total"] == 0
