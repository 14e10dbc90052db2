"""Keys as tenants, end to end on a real gateway and simulator: quotas and what a client sees
of them (with the real `openai` SDK), the routes a key may use, priority classes in a full
queue, a request that cannot start in time, and the metrics that say so."""

from __future__ import annotations

import json
import logging
import math
import re
import time
from functools import partial
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest

from tests.conftest import CHAT, GatewayFactory, LiveServer, RedisServer, one_route, sdk

AUTH = {"authorization": "Bearer kh"}
GO_DURATION = re.compile(r"(\d+m)?\d+(\.\d+)?(ms|s)")


def tenants(*keys: dict[str, Any], **route: Any) -> dict[str, Any]:
    """One simulator upstream, routes `m`, `slow` (0.3 s) and `idle` (stalls after 3 tokens,
    idle_s 0.3), and `keys` (none: auth off)."""
    data = one_route(**route)
    data["routes"].append(
        {"model": "slow", "targets": [{"upstream": "sim", "model": "sim@latency-ms=300"}]}
    )
    data["routes"].append(
        {
            "model": "idle",
            "targets": [{"upstream": "sim", "model": "sim@hang=after-3"}],
            "budget": {"idle_s": 0.3},
        }
    )
    if keys:
        data["auth"] = {"keys": list(keys)}
    return data


def body(model: str = "m", **fields: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], **fields}
    ).encode()


def post(http: httpx.Client, key: str, content: bytes) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    return http.post("/v1/chat/completions", content=content, headers=headers)


def metric(server: LiveServer, series: str) -> float:
    for line in httpx.get(f"{server.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def queued(server: LiveServer, count: int, within_s: float = 3) -> None:
    """Wait until `count` requests wait for the upstream `sim` (asked with the first key)."""
    deadline = time.monotonic() + within_s
    while True:
        state = httpx.get(f"{server.url}/debug/inflight", headers=AUTH, timeout=5).json()
        if state["pools"]["sim"]["queued"] == count:
            return
        assert time.monotonic() < deadline, state
        time.sleep(0.02)


def wait_for_metric(server: LiveServer, series: str, above: float, within_s: float = 3) -> float:
    deadline = time.monotonic() + within_s
    while (value := metric(server, series)) <= above and time.monotonic() < deadline:
        time.sleep(0.02)
    return value


@pytest.mark.anyio
async def test_requests_per_minute_burst_then_one_per_second(gateway: GatewayFactory) -> None:
    server = gateway(tenants({"name": "batch", "key": "k1", "limits": {"requests_per_min": 60}}))
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
        headers = {"authorization": "Bearer k1"}
        replies = []

        async def one() -> None:
            replies.append(await http.post("/v1/chat/completions", content=body(), headers=headers))

        async with anyio.create_task_group() as group:
            for _ in range(70):
                group.start_soon(one)
        elapsed = time.monotonic() - started
        codes = [reply.status_code for reply in replies]
        assert 60 <= codes.count(200) <= 60 + math.floor(elapsed), (codes, elapsed)
        assert set(codes) == {200, 429}
        ok = next(reply for reply in replies if reply.status_code == 200)
        assert ok.headers["x-ratelimit-limit-requests"] == "60"
        assert GO_DURATION.fullmatch(ok.headers["x-ratelimit-reset-requests"])
        assert "x-ratelimit-limit-tokens" not in ok.headers  # no tokens_per_min: no such headers
        refused = next(reply for reply in replies if reply.status_code == 429)
        assert refused.json()["error"] == {
            "message": refused.json()["error"]["message"],
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        assert "60 requests per minute" in refused.json()["error"]["message"]
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.headers["retry-after"] == "1"
        assert 0 < int(refused.headers["retry-after-ms"]) <= 1000
        assert refused.headers["x-should-retry"] == "true"
        assert GO_DURATION.fullmatch(refused.headers["x-ratelimit-reset-requests"])

        await anyio.sleep(1.1)  # one more per second
        later = [await http.post("/v1/chat/completions", content=body(), headers=headers)
                 for _ in range(2)]  # fmt: skip
        assert [reply.status_code for reply in later] == [200, 429]

    # The openai SDK waits for Retry-After and tries again: the call succeeds.
    async with (
        sdk(server, api_key="k1", max_retries=2) as client,
        sdk(server, api_key="k1", max_retries=0) as impatient,
    ):
        with pytest.raises(openai.RateLimitError) as refused_info:
            await impatient.chat.completions.create(model="m", messages=CHAT)
        error = refused_info.value
        assert error.code == "rate_limit_exceeded"
        assert error.response.headers["retry-after"] == "1"
        began = time.monotonic()
        raw = await client.chat.completions.with_raw_response.create(model="m", messages=CHAT)
        assert time.monotonic() - began >= 0.3  # it waited for the bucket
        assert raw.parse().choices[0].message.content
        assert int(raw.headers["x-ratelimit-remaining-requests"]) >= 0
        assert GO_DURATION.fullmatch(raw.headers["x-ratelimit-reset-requests"])


def test_tokens_per_minute_charges_what_was_used(gateway: GatewayFactory) -> None:
    """tokens_per_min 600 refills 10 a second: the remaining tokens a client is told show what
    each request was charged."""
    server = gateway(tenants({"name": "tok", "key": "kt", "limits": {"tokens_per_min": 600}}))
    series = 'llm_gateway_key_tokens_total{key="tok",kind="%s"}'
    with httpx.Client(base_url=server.url, timeout=10) as http:
        first_body = body(max_tokens=100)
        reserved = math.ceil(len(first_body) / 4) + 100
        began = time.monotonic()
        first = post(http, "kt", first_body)
        assert first.status_code == 200
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 600 - reserved
        usage = first.json()["usage"]
        used = usage["prompt_tokens"] + usage["completion_tokens"]
        assert used < reserved
        second = post(http, "kt", first_body)
        refill = 10 * (time.monotonic() - began)
        expected = 600 - used - reserved  # the first charged its usage, not its reservation
        remaining = int(second.headers["x-ratelimit-remaining-tokens"])
        assert expected - 1 <= remaining <= expected + refill + 1, (remaining, expected, refill)
        assert metric(server, series % "completion") >= 2 * usage["completion_tokens"]

        # Refused: charged nothing. The bucket is short of a whole minute's tokens now.
        greedy = post(http, "kt", body(max_tokens=100_000))
        assert greedy.status_code == 429
        assert greedy.headers["retry-after"]
        assert "tokens per minute" in greedy.json()["error"]["message"]
        left = int(greedy.headers["x-ratelimit-remaining-tokens"])
        began = time.monotonic()
        third = post(http, "kt", first_body)
        refill = 10 * (time.monotonic() - began)
        remaining = int(third.headers["x-ratelimit-remaining-tokens"])
        assert left - reserved - 1 <= remaining <= left - reserved + refill + 1

        # A stream cut by idle_s reports no usage: charged its prompt and the chunks relayed.
        before = metric(server, series % "estimated")
        cut_body = body("idle", stream=True, max_tokens=200)
        prompt = math.ceil(len(cut_body) / 4)
        cut = post(http, "kt", cut_body)
        assert "upstream_idle_timeout" in cut.text
        charged = wait_for_metric(server, series % "estimated", before) - before
        assert prompt + 1 <= charged <= prompt + 6, charged  # role chunk and 3 tokens


def test_a_stream_stopped_early_is_charged_what_was_relayed(gateway: GatewayFactory) -> None:
    data = tenants({"name": "tok", "key": "kt", "limits": {"tokens_per_min": 100_000}})
    data["routes"].append(
        {"model": "long", "targets": [{"upstream": "sim", "model": "sim@tokens=200,gap-ms=30"}]}
    )
    server = gateway(data)
    series = 'llm_gateway_key_tokens_total{key="tok",kind="estimated"}'
    before = metric(server, series)
    content = body("long", stream=True, max_tokens=500)
    prompt = math.ceil(len(content) / 4)
    headers = {"authorization": "Bearer kt", "content-type": "application/json"}
    with (
        httpx.Client(base_url=server.url, timeout=10) as http,
        http.stream("POST", "/v1/chat/completions", content=content, headers=headers) as reply,
    ):
        lines = 0
        for line in reply.iter_lines():
            lines += line.startswith("data:")
            if lines == 5:
                break  # and close the stream
    charged = wait_for_metric(server, series, before) - before
    assert prompt + 5 <= charged <= prompt + 40, charged  # far from the 500 reserved


def test_a_key_uses_only_its_models(gateway: GatewayFactory) -> None:
    server = gateway(tenants({"name": "narrow", "key": "kn", "models": ["m"]}))
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert post(http, "kn", body("m")).status_code == 200
        refused = post(http, "kn", body("slow"))
        assert refused.status_code == 403
        assert refused.json()["error"]["code"] == "model_not_allowed"
        assert refused.json()["error"]["param"] == "model"
        assert refused.headers["x-should-retry"] == "false"
        listed = http.get("/v1/models", headers={"authorization": "Bearer kn"}).json()
        assert [model["id"] for model in listed["data"]] == ["m"]
    assert metric(server, 'llm_gateway_key_requests_total{code="403",key="narrow"}') == 1


def test_max_concurrent_is_a_per_key_cap(gateway: GatewayFactory) -> None:
    server = gateway(
        tenants(
            {"name": "few", "key": "kf", "limits": {"max_concurrent": 2}},
            {"name": "other", "key": "ko"},
        )
    )

    async def main() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            headers = {"authorization": "Bearer kf"}
            codes: list[int] = []

            async def one() -> None:
                reply = await http.post(
                    "/v1/chat/completions", content=body("slow"), headers=headers
                )
                codes.append(reply.status_code)

            async with anyio.create_task_group() as group:
                for _ in range(5):
                    group.start_soon(one)
            other = await http.post(
                "/v1/chat/completions", content=body("m"), headers={"authorization": "Bearer ko"}
            )
            assert other.status_code == 200  # another key is not held back
            again = await http.post("/v1/chat/completions", content=body("m"), headers=headers)
            assert again.status_code == 200  # released when they ended
            return codes

    codes = anyio.run(main)
    assert sorted(codes) == [200, 200, 429, 429, 429]
    assert metric(server, 'llm_gateway_rate_limited_total{key="few",limit="concurrent"}') == 3


def test_a_full_queue_sheds_the_lowest_class_first(gateway: GatewayFactory) -> None:
    server = gateway(
        tenants(
            {"name": "chat", "key": "kh", "priority": "high"},
            {"name": "batch", "key": "kl", "priority": "low"},
            upstream={"max_connections": 1, "max_pending": 2},
        )
    )

    async def main() -> dict[str, list[int]]:
        results: dict[str, list[int]] = {"low": [], "high": []}
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:

            async def one(key: str, who: str) -> None:
                reply = await http.post(
                    "/v1/chat/completions",
                    content=body("slow"),
                    headers={"authorization": f"Bearer {key}"},
                )
                results[who].append(reply.status_code)
                if reply.status_code == 503:
                    assert reply.json()["error"]["code"] == "upstream_saturated"
                    assert reply.headers["retry-after"]

            async with anyio.create_task_group() as group:
                for _ in range(3):  # one runs, two wait: the queue is full
                    group.start_soon(one, "kl", "low")
                await anyio.to_thread.run_sync(queued, server, 2)
                group.start_soon(one, "kl", "low")  # the newest low is shed at once
                await anyio.sleep(0.1)
                group.start_soon(one, "kh", "high")  # displaces a waiting low
                group.start_soon(one, "kh", "high")  # and another
        return results

    results = anyio.run(main)
    assert sorted(results["high"]) == [200, 200]  # never shed while a low one waits
    assert sorted(results["low"]) == [200, 503, 503, 503]
    assert metric(server, 'llm_gateway_shed_total{priority="low",upstream="sim"}') == 3
    assert metric(server, 'llm_gateway_shed_total{priority="high",upstream="sim"}') == 0


def test_a_request_that_cannot_start_in_time_is_answered_at_once(gateway: GatewayFactory) -> None:
    server = gateway(
        tenants(
            {"name": "chat", "key": "kh", "priority": "high"},
            {"name": "batch", "key": "kl", "priority": "low"},
            upstream={"max_connections": 1, "max_pending": 50},
        )
    )
    with httpx.Client(base_url=server.url, timeout=10) as http:
        for _ in range(9):  # slots free about every 0.3 s: the queue learns its pace
            assert post(http, "kh", body("slow")).status_code == 200

    async def main() -> tuple[httpx.Response, float]:
        async with (
            httpx.AsyncClient(base_url=server.url, timeout=10) as http,
            anyio.create_task_group() as group,
        ):
            for _ in range(4):  # 1.2 s of work ahead, all of a higher class
                group.start_soon(
                    partial(
                        http.post,
                        "/v1/chat/completions",
                        content=body("slow"),
                        headers={"authorization": "Bearer kh"},
                    )
                )
            await anyio.to_thread.run_sync(queued, server, 3)
            began = time.monotonic()
            reply = await http.post(
                "/v1/chat/completions",
                content=body("slow"),
                headers={"x-request-timeout-ms": "500", "authorization": "Bearer kl"},
            )
            took = time.monotonic() - began
        return reply, took

    reply, took = anyio.run(main)
    assert reply.status_code == 504
    assert reply.json()["error"]["code"] == "deadline_exceeded"
    assert reply.headers["x-should-retry"] == "false"
    assert took < 0.25, took  # not after waiting its 0.5 s in vain


def test_the_key_name_in_debug_inflight_and_the_access_log(
    gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    server = gateway(tenants({"name": "chat-ui", "key": "secret-key-1", "priority": "high"}))
    caplog.set_level(logging.INFO, logger="gateway.access")

    async def main() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as http:
            headers = {"authorization": "Bearer secret-key-1"}
            async with anyio.create_task_group() as group:
                group.start_soon(
                    partial(
                        http.post, "/v1/chat/completions", content=body("slow"), headers=headers
                    )
                )
                await anyio.sleep(0.15)
                state: dict[str, Any] = (await http.get("/debug/inflight", headers=headers)).json()
            return state

    state = anyio.run(main)
    assert [row["key"] for row in state["inflight"]] == ["chat-ui"]
    lines = [record.getMessage() for record in caplog.records if record.name == "gateway.access"]
    assert any("key=chat-ui" in line for line in lines), lines
    assert not any("secret-key-1" in line for line in lines)


@pytest.mark.parametrize("on_failure", ["local_share", "closed", "open"])
def test_quotas_while_redis_is_down(
    gateway: GatewayFactory, own_redis: RedisServer, on_failure: str
) -> None:
    data = tenants({"name": "batch", "key": "kb", "limits": {"requests_per_min": 6}})
    data["shared"] = {
        "redis_url": own_redis.url,
        "on_failure": on_failure,
        "expected_replicas": 3,
        "timeout_s": 0.1,
    }
    server = gateway(data)
    with httpx.Client(base_url=server.url, timeout=10) as http:
        assert post(http, "kb", body()).headers["x-ratelimit-remaining-requests"] == "5"
        own_redis.stop()
        codes = [post(http, "kb", body()).status_code for _ in range(4)]
    if on_failure == "local_share":  # this process's share: ceil(6 / 3)
        assert codes == [200, 200, 429, 429]
    elif on_failure == "closed":
        assert codes == [503] * 4
    else:
        assert codes == [200] * 4
