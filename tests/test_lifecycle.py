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


def _wait_queued(url: str) -> None:
    deadline = time.monotonic() + 5
    while httpx.get(f"{url}/debug/inflight", timeout=5).json()["pools"]["sim"]["queued"] != 1:
        assert time.monotonic() < deadline, "the second request never queued"
        time.sleep(0.02)
