"""Bounded pools: a hard cap on upstream sockets, a bounded FIFO queue, shedding, and a pool
that is idle again after any mix of timeouts, cancellations and errors."""

from __future__ import annotations

import asyncio
import json
import re
import time

import anyio
import httpx2 as httpx
import openai
import pytest

from tests.conftest import (
    CHAT,
    GatewayFactory,
    RawServer,
    Simulator,
    SocketCounter,
    debug_state,
    off_loop,
    one_route,
    sdk,
    wait_until_idle,
    wait_until_queued,
)

pytestmark = pytest.mark.anyio


async def test_connections_never_exceed_the_cap(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """Counted in sockets, between the gateway and the upstream. (The simulator's `peak_open`
    counts requests whose handler has not returned: a server may start the next request on a
    connection before the last one's handler returns, so it can read 3 with 2 sockets.)"""
    with SocketCounter(simulator.port) as counter:
        server = gateway(
            one_route(target_model="sim@latency-ms=200", upstream={"max_connections": 2}),
            env={"SIM": f"http://127.0.0.1:{counter.port}/v1"},
        )
        async with sdk(server) as client, anyio.create_task_group() as group:
            for _ in range(8):
                group.start_soon(_call, client)
        assert simulator.stats()["completed"] == 8
        assert counter.peak == 2
        wait_until_idle(server)


async def test_connections_are_reused(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(one_route(target_model="sim@tokens=2"))
    async with sdk(server) as client:
        for stream in (False, True, False, True):
            response = await client.chat.completions.create(model="m", messages=CHAT, stream=stream)
            if stream:
                async for _ in response:  # type: ignore[union-attr]
                    pass
    assert simulator.stats()["connections"] == 1
    pool = debug_state(server)["pools"]["sim"]
    assert (pool["connections_active"], pool["connections_idle"]) == (0, 1)


async def test_an_upstream_connection_close_is_honoured(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@tokens=2,close=true"))
    async with sdk(server, max_retries=0) as client:
        for stream in (False, True, False):
            response = await client.chat.completions.create(model="m", messages=CHAT, stream=stream)
            if stream:
                async for _ in response:  # type: ignore[union-attr]
                    pass
    assert simulator.stats()["completed"] == 3
    assert simulator.stats()["connections"] == 3  # a new socket each time, none failed
    wait_until_idle(server)
    await anyio.sleep(0.1)  # the closed socket is seen closed
    assert debug_state(server)["pools"]["sim"]["connections_idle"] == 0


async def test_pool_gauges_count_the_sockets_in_use(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@hang=body", budget={"total_s": 5}))
    async with sdk(server, max_retries=0) as client, anyio.create_task_group() as group:
        group.start_soon(_hang, client)
        await simulator.until(lambda s: s["open"] == 1)
        pool = (await off_loop(debug_state, server))["pools"]["sim"]
        assert (pool["admitted"], pool["connections_active"]) == (1, 1)
        group.cancel_scope.cancel()
    wait_until_idle(server)
    pool = debug_state(server)["pools"]["sim"]
    assert pool["connections_idle"] == 0  # a cancelled answer's socket is closed, not reused


async def _call(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="m", messages=CHAT)


async def _hang(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIStatusError):
        await client.chat.completions.create(model="m", messages=CHAT)


async def test_full_queue_sheds_at_once_with_retry_after(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        one_route(
            target_model="sim@hang=headers",
            budget={"total_s": 3},
            upstream={"max_connections": 1, "max_pending": 1},
        )
    )
    async with sdk(server, max_retries=0) as client, anyio.create_task_group() as group:
        group.start_soon(_hang, client)  # takes the connection
        await simulator.until(lambda s: s["open"] == 1)
        group.start_soon(_hang, client)  # waits in the queue
        await off_loop(wait_until_queued, server, "sim", 1)
        started = time.monotonic()
        async with httpx.AsyncClient() as plain:
            response = await plain.post(
                f"{server.url}/v1/chat/completions", json={"model": "m", "messages": CHAT}
            )
        assert time.monotonic() - started < 0.5  # shed at once, not after a wait
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "upstream_saturated"
        assert int(response.headers["retry-after"]) >= 1
        assert response.headers["x-should-retry"] == "true"
        assert (await off_loop(simulator.stats))["total"] == 1  # the shed one: never
    wait_until_idle(server)


async def test_queued_request_runs_when_a_slot_frees(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@latency-ms=300", upstream={"max_connections": 1}))
    async with sdk(server) as client:
        first = time.monotonic()
        async with anyio.create_task_group() as group:
            group.start_soon(_call, client)
            group.start_soon(_call, client)
        elapsed = time.monotonic() - first
    assert elapsed > 0.55  # one after the other
    assert simulator.stats()["completed"] == 2


async def test_pool_is_idle_after_a_mix_of_failures(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    targets = {
        "ok": "sim@tokens=3",
        "ttft": "sim@ttft-ms=5000",
        "idle": "sim@hang=after-1",
        "reset": "sim@reset=after-1",
        "status": "sim@status=500",
        "garbage": "sim@malformed=sse",
        "hang": "sim@hang=headers",
    }
    data = one_route(upstream={"max_connections": 3})
    data["routes"] = [
        {
            "model": name,
            "targets": [{"upstream": "sim", "model": target}],
            "budget": {"total_s": 1, "ttft_s": 0.5, "idle_s": 0.3},
        }
        for name, target in targets.items()
    ]
    server = gateway(data)

    async def one(model: str, stream: bool) -> None:
        with anyio.move_on_after(0.7):  # some are cut short by the client instead
            try:
                response = await client.chat.completions.create(
                    model=model, messages=CHAT, stream=stream
                )
                if stream:
                    async for _ in response:  # type: ignore[union-attr]
                        pass
            except openai.APIError:
                pass

    async with sdk(server, max_retries=0) as client, anyio.create_task_group() as group:
        for _ in range(2):
            for model in targets:
                for stream in (False, True):
                    group.start_soon(one, model, stream)
    wait_until_idle(server, within_s=3)
    simulator.wait_for(lambda s: s["open"] == 0)


class ClosesIdleConnections(RawServer):
    """An upstream whose keep-alive runs out as the gateway reuses the connection: it answers
    the first request on each connection and drops the connection on the second, unanswered
    (what a server closing an idle socket looks like to a client that sent at that moment)."""

    ANSWER = json.dumps(
        {
            "id": "c",
            "object": "chat.completion",
            "created": 0,
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi"},
                    "finish_reason": "stop",
                }
            ],
        }
    ).encode()

    def __init__(self) -> None:
        super().__init__()
        self.answered = self.dropped = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        served = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = re.search(rb"(?i)content-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if served:
                    self.dropped += 1
                    return  # closed without an answer
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n%s" % (len(self.ANSWER), self.ANSWER)
                )
                await writer.drain()
                served += 1
                self.answered += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def test_a_pooled_connection_the_upstream_dropped_is_sent_again_on_a_new_one(
    gateway: GatewayFactory,
) -> None:
    with ClosesIdleConnections() as upstream:
        data = one_route(upstream={"base_url": f"http://127.0.0.1:{upstream.port}/v1"})
        data["routes"][0]["upstream_stream"] = False
        server = gateway(data)
        for _ in range(3):
            response = httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "m", "messages": CHAT},
                timeout=10,
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-gateway-attempts"] == "1"  # not a retry of ours
        assert (upstream.answered, upstream.dropped) == (3, 2)
