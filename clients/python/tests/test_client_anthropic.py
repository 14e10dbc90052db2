"""`async_anthropic`: the real `anthropic` SDK on the gateway's /v1/messages, with `deadline()`
carried to the gateway and its Anthropic-shaped errors mapped like the OpenAI ones."""

from __future__ import annotations

import time
from contextlib import nullcontext
from typing import Any

import anthropic
import pytest

from gateway_client import (
    DeadlineExceeded,
    GatewayTimeout,
    anthropic_client,
    async_anthropic,
    deadline,
)

from conftest import SLACK_S, GatewayFactory, Simulator

pytestmark = pytest.mark.anyio

USER: list[Any] = [{"role": "user", "content": "hi"}]


def claude_routes(*specs: tuple[str, str, dict[str, float]]) -> dict[str, Any]:
    return {
        "upstreams": [{"name": "claude", "base_url": "${SIM}", "kind": "anthropic"}],
        "routes": [
            {"model": model, "targets": [{"upstream": "claude", "model": target}], "budget": b}
            for model, target, b in specs
        ],
    }


async def test_a_deadline_reaches_the_gateway_and_bounds_a_stalled_stream(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        claude_routes(("ok", "c@tokens=2", {}), ("stall", "c@hang=after-1,keepalive-ms=50", {}))
    )
    async with async_anthropic(base_url=f"{server.url}/v1") as client:
        async with deadline(5):
            message = await client.messages.create(model="ok", max_tokens=9, messages=USER)
        assert simulator.budget_seen_ms() <= 5000  # the caller's budget, carried upstream
        assert message.content[0].text == "tok0 tok1 "  # type: ignore[union-attr]
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await read_stream(client, within=0.5)
        assert time.monotonic() - started < 0.5 + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0)


async def read_stream(client: anthropic.AsyncAnthropic, within: float | None = None) -> None:
    """Read a stream of the `stall` route to its end, inside `deadline(within)` if given."""
    async with deadline(within) if within is not None else nullcontext():
        stream = await client.messages.create(
            model="stall", max_tokens=9, messages=USER, stream=True
        )
        async for _ in stream:
            pass


async def test_anthropic_shaped_timeouts_are_gateway_timeouts(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        claude_routes(
            ("slow", "c@ttft-ms=5000", {"ttft_s": 0.3}),
            ("stall", "c@hang=after-1", {"idle_s": 0.3}),
        )
    )
    async with async_anthropic(base_url=server.url) as client:
        with pytest.raises(GatewayTimeout) as status:
            await client.messages.create(model="slow", max_tokens=9, messages=USER)
        with pytest.raises(GatewayTimeout) as event:
            await read_stream(client)  # outside a deadline
    assert (status.value.code, status.value.status_code) == ("upstream_ttft_timeout", 504)
    assert (event.value.code, event.value.status_code) == ("upstream_idle_timeout", None)
    simulator.wait_for(lambda s: s["cancelled"] == 2 and s["open"] == 0)  # both were cut


def test_the_synchronous_client_is_bounded_by_a_deadline_too(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """Nothing can interrupt synchronous code: the transport's per-read bounds and the header
    the gateway enforces end a stalled stream at the deadline."""
    server = gateway(claude_routes(("stall", "c@hang=after-1,keepalive-ms=50", {})))
    with anthropic_client(base_url=server.url) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded), deadline(0.5):
            for _ in client.messages.create(
                model="stall", max_tokens=9, messages=USER, stream=True
            ):
                pass
        assert time.monotonic() - started < 0.5 + SLACK_S
    simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0)
