"""`python -m bench.suite --smoke` runs end to end, so the benchmark harness cannot rot.

It checks the harness, not the gateway's targets: the run exits 0, its JSON has every section,
the measured numbers are positive and finite, and the upstream is faster than the gateway.
It drives wrk and nginx (`make test` installs them as root): without them it is skipped, naming
the package to install, except under CI, where it fails.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_tool

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("throughput", "latency", "streaming", "llm", "answers", "deadline", "stalls", "targets")


def _positive(value: Any, where: str) -> float:
    assert isinstance(value, int | float), f"{where}: not a number: {value!r}"
    assert math.isfinite(value), f"{where}: not finite: {value!r}"
    assert value > 0, f"{where}: not positive: {value!r}"
    return float(value)


def _finite_everywhere(data: Any, where: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            _finite_everywhere(value, f"{where}.{key}")
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _finite_everywhere(value, f"{where}[{i}]")
    elif isinstance(data, float):
        assert math.isfinite(data), f"{where}: {data}"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    require_tool("wrk", package="wrk")
    require_tool("nginx", package="nginx-light")
    require_tool("redis-server", package="redis-server")  # the "gateway w1 shared" variant
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.suite", "--smoke", "--json", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=200,
        check=False,
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    assert "targets (from the issue" in done.stdout
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.mark.timeout(230)
def test_every_section_is_there_and_finite(smoke: dict[str, Any]) -> None:
    assert smoke["smoke"] is True
    assert "error" not in smoke
    assert smoke["problems"] == []
    for section in SECTIONS:
        assert smoke.get(section), f"missing section {section}"
    _finite_everywhere(smoke)


@pytest.mark.timeout(230)
def test_throughput_and_the_upstream_is_not_the_bottleneck(smoke: dict[str, Any]) -> None:
    tp = smoke["throughput"]
    for path in ("direct", "nginx", "gateway w1", "gateway w2"):
        for c in ("1", "16", "64"):
            _positive(tp["paths"][path][c]["rps"], f"throughput {path} c={c}")
    for gateway in ("gateway w1", "gateway w2"):
        _positive(tp["cpu"][gateway]["us_per_request"], f"CPU per request, {gateway}")
    check = tp["upstream_check"]
    assert check["direct_max_rps"] > check["gateway_max_rps"]


@pytest.mark.timeout(230)
def test_latency_streaming_and_deadline(smoke: dict[str, Any]) -> None:
    for rate, per_path in smoke["latency"]["rates"].items():
        for path in ("direct", "nginx", "gateway w1"):
            s = per_path[path]
            assert s["ok"] == s["requests"] > 0, f"latency {rate}/s {path}: {s}"
            _positive(s["latency"]["p50_ms"], f"latency {rate}/s {path} p50")
            _positive(s["latency"]["p99_ms"], f"latency {rate}/s {path} p99")
        assert "p99_ms" in per_path["gateway w1"]["added"]
    st = smoke["streaming"]
    for path in ("direct", "nginx", "gateway w1"):
        _positive(st["paths"][path]["ttft"]["p50_ms"], f"TTFT {path}")
        _positive(st["paths"][path]["total"]["p99_ms"], f"total {path}")
    _positive(st["cpu"]["us_per_event"], "CPU per relayed event")
    dl = smoke["deadline"]
    _positive(dl["hangs"], "hang requests")
    _positive(dl["response"]["p50_ms"], "hang response time")
    assert "p99_ms" in dl["late_vs_deadline"]


@pytest.mark.timeout(230)
def test_llm_shaped_traffic(smoke: dict[str, Any]) -> None:
    llm = smoke["llm"]
    for path, s in llm["paths"].items():
        assert s["ok"] == llm["streams"] > 0, f"LLM-shaped streams via {path}: {s}"
        _positive(s["ttft"]["p99_ms"], f"LLM-shaped TTFT {path}")
        _positive(s["gap"]["p99_ms"], f"LLM-shaped gap {path}")
    (gateway,) = [s for path, s in llm["paths"].items() if path != "direct"]
    _positive(gateway["cpu"]["us_per_event"], "CPU per relayed LLM-shaped event")
    assert "p99_ms" in gateway["added"]["gap"]
    assembled = llm["assembled"]
    assert assembled["ok"] == llm["streams"]
    _positive(assembled["cpu"]["us_per_event"], "CPU per assembled event")
    answers = smoke["answers"]
    for kind in ("default", "opt_out"):
        _positive(answers[kind]["us_per_request"], f"CPU per 12-event answer, {kind}")
        _positive(answers[kind]["rps"], f"12-event answers per second, {kind}")
    _positive(answers["lone_stream"]["us_per_event"], "CPU per event of a lone stream")


@pytest.mark.timeout(230)
def test_stalled_streams(smoke: dict[str, Any]) -> None:
    (run,) = smoke["stalls"]["runs"]
    assert run["streams"] == run["requested"] > 0
    assert run["peak_live"] == run["streams"], run
    assert run["ended_by_idle"] == run["streams"], run["outcomes"]
    _positive(run["rss_before_mb"], "gateway RSS")
    _positive(run["fds_per_stream"], "descriptors per stream")
    assert math.isfinite(run["late_past_idle"]["max_ms"])
    _positive(run["healthy_during"]["latency"]["p99_ms"], "healthy p99 during stalls")
    _positive(run["healthy_baseline"]["latency"]["p99_ms"], "healthy p99 baseline")
    assert run["upstream_streams_left"] == 0
    expiry = run["expiry"]
    assert expiry["healthy_requests"] > 0, expiry
    assert math.isfinite(expiry["healthy_added_p99_ms"])


@pytest.mark.timeout(230)
def test_targets_are_reported(smoke: dict[str, Any]) -> None:
    targets = smoke["targets"]
    assert len(targets) >= 12
    for goal in targets:
        assert goal["value"] is not None, goal
        assert goal["met"] in (True, False), goal
