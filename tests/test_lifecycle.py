"""Graceful shutdown of a real `llm-gateway serve` process: SIGTERM during a long stream and
a queued request."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx2 as httpx
import pytest
import yaml

from tests.conftest import CHAT, Simulator
from tests.test_cli import serving

GRACE_S = 1.5
LONG = "sim@tokens=400,gap-ms=50"  # 20 s of tokens


def test_sigterm_drains_then_ends_what_is_left(tmp_path: Path, simulator: Simulator) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"shutdown_grace_s": GRACE_S},
                "upstreams": [
                    {"name": "sim", "base_url": simulator.base_url, "max_connections": 1}
                ],
                "routes": [
                    {
                        "model": "long",
                        "targets": [{"upstream": "sim", "model": "sim@tokens=400,gap-ms=50"}],
                    }
                ],
            }
        )
    )
    results: dict[str, Any] = {}
    with serving(["--config", str(config)], cwd=tmp_path) as served:
        url = served.url

        def stream() -> None:
            lines = []
            with httpx.stream(
                "POST",
                f"{url}/v1/chat/completions",
                json={"model": "long", "messages": CHAT, "stream": True},
                timeout=20,
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        lines.append(line)
            results["stream"] = lines

        def queued() -> None:
            results["queued"] = httpx.post(
                f"{url}/v1/chat/completions", json={"model": "long", "messages": CHAT}, timeout=20
            )

        threads = [threading.Thread(target=stream)]
        threads[0].start()
        simulator.wait_for(lambda s: s["open"] == 1)
        threads.append(threading.Thread(target=queued))
        threads[1].start()
        _wait_queued(url)

        served.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        time.sleep(0.2)
        ready = httpx.get(f"{url}/readyz", timeout=5)
        assert ready.status_code == 503  # at once, while the listener still serves
        for thread in threads:
            thread.join(timeout=15)
        ended = time.monotonic() - signalled
        served.process.wait(timeout=15)
    output = served.output

    assert GRACE_S - 0.2 <= ended < GRACE_S + 3, ended
    last = json.loads(results["stream"][-1].removeprefix("data: "))
    assert last["error"]["code"] == "shutting_down"  # a terminal event, not a cut stream
    assert len(results["stream"]) > 3  # tokens flowed during the grace
    queued_answer = results["queued"]
    assert queued_answer.status_code == 503
    assert queued_answer.json()["error"]["code"] == "shutting_down"
    simulator.wait_for(lambda s: s["cancelled"] == 1 and s["open"] == 0)  # upstream cancelled
    # uvicorn re-raises the SIGTERM it handled, so a supervisor sees the signal end it.
    assert served.process.returncode == -signal.SIGTERM
    assert "Traceback" not in output
    access = [line for line in output.splitlines() if "gateway.access" in line]
    assert len(access) == 2, output
    assert all("outcome=shutting_down" in line for line in access), access
    drain = [line[line.index("event=") :] for line in output.splitlines() if "event=drain" in line]
    assert drain == [
        f"event=drain_started in_flight=2 grace_s={GRACE_S}",
        "event=drain_ended finished=0 cut=2",
    ]


def _wait_queued(url: str) -> None:
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/debug/inflight", timeout=5).json()["pools"]["sim"]["queued"] != 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_each_protective_act_is_one_log_line(
    tmp_path: Path, simulator: Simulator, log_format: str
) -> None:
    """An ejection, the restore after it, a drain's start and its end: one line each, in the
    format the operator chose, with the numbers that explain it."""
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"shutdown_grace_s": GRACE_S, "log_format": log_format},
                "upstreams": [
                    {
                        "name": "sim",
                        "base_url": simulator.base_url,
                        "outlier": {"consecutive_failures": 2, "base_ejection_s": 0.3},
                    }
                ],
                "routes": [
                    {
                        "model": "m",
                        "targets": [{"upstream": "sim", "model": "sim@status=500,flaky=4"}],
                    }
                ],
            }
        )
    )
    with serving(["--config", str(config)], cwd=tmp_path) as served:
        statuses = [
            httpx.post(
                f"{served.url}/v1/chat/completions",
                json={"model": "m", "messages": CHAT},
                timeout=10,
            ).status_code
            for _ in range(5)
        ]
        served.process.send_signal(signal.SIGTERM)
        served.process.wait(timeout=15)
    assert statuses == [500, 500, 500, 500, 200]  # ejected after 2, still served (panic routing)
    lines = [line for line in served.output.splitlines() if "event=" in line or '"event"' in line]
    if log_format == "json":
        events = [json.loads(line) for line in lines]
    else:
        pairs = (line[line.index("event=") :].split(" ") for line in lines)
        events = [dict(pair.split("=", 1) for pair in line) for line in pairs]
    assert [event["event"] for event in events] == [
        "upstream_ejected",
        "upstream_restored",
        "drain_started",
        "drain_ended",
    ], served.output
    ejected, _, started, ended = events
    assert str(ejected["failures"]) == "2"
    assert str(ejected["ejected_s"]) == "0.3"
    assert str(started["in_flight"]) == "0"
    assert (str(ended["finished"]), str(ended["cut"])) == ("0", "0")
