"""Resilience through real sockets: the simulator upstream, the openai SDK and raw HTTP as
clients. Non-streaming calls under the stream guards, attempts that cannot finish skipped,
Retry-After, the retry budget, outlier ejection, first-token hedging, deadline-ordered queues."""

from __future__ import annotations

import logging
import time
from functools import partial
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    CHAT,
    GatewayFactory,
    Simulator,
    off_loop,
    one_route,
    sdk,
    wait_until_queued,
)
from tests.test_relay import chat, two_targets

pytestmark = pytest.mark.anyio


def chat_within(url: str, budget_ms: int) -> httpx.Response:
    """A chat call whose client allows it `budget_ms` (X-Request-Timeout-Ms)."""
    return httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": "m", "messages": CHAT},
        headers={"x-request-timeout-ms": str(budget_ms)},
        timeout=10,
    )


def scrape(url: str) -> dict[str, float]:
    """The gateway's /metrics as {'name{label="value",...}': value}, labels sorted."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return {
        sample.name
        + "{"
        + ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
        + "}": sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What changed between two scrapes (counters that moved)."""
    return {
        name: value - before.get(name, 0.0)
        for name, value in after.items()
        if value != before.get(name, 0.0)
    }


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


# --- non-streaming calls get the stream guards ------------------------------------------


async def test_a_non_streaming_stall_ends_at_idle_s(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        one_route(target_model="sim@hang=after-3,keepalive-ms=100", budget={"idle_s": 0.5})
    )
    started = time.monotonic()
    async with sdk(server, max_retries=0) as client:
        with pytest.raises(openai.APIStatusError) as caught:
            await client.chat.completions.create(model="m", messages=CHAT)
    assert caught.value.status_code == 504
    assert caught.value.code == "upstream_idle_timeout"
    assert 0.5 <= time.monotonic() - started < 0.5 + 1.0
    await simulator.until(lambda s: s["cancelled"] == 1)  # the upstream saw it abandoned


async def test_a_role_chunk_then_silence_is_a_missing_first_token(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """OpenAI sends a role-only chunk at once: it is not a token, streaming or not."""
    server = gateway(one_route(target_model="sim@ttft-ms=5000", budget={"ttft_s": 0.5}))
    for stream in (False, True):
        started = time.monotonic()
        response = chat(server.url, stream=stream)
        assert response.status_code == 504  # no 200 committed on the role chunk
        assert error_code(response) == "upstream_ttft_timeout"
        assert time.monotonic() - started < 0.5 + 1.0


def test_a_slow_first_token_falls_over_to_the_next_target(
    gateway: GatewayFactory, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    server = gateway(
        two_targets(
            "sim@ttft-ms=5000",
            "sim@tokens=2",
            budget={"ttft_s": 0.4, "total_s": 10},
            retry={"retry_on": ["ttft"]},
        )
    )
    started = time.monotonic()
    with caplog.at_level(logging.INFO, logger="gateway.attempt"):
        response = chat(server.url)
    assert response.status_code == 200
    assert response.headers["x-gateway-upstream"] == "backup"
    assert time.monotonic() - started < 0.4 + 1.0
    (line,) = [r.getMessage() for r in caplog.records if r.name == "gateway.attempt"]
    assert "upstream=primary model=sim@ttft-ms=5000 outcome=upstream_ttft_timeout" in line


@pytest.mark.parametrize(
    ("path", "model", "body"),
    [
        ("chat/completions", "sim@tokens=5", {"messages": CHAT}),
        ("chat/completions", "sim@tool-calls=2,tokens=3", {"messages": CHAT}),
        ("completions", "sim@tokens=4", {"prompt": "say"}),
    ],
)
def test_the_assembled_answer_is_what_the_upstream_answers_whole(
    gateway: GatewayFactory, simulator: Simulator, path: str, model: str, body: dict[str, Any]
) -> None:
    server = gateway(one_route(target_model=model))
    assembled = httpx.post(f"{server.url}/v1/{path}", json={"model": "m", **body}, timeout=10)
    assert simulator.stats()["last_body"]["stream"] is True  # asked as a stream...
    direct = httpx.post(f"{simulator.base_url}/{path}", json={"model": model, **body}, timeout=10)
    assert assembled.status_code == direct.status_code == 200
    mine, theirs = assembled.json(), direct.json()
    for answer in (mine, theirs):  # these differ between two calls by nature
        answer.pop("id")
        answer.pop("created")
    assert mine == theirs  # ...answered as the whole body, model as the upstream named it


async def test_the_sdk_reads_assembled_tool_calls(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@tool-calls=2,tokens=4"))
    async with sdk(server) as client:
        completion = await client.chat.completions.create(model="m", messages=CHAT)
    calls = completion.choices[0].message.tool_calls
    assert calls is not None
    assert [call.function.name for call in calls] == ["tool_0", "tool_1"]  # type: ignore[union-attr]
    assert completion.choices[0].finish_reason == "tool_calls"


def test_upstream_stream_false_and_unstreamable_requests_go_as_they_came(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = one_route(target_model="sim@tokens=2")
    data["routes"][0]["upstream_stream"] = False
    server = gateway(data)
    assert chat(server.url).status_code == 200
    assert "stream" not in simulator.stats()["last_body"]
    streamed = gateway(one_route(target_model="sim@tokens=2"))
    body = {"model": "m", "prompt": "x", "best_of": 2}
    assert httpx.post(f"{streamed.url}/v1/completions", json=body, timeout=10).status_code == 200
    assert "stream" not in simulator.stats()["last_body"]


# --- attempts that cannot finish, Retry-After, no retry after the first byte ---------------


def test_retry_on_503_then_success(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(
        one_route(
            target_model="sim@status=503,flaky=1",
            retry={"attempts": 2, "backoff_s": 0.05},
        )
    )
    response = chat(server.url)
    assert response.status_code == 200
    assert response.headers["x-gateway-attempts"] == "2"
    assert simulator.stats()["total"] == 2


def test_retry_after_is_honoured_when_it_fits(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        one_route(
            target_model="sim@status=503,retry-after=1,flaky=1",
            retry={"attempts": 2, "backoff_s": 0.01},
            budget={"total_s": 5},
        )
    )
    started = time.monotonic()
    response = chat(server.url)
    assert response.status_code == 200
    assert 1.0 <= time.monotonic() - started < 1.0 + 1.5


def test_retry_after_that_does_not_fit_skips_the_retry(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        one_route(
            target_model="sim@status=503,retry-after=30",
            retry={"attempts": 3},
            budget={"total_s": 3},
        )
    )
    started = time.monotonic()
    response = chat(server.url)
    assert response.status_code == 503  # the upstream's answer, at once
    assert time.monotonic() - started < 1.0
    assert simulator.stats()["total"] == 1


def test_a_target_whose_first_token_cannot_fit_is_skipped(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(two_targets("sim@ttft-ms=600,tokens=1", "sim@tokens=1"))
    for _ in range(5):  # teach the gateway how slow the first target is
        assert chat(server.url).headers["x-gateway-upstream"] == "primary"
    simulator.wait_for(lambda s: s["open"] == 0)
    before = simulator.stats()["total"]
    started = time.monotonic()
    response = chat_within(server.url, 400)
    assert response.status_code == 200
    assert response.headers["x-gateway-upstream"] == "backup"  # primary would not make it
    assert response.headers["x-gateway-attempts"] == "1"
    assert time.monotonic() - started < 0.4
    assert simulator.stats()["total"] == before + 1


def test_no_target_fits_is_a_504_at_once(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(one_route(target_model="sim@ttft-ms=500,tokens=1"))
    for _ in range(5):
        assert chat(server.url).status_code == 200
    before = simulator.stats()["total"]
    started = time.monotonic()
    response = chat_within(server.url, 300)
    assert response.status_code == 504
    assert error_code(response) == "deadline_exceeded"
    assert time.monotonic() - started < 0.2  # not after waiting out the 300 ms
    assert simulator.stats()["total"] == before


async def test_total_time_never_passes_the_deadline_under_repeated_failures(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        two_targets(
            "sim@latency-ms=150,status=503",
            "sim@latency-ms=150,status=503",
            budget={"total_s": 1},
            retry={"attempts": 5, "backoff_s": 0.1},
        )
    )
    started = time.monotonic()
    response = await off_loop(chat, server.url)
    assert response.status_code in (503, 504)
    assert time.monotonic() - started < 1.0 + 0.3


# --- the retry budget --------------------------------------------------------------------


async def test_the_retry_budget_caps_retries_in_a_brown_out(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = one_route(target_model="sim@status=503", retry={"attempts": 3, "backoff_s": 0.01})
    data["routes"][0]["retry_budget"] = {"ratio": 0.1, "min_per_s": 1}
    data["upstreams"][0]["outlier"] = {"consecutive_failures": 1000}  # not what this tests
    server = gateway(data)
    async with anyio.create_task_group() as group:
        for _ in range(20):
            group.start_soon(off_loop, chat, server.url)
    total = simulator.stats()["total"]
    # Without a budget: 60 calls. With it: 20 first tries and at most 1 + 10% retries.
    assert 20 <= total <= 20 + 1 + 2


# --- outlier ejection --------------------------------------------------------------------


def test_an_upstream_is_ejected_skipped_probed_and_restored(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = two_targets("sim@status=500,flaky=2", "sim@tokens=1", retry={"retry_on": [500]})
    data["upstreams"][0]["outlier"] = {"consecutive_failures": 2, "base_ejection_s": 0.5}
    server = gateway(data)
    for _ in range(2):  # two failures in a row: primary is ejected
        assert chat(server.url).headers["x-gateway-upstream"] == "backup"
    skipped = chat(server.url)
    assert skipped.headers["x-gateway-upstream"] == "backup"
    assert skipped.headers["x-gateway-attempts"] == "1"  # primary was not called
    assert simulator.stats()["total"] == 2 * 2 + 1
    time.sleep(0.6)
    probe = chat(server.url)  # the probe goes to primary, which has recovered
    assert probe.headers["x-gateway-upstream"] == "primary"
    assert chat(server.url).headers["x-gateway-upstream"] == "primary"


def test_a_fail_fast_route_answers_circuit_open_when_every_target_is_ejected(
    gateway: GatewayFactory,
) -> None:
    data = one_route(target_model="sim@status=500")
    data["upstreams"][0]["outlier"] = {"consecutive_failures": 1, "base_ejection_s": 5}
    data["routes"][0]["outlier_mode"] = "fail_fast"
    server = gateway(data)
    assert chat(server.url).status_code == 500
    response = chat(server.url)
    assert response.status_code == 503
    assert error_code(response) == "circuit_open"
    assert 1 <= int(response.headers["retry-after"]) <= 5
    assert response.headers["x-should-retry"] == "true"


def test_ejection_never_blacks_out_a_single_target_route(
    gateway: GatewayFactory, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    """20 upstream 503s in a row eject it, yet each request still reaches it (panic routing),
    so the first request after it recovers is answered by it, not by `circuit_open`."""
    server = gateway(one_route(target_model="sim@status=503,flaky=20"))
    before = scrape(server.url)  # the registry is the process's: other tests count in it too
    with caplog.at_level(logging.INFO, logger="gateway.health"):
        for _ in range(20):
            response = chat(server.url)
            assert response.status_code == 503
            assert response.json()["error"]["code"] != "circuit_open"
        assert simulator.stats()["total"] == 20  # every one of them reached the upstream
        recovered = chat(server.url)
    assert recovered.status_code == 200
    assert recovered.headers["x-gateway-upstream"] == "sim"
    health = [record for record in caplog.records if record.name == "gateway.health"]
    assert [record.__dict__["fields"]["event"] for record in health] == [
        "upstream_ejected",
        "upstream_restored",
    ]
    ejected = health[0]
    assert ejected.levelname == "WARNING"
    assert ejected.getMessage() == (
        "event=upstream_ejected upstream=sim reason=failures failures=5 ejected_s=10.0"
    )
    counted = delta(before, scrape(server.url))
    assert counted['llm_gateway_upstream_ejections_total{reason="failures",upstream="sim"}'] == 1
    assert counted['llm_gateway_panic_routed_total{route="m"}'] == 20 - 5 + 1


def test_an_upstream_saying_it_is_busy_cools_and_is_never_ejected(
    gateway: GatewayFactory, simulator: Simulator, caplog: pytest.LogCaptureFixture
) -> None:
    """A 429 with Retry-After: 2 is load, not an outage: the fallback takes the requests for
    those 2 s, then the primary is asked again; nothing is ejected."""
    data = two_targets("sim@status=429,retry-after=2", "sim@tokens=1")
    data["upstreams"][0]["outlier"] = {"consecutive_failures": 1}
    server = gateway(data)
    before = scrape(server.url)
    with caplog.at_level(logging.INFO, logger="gateway.health"):
        first = chat(server.url)
        assert first.headers["x-gateway-upstream"] == "backup"
        assert first.headers["x-gateway-attempts"] == "2"
        cooled = time.monotonic()
        calls = 0
        while time.monotonic() - cooled < 1.5:  # well inside the 2 s
            response = chat(server.url)
            assert response.headers["x-gateway-upstream"] == "backup"
            assert response.headers["x-gateway-attempts"] == "1"  # the primary was left alone
            calls += 1
        assert simulator.stats()["total"] == 2 + calls
        time.sleep(max(0.0, cooled + 2.2 - time.monotonic()))
        after = chat(server.url)
    assert after.headers["x-gateway-attempts"] == "2"  # cooled down: the primary is asked again
    health = [record for record in caplog.records if record.name == "gateway.health"]
    events = [record.__dict__["fields"]["event"] for record in health]
    assert events == ["upstream_cooling", "upstream_cooling"]  # one line per busy spell
    assert "status=429 cooling_s=2.0" in health[0].getMessage()
    counted = delta(before, scrape(server.url))
    assert not [name for name in counted if "ejections" in name]
    skipped = (
        'llm_gateway_attempts_skipped_total{reason="retry_after",route="m",upstream="primary"}'
    )
    assert counted[skipped] == calls


def test_a_single_target_that_is_busy_still_gets_the_request(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """With no other target, a cooling upstream is asked anyway: the client gets its answer."""
    data = one_route(target_model="sim@status=503,retry-after=30")
    data["upstreams"][0]["outlier"] = {"consecutive_failures": 1}
    server = gateway(data)
    for _ in range(3):
        response = chat(server.url)
        assert response.status_code == 503
        assert response.headers["retry-after"] == "30"  # the upstream's own answer
    assert simulator.stats()["total"] == 3


def test_a_callers_own_short_deadline_never_ejects(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = one_route(target_model="sim@ttft-ms=800,tokens=1")
    data["upstreams"][0]["outlier"] = {"consecutive_failures": 2, "base_ejection_s": 30}
    server = gateway(data)
    for _ in range(3):
        response = chat_within(server.url, 200)
        assert response.status_code == 504
    assert chat(server.url).status_code == 200  # still in service


# --- first-token hedging -----------------------------------------------------------------


async def test_a_hedge_wins_and_the_loser_is_cancelled(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(two_targets("sim@ttft-ms=3000", "sim@tokens=2", hedge={"after_s": 0.2}))
    for stream in (True, False):
        await off_loop(simulator.wait_for, lambda s: s["open"] == 0)
        cancelled = simulator.stats()["cancelled"]
        started = time.monotonic()
        response = await off_loop(partial(chat, server.url, stream=stream))
        assert response.status_code == 200
        assert response.headers["x-gateway-upstream"] == "backup"
        assert response.headers["x-gateway-attempts"] == "2"
        assert 0.2 <= time.monotonic() - started < 1.0
        await simulator.until(partial(_cancelled_more, before=cancelled))  # the slow one


def _cancelled_more(stats: dict[str, Any], before: int) -> bool:
    return bool(stats["cancelled"] == before + 1 and stats["open"] == 0)


def test_no_hedge_when_the_first_attempt_is_fast(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(two_targets("sim@tokens=2", "sim@tokens=2", hedge={"after_s": 0.3}))
    response = chat(server.url, stream=True)
    assert response.headers["x-gateway-upstream"] == "primary"
    assert response.headers["x-gateway-attempts"] == "1"
    assert simulator.stats()["total"] == 1


# --- the queue is served earliest deadline first -------------------------------------------


async def test_the_queue_serves_the_earliest_deadline_first(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(
        one_route(
            # Long enough that the blocker still holds the slot while the others queue, even
            # on a loaded machine.
            target_model="sim@latency-ms=1000",
            upstream={"max_connections": 1},
            budget={"total_s": 20},
        )
    )
    finished: list[str] = []

    async def call(name: str, budget_ms: int | None) -> None:
        headers = {} if budget_ms is None else {"x-request-timeout-ms": str(budget_ms)}
        response = await off_loop(
            lambda: httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "m", "messages": CHAT},
                headers=headers,
                timeout=10,
            )
        )
        assert response.status_code == 200
        finished.append(name)

    async with anyio.create_task_group() as group:
        group.start_soon(call, "blocker", None)
        await simulator.until(lambda s: s["open"] == 1)
        group.start_soon(call, "relaxed", None)  # 20 s left, queued first
        await off_loop(wait_until_queued, server, "sim", 1)
        group.start_soon(call, "urgent", 5000)  # 5 s left, queued second
        await off_loop(wait_until_queued, server, "sim", 2)
    assert finished == ["blocker", "urgent", "relaxed"]
