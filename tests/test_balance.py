"""One route over many equal upstreams, through real sockets: three upstream entries on the
simulator behind one route, balanced by least load and first-token time, with weights,
prefix affinity, deadlines, and an overflow target of a lower priority."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Any

import anyio
import httpx2 as httpx
import pytest

from gateway.app import create_app
from gateway.config import parse_config
from tests.conftest import (
    CHAT,
    GatewayFactory,
    LiveServer,
    RedisServer,
    Simulator,
    debug_state,
    wait_until_idle,
)
from tests.test_resilience import delta, scrape

pytestmark = pytest.mark.anyio

MEMBERS = ("vllm-a", "vllm-b", "vllm-c")


def pool(
    models: dict[str, str],
    *,
    weights: dict[str, int] | None = None,
    max_connections: int = 64,
    overflow: str | None = None,
    **route: Any,
) -> dict[str, Any]:
    """A route `m` over one upstream entry per member (all on the simulator), each with its
    target model (simulator knobs), all of priority 0; `overflow` adds a priority 1 target."""
    upstreams = [
        {
            "name": name,
            "base_url": "${SIM}",
            "max_connections": max_connections,
            "forward_headers": ["x-sim-ttft-ms", "x-sim-gap-ms"],
        }
        for name in models
    ]
    targets = [
        {"upstream": name, "model": model, "priority": 0, "weight": (weights or {}).get(name, 1)}
        for name, model in models.items()
    ]
    if overflow is not None:
        upstreams.append({"name": "overflow", "base_url": "${SIM}"})
        targets.append({"upstream": "overflow", "model": overflow, "priority": 1})
    return {"upstreams": upstreams, "routes": [{"model": "m", "targets": targets, **route}]}


async def call(
    client: httpx.AsyncClient,
    *,
    messages: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    return await client.post(
        "/v1/chat/completions",
        json={"model": "m", "messages": messages or CHAT},
        headers=headers or {},
    )


async def served_by(
    server: LiveServer, count: int, concurrency: int, **kwargs: Any
) -> Counter[str]:
    """`count` requests, `concurrency` at a time: how many each upstream served."""
    served: Counter[str] = Counter()
    limiter = anyio.Semaphore(concurrency)

    async def one(client: httpx.AsyncClient) -> None:
        async with limiter:
            response = await call(client, **kwargs)
        assert response.status_code == 200, response.text
        served[response.headers["x-gateway-upstream"]] += 1

    async with (
        httpx.AsyncClient(base_url=server.url, timeout=30) as client,
        anyio.create_task_group() as group,
    ):
        for _ in range(count):
            group.start_soon(one, client)
    return served


@contextmanager
def watching(server: LiveServer, caps: dict[str, int]) -> Iterator[list[str]]:
    """Sample /debug/inflight every few ms while the block runs; yield the violations seen:
    a member over its cap, or a request queued while a member had a free slot."""
    violations: list[str] = []
    samples = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal samples
        while not done.is_set():
            pools = debug_state(server)["pools"]
            samples += 1
            for name, cap in caps.items():
                if pools[name]["admitted"] > cap:
                    violations.append(f"{name} over its cap: {pools}")
            queued = any(pools[name]["queued"] for name in caps)
            free = [name for name, cap in caps.items() if pools[name]["admitted"] < cap]
            if queued and free:
                violations.append(f"queued while {free} had a free slot: {pools}")
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield violations
    finally:
        done.set()
        sampler.join(timeout=5)
    assert samples >= 10  # the pool was watched, not glanced at


async def test_sixty_slow_requests_fill_every_member_and_queue_only_when_all_are_full(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    slow = "sim@ttft-ms=100,gap-ms=50,tokens=4"
    server = gateway(pool(dict.fromkeys(MEMBERS, slow), max_connections=4))
    with watching(server, dict.fromkeys(MEMBERS, 4)) as violations:
        served = await served_by(server, 60, 60)
    assert not violations, violations[:3]
    assert set(served) == set(MEMBERS)
    assert all(count >= 10 for count in served.values()), served
    assert simulator.stats()["total"] == 60  # no retries: nothing was shed
    await anyio.to_thread.run_sync(wait_until_idle, server)


async def test_a_member_slow_to_first_token_gets_clearly_fewer(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    models = {
        "vllm-a": "sim@ttft-ms=80,tokens=2",
        "vllm-b": "sim@ttft-ms=80,tokens=2",
        "vllm-c": "sim@ttft-ms=600,tokens=2",  # over 7 times the others'
    }
    server = gateway(pool(models, max_connections=8))
    served = await served_by(server, 90, 6)
    assert served["vllm-c"] * 3 <= min(served["vllm-a"], served["vllm-b"]), served


async def test_weights_share_the_requests(gateway: GatewayFactory, simulator: Simulator) -> None:
    equal = "sim@tokens=2"
    server = gateway(pool(dict.fromkeys(MEMBERS, equal), weights={"vllm-c": 2}))
    before = scrape(server.url)
    served = await served_by(server, 240, 8)
    shares = {name: served[name] / 240 for name in MEMBERS}
    assert abs(shares["vllm-c"] - 0.5) <= 0.10, served
    assert abs(shares["vllm-a"] - 0.25) <= 0.10, served
    assert abs(shares["vllm-b"] - 0.25) <= 0.10, served
    picks = delta(before, scrape(server.url))
    name = 'llm_gateway_balance_picks_total{reason="least_load",route="m",upstream="vllm-c"}'
    assert picks[name] == served["vllm-c"]


async def test_affinity_keeps_conversations_and_moves_only_the_ejected_members() -> None:
    with ExitStack() as stack:
        simulators = {name: stack.enter_context(Simulator()) for name in MEMBERS}
        data: dict[str, Any] = {
            "upstreams": [
                {
                    "name": name,
                    "base_url": sim.base_url,
                    "outlier": {"consecutive_failures": 1, "base_ejection_s": 60},
                }
                for name, sim in simulators.items()
            ],
            "routes": [
                {
                    "model": "m",
                    "balance": "affinity",
                    "affinity": {"key": "prefix", "prefix_messages": 2},
                    "targets": [
                        {"upstream": name, "model": "sim@tokens=2", "priority": 0}
                        for name in MEMBERS
                    ],
                }
            ],
        }
        server = stack.enter_context(LiveServer(create_app(parse_config(data, {}))))

        def turns(conversation: int, count: int) -> list[list[dict[str, str]]]:
            system = {"role": "system", "content": "You answer briefly."}
            history = [system, {"role": "user", "content": f"conversation {conversation}"}]
            out = []
            for turn in range(count):
                out.append(list(history))
                history += [
                    {"role": "assistant", "content": f"answer {turn}"},
                    {"role": "user", "content": f"question {turn + 1}"},
                ]
            return out

        async def converse(client: httpx.AsyncClient, conversation: int) -> list[str]:
            members = []
            for messages in turns(conversation, 5):
                response = await call(client, messages=messages)
                assert response.status_code == 200, response.text
                members.append(response.headers["x-gateway-upstream"])
            return members

        async def all_conversations() -> dict[int, list[str]]:
            result: dict[int, list[str]] = {}

            async def one(client: httpx.AsyncClient, conversation: int) -> None:
                result[conversation] = await converse(client, conversation)

            async with (
                httpx.AsyncClient(base_url=server.url, timeout=30) as client,
                anyio.create_task_group() as group,
            ):
                for conversation in range(20):
                    group.start_soon(one, client, conversation)
            return result

        before = await all_conversations()
        assert all(len(set(members)) == 1 for members in before.values()), before
        home = {conversation: members[0] for conversation, members in before.items()}
        assert len(set(home.values())) == 3  # spread over the pool
        # vllm-b goes away: its first failed call ejects it
        gone = "vllm-b"
        simulators[gone].__exit__(None, None, None)
        after = await all_conversations()
        for conversation, members in after.items():
            assert len(set(members)) == 1, (conversation, members)  # still one member each
            if home[conversation] != gone:
                assert members[0] == home[conversation]  # only the ejected member's moved
            else:
                assert members[0] != gone


async def test_a_member_too_slow_for_the_time_left_is_passed_over(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    models = {
        "vllm-a": "sim@ttft-ms=200,tokens=2",
        "vllm-b": "sim@ttft-ms=200,tokens=2",
        "vllm-c": "sim@ttft-ms=3000,tokens=2",
    }
    data = pool(models, max_connections=2)
    data["upstreams"][2]["max_connections"] = 8
    server = gateway(data)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        # warm up: 10 at once fill a and b, so c serves (and its first tokens are timed)
        warm: Counter[str] = Counter()

        async def one() -> None:
            response = await call(client)
            warm[response.headers["x-gateway-upstream"]] += 1

        async with anyio.create_task_group() as group:
            for _ in range(10):
                group.start_soon(one)
        assert warm["vllm-c"] >= 6, warm
        # a and b busy (a short while), c free: a request with 1 s left waits for a or b
        before = scrape(server.url)
        results: dict[str, httpx.Response] = {}

        async def occupy() -> None:
            await call(client, headers={"x-sim-gap-ms": "150"})

        async def tight() -> None:
            await anyio.sleep(0.1)
            results["tight"] = await call(client, headers={"x-request-timeout-ms": "1000"})

        async def roomy() -> None:  # the control: with time enough, c's free slot serves
            await anyio.sleep(0.15)
            results["roomy"] = await call(client, headers={"x-request-timeout-ms": "10000"})

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(occupy)
            group.start_soon(tight)
            group.start_soon(roomy)
    tight_response = results["tight"]
    attempts = delta(before, scrape(server.url))
    assert (
        'llm_gateway_upstream_attempts_total{outcome="ok",route="m",upstream="vllm-c"}' in attempts
    )
    assert (
        attempts['llm_gateway_upstream_attempts_total{outcome="ok",route="m",upstream="vllm-c"}']
        == 1
    )
    assert results["roomy"].headers["x-gateway-upstream"] == "vllm-c"
    if tight_response.status_code == 200:
        assert tight_response.headers["x-gateway-upstream"] in ("vllm-a", "vllm-b")
    else:  # a noisy machine: it waited for a or b and ran out; never c
        assert tight_response.json()["error"]["code"] == "upstream_pool_timeout"


async def test_the_overflow_serves_only_when_the_pool_is_full(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        pool(
            {"vllm-a": "sim@tokens=2", "vllm-b": "sim@tokens=2"},
            max_connections=2,
            overflow="sim@tokens=1",
        )
    )
    assert "overflow" not in await served_by(server, 30, 3)  # 3 at a time: the pool has room
    before = scrape(server.url)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
        served: list[str] = []

        async def occupy() -> None:
            response = await call(client, headers={"x-sim-ttft-ms": "600"})
            served.append(response.headers["x-gateway-upstream"])

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(occupy)
            await anyio.sleep(0.2)  # a and b full
            spilled = await call(client)
    assert sorted(served) == ["vllm-a", "vllm-a", "vllm-b", "vllm-b"]
    assert spilled.headers["x-gateway-upstream"] == "overflow"
    picks = delta(before, scrape(server.url))
    assert (
        picks['llm_gateway_balance_picks_total{reason="overflow",route="m",upstream="overflow"}']
        == 1
    )


def test_the_overflow_serves_when_the_pool_is_cooling_or_ejected(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = pool(
        {"vllm-a": "sim@status=429,retry-after=30,flaky=1", "vllm-b": "sim@status=500,flaky=1"},
        overflow="sim@tokens=1",
        retry={"retry_on": [429, 500]},
    )
    data["upstreams"][1]["outlier"] = {"consecutive_failures": 1}
    server = gateway(data)
    first = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "m", "messages": CHAT}, timeout=10
    )
    assert first.headers["x-gateway-upstream"] == "overflow"
    assert first.headers["x-gateway-attempts"] == "3"  # a and b each once, then the overflow
    later = httpx.post(
        f"{server.url}/v1/chat/completions", json={"model": "m", "messages": CHAT}, timeout=10
    )
    assert later.headers["x-gateway-upstream"] == "overflow"
    assert later.headers["x-gateway-attempts"] == "1"  # a cooling, b ejected: not called
    assert simulator.stats()["total"] == 4


async def test_a_shared_cap_balances_on_what_the_whole_gateway_holds(
    gateway: GatewayFactory, simulator: Simulator, redis_server: RedisServer
) -> None:
    """Two gateways, one Redis: the other gateway fills vllm-a; this one learns it from the
    counts its own acquires bring back, and sends to vllm-b without waiting for a."""
    shared = {"redis_url": redis_server.url, "key_prefix": "balance-shared:"}
    members = {"vllm-a": "sim@tokens=2", "vllm-b": "sim@tokens=2"}
    data = pool(members, max_connections=2)
    data["shared"] = shared
    data["routes"].append({"model": "only-b", "targets": [{"upstream": "vllm-b", "model": "sim"}]})
    here = gateway(data)
    other_data = pool({"vllm-a": "sim@tokens=2"}, max_connections=2)
    other_data["shared"] = shared
    other = gateway(other_data)
    async with (
        httpx.AsyncClient(base_url=other.url, timeout=30) as there,
        httpx.AsyncClient(base_url=here.url, timeout=30) as client,
        anyio.create_task_group() as group,
    ):
        for _ in range(2):  # vllm-a full, held by the other gateway for 3 s
            group.start_soon(partial(call, there, headers={"x-sim-ttft-ms": "3000"}))
        await anyio.sleep(0.3)
        warm = await client.post("/v1/chat/completions", json={"model": "only-b", "messages": CHAT})
        assert warm.status_code == 200  # its acquire on vllm-b counted vllm-a's slots too
        started = time.monotonic()
        served = [(await call(client)).headers["x-gateway-upstream"] for _ in range(8)]
        took = time.monotonic() - started
    assert served == ["vllm-b"] * 8, served
    assert took < 2.0  # none waited for vllm-a's slots to free


def post(server: LiveServer) -> httpx.Response:
    return httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m", "messages": CHAT, "stream": True},
        timeout=10,
    )


def test_a_retry_and_a_hedge_go_to_another_member(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    # round_robin starts at vllm-a: its 502 is retried on vllm-b, not on vllm-a again
    failing = pool(
        {"vllm-a": "sim@status=502", "vllm-b": "sim@tokens=2", "vllm-c": "sim@tokens=2"},
        balance="round_robin",
        retry={"attempts": 2, "backoff_s": 0},
    )
    response = post(gateway(failing))
    assert response.status_code == 200
    assert response.headers["x-gateway-upstream"] in ("vllm-b", "vllm-c")
    assert response.headers["x-gateway-attempts"] == "2"
    # a first attempt slow to its first token is hedged on another member, which wins
    slow = pool(
        {"vllm-a": "sim@ttft-ms=3000", "vllm-b": "sim@tokens=2"},
        balance="round_robin",
        hedge={"after_s": 0.2},
    )
    server = gateway(slow)
    before = scrape(server.url)
    started = time.monotonic()
    hedged = post(server)
    assert hedged.headers["x-gateway-upstream"] == "vllm-b"
    assert hedged.headers["x-gateway-attempts"] == "2"
    assert time.monotonic() - started < 2
    counted = delta(before, scrape(server.url))
    assert counted['llm_gateway_hedges_total{outcome="won",route="m"}'] == 1
    assert (
        counted['llm_gateway_balance_picks_total{reason="round_robin",route="m",upstream="vllm-b"}']
        == 1
    )


def test_a_pool_wholly_ejected_is_panic_routed_to_the_member_back_soonest(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = pool(
        {"vllm-a": "sim@status=500,flaky=1", "vllm-b": "sim@status=500,flaky=1,tokens=3"},
        retry={"retry_on": [500]},
    )
    for upstream in data["upstreams"]:
        upstream["outlier"] = {"consecutive_failures": 1, "base_ejection_s": 30}
    server = gateway(data)
    failed = post(server)  # each member fails once: both ejected
    assert failed.status_code == 500
    assert failed.headers["x-gateway-attempts"] == "2"
    before = scrape(server.url)
    panic = post(server)  # every member out: the one back soonest (ejected first) serves
    assert panic.status_code == 200
    assert panic.headers["x-gateway-attempts"] == "1"
    counted = delta(before, scrape(server.url))
    assert counted['llm_gateway_panic_routed_total{route="m"}'] == 1
