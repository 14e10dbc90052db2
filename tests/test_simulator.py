"""The simulator over real sockets, driven by the real `openai` SDK and raw httpx2."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionChunk
from starlette.applications import Starlette
from starlette.routing import Mount

from gateway.simulator import FaultError, Faults, create_simulator_app, parse_faults
from gateway.testing import LiveServer

SETTLE_S = 2.0  # how long the simulator may take to notice a client went away


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def server() -> Iterator[LiveServer]:
    with LiveServer(create_simulator_app()) as live:
        yield live


@pytest.fixture
async def sdk(server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=10
    ) as client:
        yield client


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=server.url, timeout=10) as client:
        yield client


async def stats_when(
    http: httpx2.AsyncClient, ready: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """Poll /sim/stats until `ready` holds (failing after SETTLE_S); return the last snapshot."""
    stats: dict[str, Any] = {}
    with anyio.move_on_after(SETTLE_S):
        while True:
            stats = (await http.get("/sim/stats")).json()
            if ready(stats):
                return stats
            await anyio.sleep(0.02)
    raise AssertionError(f"stats did not settle within {SETTLE_S} s: {stats}")


async def collect_tokens(stream: openai.AsyncStream[ChatCompletionChunk], into: list[str]) -> None:
    """Append each chunk's content to `into`, so a test sees what arrived before an error."""
    async for chunk in stream:
        into.extend(choice.delta.content or "" for choice in chunk.choices)


def settled(**expected: int) -> Callable[[dict[str, Any]], bool]:
    """A `stats_when` condition: no request open and the given counters at these values."""
    return lambda stats: stats["open"] == 0 and all(stats[k] == v for k, v in expected.items())


# parse_faults


def test_no_knobs_means_defaults() -> None:
    assert parse_faults({"authorization": "Bearer x"}, "gpt-4o") == Faults()


def test_model_suffix_sets_knobs() -> None:
    faults = parse_faults({}, "sim@ttft-ms=500, tokens=3,hang=after-2,reset=after-headers")
    assert faults == Faults(ttft_ms=500, tokens=3, hang_after_tokens=2, reset_after_tokens=0)


def test_headers_win_over_suffix() -> None:
    faults = parse_faults({"X-Sim-Tokens": "5", "x-sim-hang": "body"}, "sim@tokens=3,gap-ms=7")
    assert faults == Faults(tokens=5, gap_ms=7, hang_after_tokens=0)


def test_hang_headers_and_status() -> None:
    faults = parse_faults({"x-sim-status": "503", "x-sim-retry-after": "7"}, "demo@hang=headers")
    assert faults == Faults(hang_before_headers=True, status=503, retry_after="7")


def test_error_after() -> None:
    assert parse_faults({"x-sim-error-after": "3"}, "sim") == Faults(error_after_tokens=3)


def test_server_likeness_knobs() -> None:
    faults = parse_faults(
        {"x-sim-error-body": "flat"}, "sim@include-usage=ignore,extra-keys=true,context-limit=9"
    )
    assert faults == Faults(
        ignore_include_usage=True, extra_keys=True, context_limit=9, error_body="flat"
    )


def test_at_sign_without_knobs_is_part_of_the_model() -> None:
    assert parse_faults({}, "team@model") == Faults()


@pytest.mark.parametrize(
    ("headers", "model", "knob"),
    [
        ({"x-sim-tokens": "many"}, "sim", "tokens"),
        ({}, "sim@latency-ms=-1", "latency-ms"),
        ({}, "sim@status=200", "status"),
        ({}, "sim@keepalive-ms=0", "keepalive-ms"),
        ({}, "sim@hang=sideways", "hang"),
        ({}, "sim@reset=after-x", "reset"),
        ({}, "sim@malformed=xml", "malformed"),
        ({}, "sim@error-after=soon", "error-after"),
        ({}, "sim@include-usage=yes", "include-usage"),
        ({}, "sim@extra-keys=1", "extra-keys"),
        ({}, "sim@context-limit=-3", "context-limit"),
        ({}, "sim@error-body=html", "error-body"),
        ({}, "sim@tokens=3,gap-ms", "gap-ms"),
        ({"x-sim-colour": "red"}, "sim", "colour"),
    ],
)
def test_invalid_knobs_name_the_knob(headers: dict[str, str], model: str, knob: str) -> None:
    with pytest.raises(FaultError, match=knob) as caught:
        parse_faults(headers, model)
    assert caught.value.knob == knob


# Well-formed answers, parsed by the openai SDK


@pytest.mark.anyio
async def test_chat(sdk: openai.AsyncOpenAI) -> None:
    reply = await sdk.chat.completions.create(
        model="sim@tokens=3", messages=[{"role": "user", "content": "two words"}]
    )
    assert reply.object == "chat.completion"
    assert reply.model == "sim@tokens=3"
    assert reply.choices[0].message.content == "tok0 tok1 tok2 "
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 3


@pytest.mark.anyio
async def test_chat_stream(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    stream = await sdk.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"x-sim-tokens": "5"},
    )
    chunks = [chunk async for chunk in stream]
    tokens = [choice.delta.content for chunk in chunks for choice in chunk.choices]
    assert tokens == ["", *(f"tok{i} " for i in range(5)), None]  # OpenAI's role-only chunk first
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    await stats_when(http, settled(completed=1))


@pytest.mark.anyio
async def test_completions(sdk: openai.AsyncOpenAI) -> None:
    reply = await sdk.completions.create(model="sim@tokens=2", prompt="say")
    assert reply.object == "text_completion"
    assert reply.choices[0].text == "tok0 tok1 "
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 2


@pytest.mark.anyio
async def test_completions_stream(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.completions.create(model="sim@tokens=4", prompt="say", stream=True)
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].text for c in chunks) == "tok0 tok1 tok2 tok3 "
    assert chunks[-1].choices[0].finish_reason == "stop"


@pytest.mark.anyio
async def test_embeddings(sdk: openai.AsyncOpenAI) -> None:
    as_base64 = await sdk.embeddings.create(model="emb", input=["a", "b"])  # the SDK's default
    as_floats = await sdk.embeddings.create(model="emb", input="a", encoding_format="float")
    assert as_base64.data[0].embedding == as_floats.data[0].embedding
    assert len(as_floats.data[0].embedding) == 8
    assert as_base64.data[0].embedding != as_base64.data[1].embedding
    assert as_base64.model == "emb"


@pytest.mark.anyio
async def test_models(sdk: openai.AsyncOpenAI) -> None:
    assert [model.id async for model in sdk.models.list()] == ["sim"]


@pytest.mark.anyio
async def test_bad_requests_get_the_error_envelope(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    not_json = await http.post("/v1/chat/completions", content=b"{")
    no_model = await http.post("/v1/completions", json={"prompt": "x"})
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (400, "invalid_json")
    assert no_model.status_code == 400
    assert set(no_model.json()["error"]) == {"message", "type", "param", "code"}
    assert no_model.json()["error"]["param"] == "model"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model="sim@tokens=lots", messages=[])
    assert caught.value.code == "invalid_sim_knob"
    assert caught.value.param == "tokens"


@pytest.mark.anyio
async def test_mounted_under_a_prefix() -> None:
    outer = Starlette(routes=[Mount("/sim-upstream", app=create_simulator_app())])
    with LiveServer(outer) as live:
        base = f"{live.url}/sim-upstream"
        async with openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0) as sdk:
            reply = await sdk.completions.create(model="sim@tokens=1", prompt="x")
        async with httpx2.AsyncClient(base_url=base) as http:
            stats = await stats_when(http, settled(completed=1))
    assert reply.choices[0].text == "tok0 "
    assert stats["total"] == 1


# Counting and recording


@pytest.mark.anyio
async def test_counts_completed_and_records_the_request(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    await sdk.chat.completions.create(
        model="sim",
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Request-Timeout-Ms": "1234"},
    )
    stats = await stats_when(http, settled(completed=1))
    assert (stats["total"], stats["cancelled"], stats["reset"]) == (1, 0, 0)
    assert stats["last_headers"]["x-request-timeout-ms"] == "1234"
    assert stats["last_body"]["messages"] == [{"role": "user", "content": "hi"}]

    cleared = (await http.post("/sim/reset")).json()
    assert (cleared["total"], cleared["completed"], cleared["last_body"]) == (0, 0, None)


# Faults


@pytest.mark.anyio
async def test_concurrent_streams_all_count_as_completed(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    async def one() -> None:
        stream = await sdk.completions.create(model="sim@tokens=3", prompt="x", stream=True)
        assert len([chunk async for chunk in stream]) == 4

    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(one)
    stats = await stats_when(http, settled(completed=20))
    assert (stats["total"], stats["cancelled"]) == (20, 0)


@pytest.mark.anyio
async def test_client_giving_up_during_latency_counts_as_cancelled(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    with pytest.raises(openai.APITimeoutError):
        await sdk.completions.create(model="sim@latency-ms=5000", prompt="x", timeout=0.3)
    await stats_when(http, settled(cancelled=1))


@pytest.mark.anyio
async def test_client_leaving_between_tokens_counts_as_cancelled(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    stream = await sdk.completions.create(model="sim@gap-ms=5000", prompt="x", stream=True)
    with anyio.fail_after(5):
        await anext(stream.__aiter__())
    await stream.close()
    await stats_when(http, settled(cancelled=1))


@pytest.mark.anyio
async def test_latency_delays_the_answer(sdk: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    await sdk.completions.create(model="sim@latency-ms=300", prompt="x")
    assert 0.3 <= time.monotonic() - started < 5


@pytest.mark.anyio
async def test_ttft_and_gap_pace_the_stream(sdk: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    stream = await sdk.completions.create(
        model="sim@ttft-ms=200,gap-ms=100,tokens=3", prompt="x", stream=True
    )
    arrivals = [time.monotonic() - started async for _ in stream]
    assert len(arrivals) == 4  # three tokens and the finish chunk
    assert arrivals[0] >= 0.2  # ttft
    assert arrivals[-1] >= 0.4  # ttft and two gaps
    assert arrivals[-1] < 5


@pytest.mark.anyio
async def test_status_with_retry_after(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        await sdk.chat.completions.create(
            model="sim@status=503,retry-after=7", messages=[{"role": "user", "content": "hi"}]
        )
    assert caught.value.status_code == 503
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "sim_error"
    await stats_when(http, settled(completed=1))


@pytest.mark.anyio
async def test_malformed_json(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    raw = await http.post("/v1/completions", json={"model": "sim@malformed=json"})
    assert raw.status_code == 200
    assert raw.content == b'{"id": "broken'
    with pytest.raises(ValueError, match="Unterminated string"):
        await sdk.completions.create(model="sim@malformed=json", prompt="x")


@pytest.mark.anyio
async def test_malformed_sse(sdk: openai.AsyncOpenAI) -> None:
    stream = await sdk.completions.create(model="sim@malformed=sse", prompt="x", stream=True)
    with pytest.raises(ValueError, match="Expecting property name"):
        async for _ in stream:
            pass
    await stream.close()


@pytest.mark.anyio
async def test_hang_headers_counts_the_client_giving_up(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    with pytest.raises(openai.APITimeoutError):
        await sdk.chat.completions.create(
            model="demo@hang=headers", messages=[{"role": "user", "content": "hi"}], timeout=0.3
        )
    stats = await stats_when(http, settled(cancelled=1))
    assert (stats["total"], stats["completed"]) == (1, 0)


@pytest.mark.anyio
async def test_hang_body_sends_keepalives(http: httpx2.AsyncClient) -> None:
    request = {"model": "sim@hang=body,keepalive-ms=50", "stream": True}
    lines: list[str] = []
    with anyio.fail_after(5):
        async with http.stream("POST", "/v1/chat/completions", json=request) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            async for line in response.aiter_lines():
                lines.append(line)
                if lines.count(": keep-alive") == 3:
                    break
    assert set(lines) == {": keep-alive", ""}
    await stats_when(http, settled(cancelled=1))


@pytest.mark.anyio
async def test_keepalives_while_waiting_for_the_first_token(http: httpx2.AsyncClient) -> None:
    request = {"model": "sim@ttft-ms=400,keepalive-ms=100,tokens=1", "stream": True}
    async with http.stream("POST", "/v1/chat/completions", json=request) as response:
        lines = [line async for line in response.aiter_lines() if line]
    assert '"role": "assistant"' in lines[0]  # the role-only chunk comes at once
    first_token = next(i for i, line in enumerate(lines) if "tok0" in line)
    assert lines[1:first_token] == [": keep-alive"] * 3  # at 100, 200 and 300 ms
    assert lines[-1] == "data: [DONE]"
    await stats_when(http, settled(completed=1))


@pytest.mark.anyio
async def test_hang_after_tokens_counts_the_disconnect(
    sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient
) -> None:
    stream = await sdk.chat.completions.create(
        model="sim@hang=after-2", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    chunks = stream.__aiter__()
    with anyio.fail_after(5):
        tokens = [(await anext(chunks)).choices[0].delta.content for _ in range(3)]
    with anyio.move_on_after(0.3) as waited:
        await anext(chunks)
    await stream.close()
    assert tokens == ["", "tok0 ", "tok1 "]
    assert waited.cancelled_caught
    stats = await stats_when(http, settled(cancelled=1))
    assert stats["completed"] == 0


@pytest.mark.anyio
async def test_reset_mid_stream(sdk: openai.AsyncOpenAI, http: httpx2.AsyncClient) -> None:
    stream = await sdk.chat.completions.create(
        model="sim@reset=after-1", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    tokens: list[str] = []
    with pytest.raises(openai.APIConnectionError) as caught:
        await collect_tokens(stream, tokens)
    await stream.close()
    assert isinstance(caught.value.__cause__, httpx2.RemoteProtocolError)
    assert tokens == ["", "tok0 "]
    stats = await stats_when(http, settled(reset=1))
    assert (stats["completed"], stats["cancelled"]) == (0, 0)


@pytest.mark.anyio
async def test_reset_after_headers(http: httpx2.AsyncClient) -> None:
    with pytest.raises(httpx2.RemoteProtocolError):
        await http.post("/v1/embeddings", json={"model": "sim@reset=after-headers", "input": "x"})
    await stats_when(http, settled(reset=1))
