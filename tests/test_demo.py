"""The built-in demo, walked as a new user walks the README's table: every model in order,
not streaming then streaming, twice, against `llm-gateway serve` with no config. Each faulty
model shows its fault and nothing else: `demo` answers 200 between every two of them."""

from __future__ import annotations

import json
from pathlib import Path

import httpx2 as httpx

from gateway.demo import demo_models
from tests.conftest import CHAT
from tests.test_cli import serving

# model -> (status, error code) as the README's table says, the same streaming or not, except
# demo-stall, whose stream is committed on its first tokens and ends in an error event.
EXPECTED: dict[str, tuple[int, str | None]] = {
    "demo": (200, None),
    "demo-slow-first-token": (504, "upstream_ttft_timeout"),
    "demo-stall": (504, "upstream_idle_timeout"),
    "demo-hang": (504, "deadline_exceeded"),
    "demo-overloaded": (503, "sim_error"),  # the upstream's own error, passed through
    "demo-garbage": (502, "upstream_protocol_error"),
    "demo-fallback": (200, None),
    "demo-claude": (200, None),
}


def call(url: str, model: str, *, stream: bool) -> tuple[int, str | None, httpx.Response]:
    """The status and error code a client sees (a stream's terminal error event counts)."""
    body = {"model": model, "messages": CHAT, "stream": stream}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=15) as response:
        text = response.read().decode()
    if response.status_code != 200:
        return response.status_code, json.loads(text)["error"]["code"], response
    if stream:
        events = [
            line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")
        ]
        if events[-1] != "[DONE]":
            error = json.loads(events[-1])["error"]
            assert len(events) > 1, text  # tokens came first
            return 504 if error["code"].endswith("_timeout") else 502, error["code"], response
    return 200, None, response


def test_the_demo_table_walked_twice_in_order_in_both_modes(tmp_path: Path) -> None:
    assert set(EXPECTED) == set(demo_models())  # a new demo model gets a row here
    with serving([], cwd=tmp_path) as served:
        seen: list[tuple[str, bool, int, str | None]] = []
        for _ in range(2):
            for stream in (False, True):
                for model in EXPECTED:
                    status, code, response = call(served.url, model, stream=stream)
                    seen.append((model, stream, status, code))
                    if model == "demo-fallback":
                        assert response.headers["x-gateway-attempts"] == "2"
                    healthy, _, _ = call(served.url, "demo", stream=stream)
                    assert healthy == 200, (model, stream, seen)
    expected = [(m, s, *EXPECTED[m]) for _ in range(2) for s in (False, True) for m in EXPECTED]
    assert seen == expected
    assert "circuit_open" not in served.output
