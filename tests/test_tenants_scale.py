"""Tenants under load, on real `llm-gateway serve` processes and a simulator process: a
runaway low-priority batch does not starve a high-priority chat, two keys of one class share
a saturated upstream evenly, and replicas sharing a redis-server enforce one quota."""

from __future__ import annotations

import json
import logging
import random
import re
import statistics
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, NamedTuple

import anyio
import httpx2 as httpx
import pytest

from tests.conftest import RedisServer
from tests.test_scale_out import Upstream, replicas, upstream  # noqa: F401  (a fixture)

pytestmark = pytest.mark.anyio
log = logging.getLogger(__name__)  # the numbers measured: run with --log-cli-level=INFO

# Routes by the time a request holds its slot: the batch's slow work (0.3 to 0.7 s, 0.5 s on
# average, so slots do not all free at once), plain work, a chat turn.
SLOW = [f"slow-{ms}" for ms in (300, 400, 500, 600, 700)]
SERVICE_S = {**{model: int(model[5:]) / 1000 for model in SLOW}, "work": 0.2, "chat": 0.05}
TIMING = re.compile(r"queue;dur=([0-9.]+)")


def config(up: Upstream, keys: list[dict[str, Any]], *, cap: int, pending: int) -> dict[str, Any]:
    return {
        "upstreams": [
            {"name": "sim", "base_url": f"{up.url}/v1", "max_connections": cap,
             "max_pending": pending},
        ],
        "routes": [
            {"model": model, "targets": [
                {"upstream": "sim", "model": f"sim@latency-ms={int(seconds * 1000)}"}]}
            for model, seconds in SERVICE_S.items()
        ],
        "auth": {"keys": keys},
    }  # fmt: skip


async def send(http: httpx.AsyncClient, url: str, key: str, model: str = "work") -> httpx.Response:
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}
    content = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}]})
    return await http.post(f"{url}/v1/chat/completions", content=content, headers=headers)


class Run(NamedTuple):
    waits: list[float]  # each chat request's queue wait
    chat: Counter[int]  # statuses
    batch: Counter[int]


async def chat_waits(url: str, *, batch: str | None, batch_load: int) -> Run:
    """A chat request every 100 ms for 3 s, while `batch_load` loops of `batch` (if any) keep
    the upstream busy."""
    waits: list[float] = []
    chat_codes: Counter[int] = Counter()
    batch_codes: Counter[int] = Counter()
    done = anyio.Event()
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=200)) as http:

        async def runaway() -> None:
            while not done.is_set():
                reply = await send(http, url, batch or "", random.choice(SLOW))
                batch_codes[reply.status_code] += 1
                if reply.status_code != 200:
                    await anyio.sleep(0.2)  # a batch that retries soon, but does not spin

        async def chat() -> None:
            reply = await send(http, url, "chat-key", "chat")
            chat_codes[reply.status_code] += 1
            if reply.status_code == 200:
                match = TIMING.search(reply.headers["server-timing"])
                assert match is not None
                waits.append(float(match.group(1)) / 1000)

        async with anyio.create_task_group() as group:
            for _ in range(batch_load if batch else 0):
                group.start_soon(runaway)
            await anyio.sleep(1.0 if batch else 0)  # the batch fills the queue first
            async with anyio.create_task_group() as chats:
                for _ in range(30):
                    chats.start_soon(chat)
                    await anyio.sleep(0.1)
            done.set()
    return Run(waits, chat_codes, batch_codes)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}/{p99(values):.3f}/{max(values):.3f}"


def p99(values: list[float]) -> float:
    return sorted(values)[max(0, round(0.99 * len(values)) - 1)]


async def test_a_runaway_low_batch_does_not_starve_a_high_chat(
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
) -> None:
    cap = 4
    keys = [
        {"name": "chat-ui", "key": "chat-key", "priority": "high"},
        {"name": "nightly-batch", "key": "batch-low", "priority": "low"},
        {"name": "same-class-batch", "key": "batch-normal"},
    ]
    data = config(upstream, keys, cap=cap, pending=24)
    with replicas(tmp_path, data, 1) as (gateway,):
        alone = await chat_waits(gateway.url, batch=None, batch_load=0)
        beside = await chat_waits(gateway.url, batch="batch-low", batch_load=10 * cap)
        # For the report: the same batch at the chat's class, where only fair share helps.
        same = await chat_waits(gateway.url, batch="batch-normal", batch_load=10 * cap)
        text = httpx.get(f"{gateway.url}/metrics", timeout=5).text
    service_s = statistics.mean(SERVICE_S[model] for model in SLOW)  # a batch request's
    log.info(
        "chat queue wait p50/p99/max (s): alone %s; beside a low batch of %d loops %s; beside "
        "the batch at the chat's own class %s; a batch request's service time %.3f s; batch "
        "answers %s",
        summary(alone.waits), 10 * cap, summary(beside.waits), summary(same.waits), service_s,
        dict(beside.batch),
    )  # fmt: skip
    assert alone.chat == Counter({200: 30})
    assert beside.chat == Counter({200: 30})  # none shed, none late
    assert p99(beside.waits) < service_s, beside.waits
    assert beside.batch[503] > 0  # the queue was full: the batch was shed, not the chat
    assert 'llm_gateway_shed_total{priority="high",upstream="sim"}' not in text
    assert re.search(r'llm_gateway_shed_total\{priority="low",upstream="sim"\} [1-9]', text)
    assert 'llm_gateway_queue_wait_seconds_count{priority="high",upstream="sim"}' in text


async def test_two_keys_of_one_class_share_a_saturated_upstream(
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
) -> None:
    keys = [{"name": "big", "key": "big"}, {"name": "small", "key": "small"}]
    data = config(upstream, keys, cap=2, pending=100)
    completions: Counter[str] = Counter()
    with replicas(tmp_path, data, 1) as (gateway,):
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as http:
            counting = False
            stop = anyio.Event()

            async def loop(key: str) -> None:
                while not stop.is_set():
                    reply = await send(http, gateway.url, key)
                    assert reply.status_code == 200, reply.text
                    if counting and not stop.is_set():
                        completions[key] += 1

            async with anyio.create_task_group() as group:
                for _ in range(30):
                    group.start_soon(loop, "big")
                for _ in range(3):
                    group.start_soon(loop, "small")
                await anyio.sleep(1.0)  # both backlogged from here on
                counting = True
                await anyio.sleep(4.0)
                stop.set()
    total = sum(completions.values())
    share = completions["small"] / total
    log.info("completions while both were backlogged: %s (small %.0f%%)", completions, share * 100)
    assert total >= 25  # cap 2, 0.2 s each, for 4 s: about 40
    assert 0.4 <= share <= 0.6, completions


async def test_replicas_with_redis_enforce_one_quota(
    tmp_path: Path,
    upstream: Upstream,  # noqa: F811
    redis_server: RedisServer,
) -> None:
    keys = [
        {"name": "rpm", "key": "rpm-key", "limits": {"requests_per_min": 30}},
        {"name": "conc", "key": "conc-key", "limits": {"max_concurrent": 3}},
    ]
    data = config(upstream, keys, cap=64, pending=100)
    data["shared"] = {"redis_url": redis_server.url, "key_prefix": f"t-{uuid.uuid4().hex[:8]}:"}
    with replicas(tmp_path, data, 3) as gateways:
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100)) as http:
            codes: Counter[int] = Counter()

            async def one(url: str, key: str) -> None:
                codes[(await send(http, url, key)).status_code] += 1

            began = time.monotonic()
            async with anyio.create_task_group() as group:
                for i in range(45):
                    group.start_soon(one, gateways[i % 3].url, "rpm-key")
            refills = (time.monotonic() - began) / 2  # 30 a minute: one every 2 s
            assert 30 <= codes[200] <= 30 + refills + 1, (codes, refills)
            assert codes[429] == 45 - codes[200]

            for _ in range(2):  # leases go back when requests end: the same again
                codes.clear()
                async with anyio.create_task_group() as group:
                    for i in range(9):
                        group.start_soon(one, gateways[i % 3].url, "conc-key")
                assert codes == Counter({200: 3, 429: 6}), codes
