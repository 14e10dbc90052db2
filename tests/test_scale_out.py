"""One cap across processes, end to end: real `llm-gateway serve` replicas sharing a real
redis-server, a simulator process as the upstream counting the requests it has open."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
import yaml

from gateway.testing import wait_until_ready
from tests.conftest import RedisServer, free_port
from tests.test_cli import Served, start_cli, stop_process

CAP = 4
TTL_S = 1.5
OK_ACQUIRES = '{op="acquire",outcome="ok"}'


class Process(Served):
    """A replica: a `serve` process, whose metrics the tests read."""

    def metric(self, name: str, labels: str = "") -> float | None:
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.MULTILINE)
        return float(match.group(1)) if match else None


@dataclass
class Upstream:
    url: str

    def stats(self) -> dict[str, Any]:
        with urllib.request.urlopen(f"{self.url}/sim/stats", timeout=5) as response:
            result: dict[str, Any] = json.load(response)
        return result

    def reset(self) -> None:
        request = urllib.request.Request(f"{self.url}/sim/reset", method="POST")
        urllib.request.urlopen(request, timeout=5).close()


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    """`llm-gateway simulate` in a process of its own, as a real upstream would be."""
    port = free_port()
    log = tmp_path_factory.mktemp("sim") / "sim.log"
    process = start_cli(["simulate", "--port", str(port), "--log-level", "warning"], log)
    try:
        if not wait_until_ready(f"http://127.0.0.1:{port}/sim/stats", process):
            raise AssertionError(f"the simulator did not start:\n{log.read_text()}")
        yield Upstream(f"http://127.0.0.1:{port}")
    finally:
        stop_process(process)


def gateway_config(
    upstream: Upstream, redis: RedisServer | None, *, cap: int = CAP, **shared: Any
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "upstreams": [
            {
                "name": "sim",
                "base_url": f"{upstream.url}/v1",
                "max_connections": cap,
                "max_pending": 200,
            }
        ],
        "routes": [
            {
                "model": "slow",
                "targets": [{"upstream": "sim", "model": "sim@gap-ms=50,tokens=6"}],
                "budget": {"total_s": 30, "ttft_s": 30, "idle_s": 30},
            },
            {
                "model": "long",
                "targets": [{"upstream": "sim", "model": "sim@gap-ms=100,tokens=300"}],
                "budget": {"total_s": 60, "ttft_s": 30, "idle_s": 30},
            },
        ],
    }
    if redis is not None:
        data["shared"] = {
            "redis_url": redis.url,
            "key_prefix": f"test-{uuid.uuid4().hex[:8]}:",
            "lease_ttl_s": TTL_S,
            "timeout_s": 0.1,
            **shared,
        }
    return data


@contextmanager
def replicas(
    directory: Path, data: dict[str, Any], count: int, *args: str
) -> Iterator[list[Process]]:
    """`count` serve processes of one config, each on its own port, ready when yielded."""
    config = directory / f"gateway-{uuid.uuid4().hex[:6]}.yaml"
    config.write_text(yaml.safe_dump(data))
    started: list[Process] = []
    with ExitStack() as stack:
        for i in range(count):
            port = free_port()
            command = ["serve", "--config", str(config), "--port", str(port), *args]
            log = directory / f"{config.stem}-{i}.log"
            process = start_cli(command, log)
            stack.callback(stop_process, process)
            started.append(Process(f"http://127.0.0.1:{port}", process, log))
        for replica in started:
            if not wait_until_ready(f"{replica.url}/readyz", replica.process):
                raise AssertionError(f"serve did not start:\n{replica.output}")
        yield started


@dataclass
class Tally:
    codes: Counter[int] = field(default_factory=Counter)
    error_codes: Counter[str] = field(default_factory=Counter)
    slowest_s: float = 0.0
    retry_after: set[str] = field(default_factory=set)


async def stream_once(client: httpx.AsyncClient, url: str, model: str, tally: Tally) -> int:
    """One streamed chat request read to its end; its status and time go in `tally`."""
    started = time.monotonic()
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with anyio.fail_after(20):  # a hang fails the test here
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            text = (await response.aread()).decode()
    tally.codes[response.status_code] += 1
    if response.status_code != 200:
        tally.error_codes[json.loads(text)["error"]["code"]] += 1
        tally.retry_after.add(response.headers.get("retry-after", ""))
    else:
        assert text.rstrip().endswith("data: [DONE]"), text[-200:]
    tally.slowest_s = max(tally.slowest_s, time.monotonic() - started)
    return response.status_code


def client() -> httpx.AsyncClient:
    return httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=100))


@pytest.mark.anyio
async def test_three_replicas_share_one_cap(
    tmp_path: Path, upstream: Upstream, redis_server: RedisServer
) -> None:
    with replicas(tmp_path, gateway_config(upstream, redis_server), 3) as gateways:
        upstream.reset()
        tally = Tally()
        async with client() as http, anyio.create_task_group() as group:
            for i in range(40):
                group.start_soon(stream_once, http, gateways[i % 3].url, "slow", tally)
        stats = upstream.stats()
        assert tally.codes == Counter({200: 40})
        assert stats["total"] == 40
        assert stats["peak_open"] == CAP  # never more, and the cap was used
        assert all(g.metric("llm_gateway_shared_state_up") == 1 for g in gateways)
        taken = [g.metric("llm_gateway_shared_ops_total", OK_ACQUIRES) or 0 for g in gateways]
        assert 0 < sum(taken) <= 40  # one call may take several slots


@pytest.mark.anyio
async def test_a_long_stream_keeps_its_slots_and_a_killed_replica_frees_them(
    tmp_path: Path, upstream: Upstream, redis_server: RedisServer
) -> None:
    with replicas(tmp_path, gateway_config(upstream, redis_server), 2) as (first, second):
        upstream.reset()
        async with client() as http, anyio.create_task_group() as group:
            for _ in range(CAP):  # 30 s streams: they hold every slot
                group.start_soon(_ignore_errors, http, first.url, "long")
            await _until(lambda: upstream.stats()["open"] == CAP, within_s=5)
            waiting = Tally()
            group.start_soon(stream_once, http, second.url, "slow", waiting)
            await anyio.sleep(3 * TTL_S)  # several TTLs: the leases are renewed, not lost
            assert upstream.stats()["total"] == CAP
            assert first.metric("llm_gateway_shared_slots", '{upstream="sim"}') == CAP
            assert second.metric("llm_gateway_shared_slots", '{upstream="sim"}') == 0
            first.process.send_signal(signal.SIGKILL)  # its slots stay leased in Redis
            killed = time.monotonic()
            await _until(lambda: upstream.stats()["total"] == CAP + 1, within_s=TTL_S + 3)
            freed_after = time.monotonic() - killed
            group.cancel_scope.cancel()
    assert freed_after <= TTL_S + 1, freed_after


async def _ignore_errors(http: httpx.AsyncClient, url: str, model: str) -> None:
    with contextlib.suppress(httpx.HTTPError, TimeoutError):  # its replica was killed
        await stream_once(http, url, model, Tally())


async def _until(predicate: Any, within_s: float) -> None:
    deadline = time.monotonic() + within_s
    while not await anyio.to_thread.run_sync(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached within {within_s} s: {predicate}")
        await anyio.sleep(0.05)


@pytest.mark.anyio
@pytest.mark.parametrize("on_failure", ["closed", "open", "local_share"])
async def test_redis_stopped_and_started_again_under_load(
    tmp_path: Path, upstream: Upstream, own_redis: RedisServer, on_failure: str
) -> None:
    data = gateway_config(upstream, own_redis, on_failure=on_failure, expected_replicas=2)
    with replicas(tmp_path, data, 2) as gateways:
        before, during, after = Tally(), Tally(), Tally()
        phase = before
        stop = anyio.Event()

        async def keep_asking(http: httpx.AsyncClient, url: str) -> None:
            while not stop.is_set():  # each request counts in the phase it started in
                if await stream_once(http, url, "slow", phase) != 200:
                    await anyio.sleep(0.1)  # refused: do not spin

        async with client() as http, anyio.create_task_group() as group:
            for i in range(12):
                group.start_soon(keep_asking, http, gateways[i % 2].url)
            await anyio.sleep(0.5)
            upstream.reset()
            phase = during
            own_redis.stop()
            await _until(lambda: all(_up(g) == 0 for g in gateways), within_s=3)
            await anyio.sleep(1)  # what ran before drains: running requests are never cut
            upstream.reset()
            admitted = await _most_admitted(gateways, for_s=1.5)
            outage = upstream.stats()
            own_redis.start()  # empty: the processes register what they hold again
            await _until(lambda: all(_up(g) == 1 for g in gateways), within_s=5)
            await anyio.sleep(1)  # what the outage let in drains (streams of 0.3 s)
            phase = after
            upstream.reset()
            await anyio.sleep(2)
            recovered = upstream.stats()
            stop.set()
    for tally in (before, during, after):
        assert set(tally.codes) <= {200, 503}, tally  # never a 500
        assert tally.slowest_s < 8, tally  # never a hang
    assert after.codes.keys() == {200}
    assert recovered["peak_open"] <= CAP  # one cap again
    if on_failure == "closed":  # refused: new requests, and those queued when Redis went
        assert set(before.error_codes) <= {"shared_state_unavailable"}
        assert during.error_codes.keys() == {"shared_state_unavailable"}
        assert during.retry_after == {"1"}
        assert outage["peak_open"] <= CAP
    elif on_failure == "open":
        assert before.codes.keys() == during.codes.keys() == {200}
        assert outage["peak_open"] > CAP  # each replica its own cap of 4
    else:
        assert before.codes.keys() == during.codes.keys() == {200}
        assert admitted == [2, 2]  # ceil(4 / 2) each, used and never exceeded
        # The simulator counts a request open until its handler returns, a moment after its
        # last byte, so a slot handed straight to the next in line can read one more each.
        assert 0 < outage["peak_open"] <= CAP + len(gateways)
    for gateway in gateways:
        output = gateway.output
        assert output.count("WARNING gateway.shared shared state lost") == 1, output
        assert output.count("INFO gateway.shared shared state back") == 1, output
        assert f"on_failure={on_failure}" in output


async def _most_admitted(gateways: list[Process], for_s: float) -> list[int]:
    """The most requests each gateway admitted to the upstream at once, sampled."""
    most = [0] * len(gateways)
    deadline = time.monotonic() + for_s
    while time.monotonic() < deadline:
        for i, gateway in enumerate(gateways):
            state = await anyio.to_thread.run_sync(_debug_state, gateway)
            most[i] = max(most[i], state["pools"]["sim"]["admitted"])
        await anyio.sleep(0.02)
    return most


def _debug_state(gateway: Process) -> dict[str, Any]:
    with urllib.request.urlopen(f"{gateway.url}/debug/inflight", timeout=5) as response:
        result: dict[str, Any] = json.load(response)
    return result


def _up(gateway: Process) -> float | None:
    return gateway.metric("llm_gateway_shared_state_up")


@pytest.mark.anyio
async def test_workers_without_redis_divide_the_cap(tmp_path: Path, upstream: Upstream) -> None:
    data = gateway_config(upstream, None, cap=2)
    with replicas(tmp_path, data, 1, "--workers", "2") as (gateway,):
        upstream.reset()
        tally = Tally()
        async with anyio.create_task_group() as group:
            for _ in range(16):  # a connection each: both workers take some
                group.start_soon(_own_connection, gateway.url, tally)
        assert tally.codes == Counter({200: 16})
        assert 0 < upstream.stats()["peak_open"] <= 2
    line = "caps are per worker: upstream sim 2 -> 1 per worker"
    assert gateway.output.count(line) == 1, gateway.output


async def _own_connection(url: str, tally: Tally) -> None:
    async with client() as http:
        await stream_once(http, url, "slow", tally)
