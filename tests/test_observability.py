"""Observability from outside: a real Prometheus scraping a real gateway, the metrics summed
across workers, /debug/inflight, JSON access logs, trace context."""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx2 as httpx
import pytest
import yaml

from gateway.testing import wait_until_ready
from tests.conftest import (
    CHAT,
    GatewayFactory,
    LiveServer,
    Simulator,
    debug_state,
    off_loop,
    one_route,
    require_tool,
)
from tests.test_cli import free_port, serving
from tests.test_resilience import scrape

pytestmark = pytest.mark.anyio


class Prometheus:
    """Debian's Prometheus on a loopback port, scraping `target` every 0.5 s."""

    def __init__(self, binary: str, target: str, workdir: Path) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "500ms", "evaluation_interval": "500ms"},
            "scrape_configs": [{"job_name": "gateway", "static_configs": [{"targets": [target]}]}],
        }
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.process = subprocess.Popen(
            [
                binary,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 20
        if not wait_until_ready(f"{self.url}/-/ready", self.process):
            raise AssertionError(f"prometheus did not start: {self.stderr()}")
        while not self._scraping():  # it applies new targets after about 5 s
            if time.monotonic() > deadline:
                raise AssertionError(f"prometheus never scraped {target}: {self.stderr()}")
            time.sleep(0.2)

    def _scraping(self) -> bool:
        targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()["data"]
        return any(target["health"] == "up" for target in targets["activeTargets"])

    def stderr(self) -> str:
        self.process.kill()
        return self.process.stderr.read().decode() if self.process.stderr else ""

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=5)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        result: list[dict[str, Any]] = body["data"]["result"]
        return result

    def value(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def wait_for(self, expr: str, check: Any, within_s: float = 10) -> float | None:
        deadline = time.monotonic() + within_s
        while True:
            value = self.value(expr)
            if check(value):
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"{expr} never satisfied the check; last value {value}")
            time.sleep(0.25)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stderr is not None:
            self.process.stderr.close()


@pytest.fixture
def prometheus_for() -> Iterator[Any]:
    binary = require_tool("prometheus", package="prometheus")
    started: list[Prometheus] = []
    with tempfile.TemporaryDirectory() as directory:

        def start(server: LiveServer) -> Prometheus:
            prometheus = Prometheus(binary, f"127.0.0.1:{server.port}", Path(directory))
            started.append(prometheus)
            return prometheus

        yield start
        for prometheus in started:
            prometheus.stop()


def exported_names(server: LiveServer) -> set[str]:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    return {match[1] for match in re.finditer(r"^# TYPE (\S+) ", text, re.M)}


async def test_a_stall_shows_before_idle_s_ends_it(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """With the default stall_warn_s (10 s), a route whose idle_s is 1 s still shows its
    stall: a request is stalled after min(stall_warn_s, idle_s / 2) without content."""
    data = one_route(
        "gauge-stall", target_model="sim@hang=after-2,keepalive-ms=100", budget={"idle_s": 1}
    )
    data["upstreams"][0]["name"] = "gauge-sim"
    data["routes"][0]["targets"][0]["upstream"] = "gauge-sim"
    server = gateway(data)
    seen: list[float] = []

    def watch() -> None:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not (seen and seen[-1] == 0 and 1 in seen):
            seen.append(scrape(server.url)['llm_gateway_stalled_requests{upstream="gauge-sim"}'])
            time.sleep(0.1)

    async with anyio.create_task_group() as group:
        group.start_soon(
            off_loop,
            lambda: httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "gauge-stall", "messages": CHAT, "stream": True},
                timeout=10,
            ),
        )
        await simulator.until(lambda s: s["open"] == 1)
        await off_loop(watch)
    assert 1 in seen  # visible while it hung
    assert seen[-1] == 0  # and gone once idle_s ended it
    await simulator.until(lambda s: s["cancelled"] == 1)


async def test_prometheus_sees_a_stall_while_it_happens(
    gateway: GatewayFactory, simulator: Simulator, prometheus_for: Any
) -> None:
    # Names of their own: the metrics registry is the test process's, shared by every test.
    data = one_route(
        "obs-stall", target_model="sim@hang=after-2,keepalive-ms=100", budget={"idle_s": 3}
    )
    data["upstreams"][0]["name"] = "obs-sim"
    data["routes"][0]["targets"][0]["upstream"] = "obs-sim"
    data["routes"].append(
        {"model": "obs-hang", "targets": [{"upstream": "obs-sim", "model": "sim@hang=headers"}]}
    )
    data["server"] = {"stall_warn_s": 0.5}
    server = gateway(data)
    prometheus = prometheus_for(server)
    stalled = 'sum(llm_gateway_stalled_requests{upstream="obs-sim"})'

    async def stream() -> None:
        async with (
            httpx.AsyncClient(timeout=10) as client,
            client.stream(
                "POST",
                f"{server.url}/v1/chat/completions",
                json={"model": "obs-stall", "messages": CHAT, "stream": True},
            ) as response,
        ):
            async for _ in response.aiter_bytes():
                pass

    async with anyio.create_task_group() as group:
        group.start_soon(stream)
        # Visible while the stream hangs, before any timeout fires (idle_s is 3 s).
        await off_loop(prometheus.wait_for, stalled, lambda v: v is not None and v > 0, 6)
        timeouts = 'sum(llm_gateway_timeouts_total{route="obs-stall"})'
        assert (await off_loop(prometheus.value, timeouts)) in (None, 0)
    await off_loop(prometheus.wait_for, stalled, lambda v: v == 0, 6)
    idle = 'sum(llm_gateway_timeouts_total{phase="idle", route="obs-stall", upstream="obs-sim"})'
    assert await off_loop(prometheus.wait_for, idle, lambda v: v == 1) == 1
    ttft = 'sum(llm_gateway_ttft_seconds_count{route="obs-stall"})'
    assert await off_loop(prometheus.wait_for, ttft, lambda v: v == 1) == 1
    gap = 'sum(llm_gateway_stream_max_gap_seconds_sum{route="obs-stall"})'
    assert (await off_loop(prometheus.wait_for, gap, lambda v: v is not None and v >= 3)) >= 3

    # A client that goes away is counted as a cancellation of its upstream request.
    with pytest.raises(httpx.ReadTimeout):
        await off_loop(
            lambda: httpx.post(
                f"{server.url}/v1/chat/completions",
                json={"model": "obs-hang", "messages": CHAT},
                timeout=0.5,
            )
        )
    await simulator.until(lambda s: s["cancelled"] >= 2)
    gone = (
        "sum(llm_gateway_upstream_cancellations_total"
        '{upstream="obs-sim", reason="client_disconnect"})'
    )
    assert await off_loop(prometheus.wait_for, gone, lambda v: v == 1) == 1
    outcome = 'sum(llm_gateway_requests_total{route="obs-hang", outcome="client_disconnect"})'
    assert await off_loop(prometheus.wait_for, outcome, lambda v: v == 1) == 1

    # Every expression of the dashboard and the alert rules parses and names real series.
    from tests.test_deploy import promql_expressions

    names = exported_names(server)
    for expr in promql_expressions():
        await off_loop(prometheus.query, expr)
        for name in re.findall(r"llm_gateway_[a-z_]+", expr):
            base = re.sub(r"_(bucket|count|sum|total)$", "", name)
            assert base in names or name in names, f"{name} in {expr!r} is not exported"


def test_metrics_add_up_across_workers(tmp_path: Path, simulator: Simulator) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "upstreams": [{"name": "sim", "base_url": simulator.base_url}],
                "routes": [{"model": "m", "targets": [{"upstream": "sim", "model": "sim"}]}],
            }
        )
    )
    requests = 40
    with (
        serving(["--config", str(config), "--workers", "2"], cwd=tmp_path) as served,
        httpx.Client(base_url=served.url, timeout=10) as client,
    ):
        for _ in range(requests):  # new connections: both workers take some
            response = client.post(
                "/v1/chat/completions",
                json={"model": "m", "messages": CHAT},
                headers={"connection": "close"},
            )
            assert response.status_code == 200
        for _ in range(6):  # every scrape, whichever worker answers it
            text = client.get("/metrics", headers={"connection": "close"}).text
            counted = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("llm_gateway_requests_total{")
            )
            assert counted == requests, text


async def test_debug_inflight_shows_a_hanging_request(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(target_model="sim@hang=body", budget={"total_s": 5}))

    async def hang() -> None:
        with pytest.raises(httpx.TimeoutException):
            await off_loop(
                lambda: httpx.post(
                    f"{server.url}/v1/chat/completions",
                    json={"model": "m", "messages": CHAT},
                    headers={"x-request-id": "hanging-1"},
                    timeout=1.5,
                )
            )

    async with anyio.create_task_group() as group:
        group.start_soon(hang)
        await simulator.until(lambda s: s["open"] == 1)
        await anyio.sleep(0.3)
        (row,) = (await off_loop(debug_state, server))["inflight"]
    assert row["id"] == "hanging-1"
    assert row["route"] == "m"
    assert row["upstream"] == "sim"
    assert row["phase"] == "waiting_first_token"
    assert row["attempts"] == 1
    assert row["age_s"] >= 0.3
    assert 0 < row["remaining_s"] < 5


def test_json_access_lines_with_trace_context(tmp_path: Path, simulator: Simulator) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"log_format": "json"},
                "upstreams": [
                    {"name": "sim", "base_url": simulator.base_url, "api_key": "sk-secret-123"}
                ],
                "routes": [{"model": "m", "targets": [{"upstream": "sim", "model": "sim"}]}],
            }
        )
    )
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    with serving(["--config", str(config)], cwd=tmp_path) as served:
        response = httpx.post(
            f"{served.url}/v1/chat/completions",
            json={"model": "m", "messages": CHAT},
            headers={"traceparent": trace, "tracestate": "vendor=1", "x-request-id": "r-42"},
            timeout=10,
        )
        assert response.status_code == 200
        seen = simulator.stats()["last_headers"]
        assert (seen["traceparent"], seen["tracestate"]) == (trace, "vendor=1")
    lines = [json.loads(line) for line in served.output.splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "gateway.access"]
    assert len(access) == 1, served.output  # uvicorn's own access line is off
    (line,) = access
    assert line["request_id"] == "r-42"
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert (line["route"], line["status"], line["outcome"]) == ("m", 200, "ok")
    assert line["upstream"] == "sim"
    assert line["attempts"] == 1
    assert line["budget_source"] == "route"
    assert line["completion_tokens"] == 8
    for key in ("ms", "queue_ms", "upstream_ms", "ttft_ms", "budget_s"):
        assert isinstance(line[key], int | float), key
    assert "sk-secret-123" not in served.output


def test_a_malformed_traceparent_is_not_forwarded(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route())
    for bad in ("00-xyz", "00-" + "0" * 32 + "-00f067aa0ba902b7-01", "x" * 2000):
        response = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={"model": "m", "messages": CHAT},
            headers={"traceparent": bad},
            timeout=10,
        )
        assert response.status_code == 200
        assert "traceparent" not in simulator.stats()["last_headers"]


def test_labels_never_come_from_client_input(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    series = 'llm_gateway_requests_total{code="404",outcome="model_not_found",route="-"}'
    before = _value(httpx.get(f"{server.url}/metrics", timeout=5).text, series)
    for model in ("no-such-model", "x" * 300, "another"):
        response = httpx.post(
            f"{server.url}/v1/chat/completions", json={"model": model, "messages": []}, timeout=5
        )
        assert response.status_code == 404
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert "no-such-model" not in text
    assert _value(text, series) == before + 3


def _value(exposition: str, series: str) -> float:
    for line in exposition.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_metrics_can_be_turned_off(gateway: GatewayFactory) -> None:
    server = gateway({**one_route(), "server": {"metrics": False}})
    assert httpx.get(f"{server.url}/metrics", timeout=5).status_code == 404
