"""Upstream work is cancelled the moment nobody wants it: client gone (in every phase) or
deadline passed. Each test proves it where it counts: at the simulator, and in the pool."""

from __future__ import annotations

import socket
import time

import anyio
import openai
import pytest

from tests.conftest import (
    CHAT,
    GatewayFactory,
    Simulator,
    debug_state,
    off_loop,
    one_route,
    sdk,
    wait_until_idle,
    wait_until_queued,
)

pytestmark = pytest.mark.anyio

CLIENT_PATIENCE_S = 0.4
SEEN_WITHIN_S = 2.0


async def give_up_on(client: openai.AsyncOpenAI, stream: bool, after_tokens: int = 0) -> None:
    """Call, then walk away after CLIENT_PATIENCE_S (or after some tokens) like a user would."""
    with anyio.move_on_after(CLIENT_PATIENCE_S if not after_tokens else 10):
        if not stream:
            await client.chat.completions.create(model="m", messages=CHAT)
            raise AssertionError("the call was expected to hang")
        response = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        tokens = 0
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta.content:
                tokens += 1
            if after_tokens and tokens == after_tokens:
                await response.close()
                return
    assert not after_tokens, "the stream never delivered the tokens expected"


@pytest.mark.parametrize(
    ("target", "stream", "after_tokens"),
    [
        ("sim@hang=headers", False, 0),  # non-streaming, upstream still working
        ("sim@hang=headers", True, 0),  # streaming, before upstream headers
        ("sim@hang=body,keepalive-ms=50", True, 0),  # upstream headers sent, no first token
        ("sim@hang=after-2,keepalive-ms=50", True, 2),  # mid-stream
    ],
    ids=["non-streaming", "before-headers", "before-first-token", "mid-stream"],
)
async def test_client_disconnect_cancels_upstream(
    gateway: GatewayFactory, simulator: Simulator, target: str, stream: bool, after_tokens: int
) -> None:
    server = gateway(one_route(target_model=target))
    async with sdk(server) as client:
        await give_up_on(client, stream=stream, after_tokens=after_tokens)
    stats = simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0, SEEN_WITHIN_S)
    assert stats["completed"] == 0
    wait_until_idle(server)


async def test_client_disconnect_while_queued_leaves_the_queue(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@hang=headers", upstream={"max_connections": 1}))
    async with sdk(server) as holder, anyio.create_task_group() as group:
        group.start_soon(give_up_on_later, holder)
        await simulator.until(lambda s: s["open"] == 1)
        async with sdk(server) as client, anyio.create_task_group() as inner:
            inner.start_soon(give_up_on, client, False)
            await off_loop(wait_until_queued, server, "sim", 1)
        await off_loop(wait_until_queued, server, "sim", 0)
        group.cancel_scope.cancel()
    assert simulator.stats()["total"] == 1  # the queued request never reached the upstream
    simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0)
    wait_until_idle(server)


async def give_up_on_later(client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="m", messages=CHAT)


async def test_client_disconnect_while_connecting(
    gateway: GatewayFactory,
    unaccepting_port: int,
) -> None:
    data = one_route(upstream={"connect_s": 30})
    data["upstreams"][0]["base_url"] = f"http://127.0.0.1:{unaccepting_port}/v1"
    server = gateway(data)
    async with sdk(server) as client, anyio.create_task_group() as group:
        group.start_soon(give_up_on, client, False)
        await anyio.sleep(CLIENT_PATIENCE_S / 2)
        phases = [row["phase"] for row in (await off_loop(debug_state, server))["inflight"]]
        assert phases == ["connecting"]
    wait_until_idle(server, SEEN_WITHIN_S)


@pytest.mark.parametrize("stream", [False, True])
async def test_deadline_cancels_upstream(
    gateway: GatewayFactory, simulator: Simulator, stream: bool
) -> None:
    server = gateway(one_route(target_model="sim@hang=headers", budget={"total_s": 0.5}))
    async with sdk(server) as client:
        with pytest.raises(openai.APIStatusError):
            await client.chat.completions.create(model="m", messages=CHAT, stream=stream)
    simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0, SEEN_WITHIN_S)
    wait_until_idle(server)


def access_outcomes(caplog: pytest.LogCaptureFixture) -> list[str]:
    lines = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    return [word.split("=", 1)[1] for line in lines for word in line.split() if "outcome=" in word]


@pytest.mark.parametrize(
    ("target", "stream", "outcome"),
    [
        ("sim@status=503", False, "upstream_status_503"),
        ("sim@hang=after-1", True, "upstream_idle_timeout"),
        ("sim@tokens=2", True, "ok"),
        ("sim@tokens=2", False, "ok"),
    ],
)
async def test_a_finished_answer_is_not_a_disconnect(
    gateway: GatewayFactory,
    caplog: pytest.LogCaptureFixture,
    target: str,
    stream: bool,
    outcome: str,
) -> None:
    """uvicorn reports `http.disconnect` right after the last message: that is not a cancel."""
    caplog.set_level("INFO", logger="gateway.access")
    server = gateway(one_route(target_model=target, budget={"idle_s": 0.3}))
    async with sdk(server, max_retries=0) as client:
        try:
            if stream:
                async for _ in await client.chat.completions.create(
                    model="m", messages=CHAT, stream=True
                ):
                    pass
            else:
                await client.chat.completions.create(model="m", messages=CHAT)
        except openai.APIError:
            pass
    await anyio.sleep(0.2)  # the access line is written after the response
    assert access_outcomes(caplog) == [outcome]


async def test_a_real_disconnect_is_logged_as_one(
    gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gateway.access")
    server = gateway(one_route(target_model="sim@hang=headers"))
    async with sdk(server) as client:
        await give_up_on(client, stream=False)
    await off_loop(wait_until_idle, server)
    assert access_outcomes(caplog) == ["client_disconnect"]


def test_client_gone_during_upload_calls_no_upstream(
    gateway: GatewayFactory, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="gateway.access")
    server = gateway(one_route())
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\n{"
        )
        time.sleep(0.2)  # the gateway is now waiting for the rest of the body
    wait_until_idle(server)
    time.sleep(0.2)
    assert access_outcomes(caplog) == ["client_disconnect"]
    assert simulator.stats()["total"] == 0
