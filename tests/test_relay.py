"""Retries and fallbacks: only while the budget allows, only before the first byte."""

from __future__ import annotations

import socket
import time
from typing import Any

import httpx2 as httpx
import openai
import pytest

from tests.conftest import CHAT, GatewayFactory, Simulator, sdk

pytestmark = pytest.mark.anyio


def two_targets(first: str, second: str, **route: Any) -> dict[str, Any]:
    return {
        "upstreams": [
            {"name": "primary", "base_url": "${SIM}"},
            {"name": "backup", "base_url": "${SIM}"},
        ],
        "routes": [
            {
                "model": "m",
                "targets": [
                    {"upstream": "primary", "model": first},
                    {"upstream": "backup", "model": second},
                ],
                **route,
            }
        ],
    }


def chat(url: str, **body: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json={"model": "m", "messages": CHAT, **body}, timeout=10
    )


def test_falls_back_to_the_next_target(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(two_targets("sim@status=502", "sim@tokens=2"))
    response = chat(server.url)
    assert response.status_code == 200
    assert response.headers["x-gateway-upstream"] == "backup"
    assert response.headers["x-gateway-attempts"] == "2"
    assert simulator.stats()["total"] == 2


def test_falls_back_when_the_first_upstream_refuses(gateway: GatewayFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    data = two_targets("sim", "sim")
    data["upstreams"][0]["base_url"] = f"http://127.0.0.1:{closed}/v1"
    response = chat(gateway(data).url)
    assert response.status_code == 200
    assert response.headers["x-gateway-upstream"] == "backup"


def test_falls_back_when_the_first_token_is_late(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = two_targets("sim@ttft-ms=5000", "sim@tokens=2", budget={"total_s": 5, "ttft_s": 0.4})
    data["routes"][0]["retry"] = {"retry_on": ["ttft"]}
    response = chat(gateway(data).url, stream=True)
    assert response.status_code == 200
    assert response.headers["x-gateway-upstream"] == "backup"
    assert "[DONE]" in response.text
    simulator.wait_for(lambda s: s["cancelled"] == 1 and s["completed"] == 1)


def test_retries_a_listed_status_then_passes_the_last_answer_through(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = two_targets("sim@status=503", "sim@status=503")
    data["routes"][0]["retry"] = {"attempts": 2, "backoff_s": 0.01, "retry_on": [503]}
    response = chat(gateway(data).url)
    assert response.status_code == 503
    assert response.headers["x-gateway-attempts"] == "4"
    assert simulator.stats()["total"] == 4


def test_a_target_that_asked_for_time_is_passed_over_for_the_next(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """A 503 with Retry-After cools the primary: its retry is passed over for the backup;
    the backup, the last one left, is retried once its own Retry-After has passed."""
    data = two_targets("sim@status=503,retry-after=1", "sim@status=503,retry-after=1")
    data["routes"][0]["retry"] = {"attempts": 2, "backoff_s": 0.01, "retry_on": [503]}
    started = time.monotonic()
    response = chat(gateway(data).url)
    assert response.status_code == 503
    assert response.headers["x-gateway-attempts"] == "3"
    assert simulator.stats()["total"] == 3
    assert 1.0 <= time.monotonic() - started < 1.0 + 1.5


def test_does_not_retry_an_unlisted_status(gateway: GatewayFactory, simulator: Simulator) -> None:
    data = two_targets("sim@status=400", "sim")
    data["routes"][0]["retry"] = {"attempts": 3, "retry_on": [503]}
    response = chat(gateway(data).url)
    assert response.status_code == 400
    assert simulator.stats()["total"] == 1


def test_retries_stop_when_the_budget_runs_out(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = two_targets("sim@status=503,latency-ms=300", "sim@status=503,latency-ms=300")
    data["routes"][0]["retry"] = {"attempts": 10, "backoff_s": 0.1, "retry_on": [503]}
    data["routes"][0]["budget"] = {"total_s": 1.2}
    started = time.monotonic()
    response = chat(gateway(data).url)
    elapsed = time.monotonic() - started
    assert response.status_code in (503, 504)
    assert elapsed < 1.2 + 1.0
    assert simulator.stats()["total"] < 6  # nowhere near the 20 the policy would allow


async def test_never_retries_after_the_first_token(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = two_targets("sim@hang=after-1", "sim@tokens=3", budget={"idle_s": 0.3})
    data["routes"][0]["retry"] = {"attempts": 3, "retry_on": ["ttft", "protocol", 503]}
    server = gateway(data)
    async with sdk(server, max_retries=0) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        with pytest.raises(openai.APIError):
            async for _ in stream:
                pass
    stats = simulator.wait_for(lambda s: s["cancelled"] == 1)
    assert stats["total"] == 1
