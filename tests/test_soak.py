"""A bounded soak: a couple of thousand requests mixing every fault, streaming or not, a
fifth of them abandoned by their client at a random moment. Afterwards nothing is in flight,
every pool is idle and the upstream has no open request: nothing leaked."""

from __future__ import annotations

import random

import anyio
import httpx2 as httpx
import pytest

from tests.conftest import CHAT, GatewayFactory, Simulator, off_loop, wait_until_idle

pytestmark = pytest.mark.anyio

REQUESTS = 1500
CONCURRENCY = 40
FAULTS = {
    "ok": "sim@tokens=3,gap-ms=5",
    "slow": "sim@ttft-ms=300,tokens=2",
    "stall": "sim@hang=after-1,keepalive-ms=50",
    "hang": "sim@hang=headers",
    "reset": "sim@reset=after-1",
    "status": "sim@status=503,retry-after=1",
    "garbage": "sim@malformed=sse",
    "tools": "sim@tool-calls=2,tokens=2",
}


async def test_a_mixed_fault_soak_leaves_nothing_behind(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    routes = [
        {
            "model": name,
            "targets": [{"upstream": "sim", "model": target}],
            "budget": {"total_s": 1.5, "ttft_s": 0.4, "idle_s": 0.3},
            "retry": {"attempts": 2, "backoff_s": 0.01, "retry_on": [503, "ttft", "idle"]},
        }
        for name, target in FAULTS.items()
    ]
    server = gateway(
        {
            "upstreams": [
                {
                    "name": "sim",
                    "base_url": "${SIM}",
                    "max_connections": 16,
                    "max_pending": 64,
                    # Ejection would turn most of the faults below into a quick 503 and
                    # leave their paths untested; it has tests of its own.
                    "outlier": {"consecutive_failures": 1_000_000},
                }
            ],
            "routes": routes,
        }
    )
    rng = random.Random(7)
    statuses: dict[int, int] = {}
    limiter = anyio.Semaphore(CONCURRENCY)

    async def one(client: httpx.AsyncClient, model: str, stream: bool, give_up: float) -> None:
        async with limiter:
            with anyio.move_on_after(give_up):  # the client leaving, in any phase
                body = {"model": model, "messages": CHAT, "stream": stream}
                async with client.stream("POST", "/v1/chat/completions", json=body) as response:
                    async for _ in response.aiter_bytes():
                        pass
                    statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
        anyio.create_task_group() as group,
    ):
        for _ in range(REQUESTS):
            give_up = rng.uniform(0.01, 0.5) if rng.random() < 0.2 else 30.0
            model = rng.choice(list(FAULTS))
            group.start_soon(one, client, model, rng.random() < 0.5, give_up)
    assert set(statuses) <= {200, 502, 503, 504}, statuses  # never a 500
    assert statuses.get(200, 0) > REQUESTS // 10  # the healthy routes were served
    await off_loop(wait_until_idle, server, 5.0)
    await simulator.until(lambda s: s["open"] == 0, 5.0)
