"""Slow and idle clients are cut off: a real `llm-gateway serve` with a 1 s header timeout and
a 1 s keep-alive."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import httpx2 as httpx
import yaml

from tests.conftest import CHAT, Simulator
from tests.test_cli import serving


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float:
    """Send `trickle` a byte at a time (every 0.2 s) until the server closes; the time taken."""
    started = time.monotonic()
    sock.settimeout(0.2)
    for byte in [trickle[i : i + 1] for i in range(len(trickle))] or [b""] * 1000:
        try:
            if byte:
                sock.sendall(byte)
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except TimeoutError:
            pass
        except OSError:  # reset: closed as well
            return time.monotonic() - started
        if time.monotonic() - started > seconds:
            break
    raise AssertionError(f"the connection was still open after {seconds} s")


def test_slow_and_idle_clients_are_cut_off(tmp_path: Path, simulator: Simulator) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "server": {"header_timeout_s": 1, "keepalive_s": 1},
                "upstreams": [{"name": "sim", "base_url": simulator.base_url}],
                "routes": [{"model": "m", "targets": [{"upstream": "sim", "model": "sim"}]}],
            }
        )
    )
    with serving(["--config", str(config)], cwd=tmp_path) as served:
        port = int(served.url.rsplit(":", 1)[1])
        slow = [socket.create_connection(("127.0.0.1", port)) for _ in range(200)]
        try:
            head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100
            assert _closed_within(slow[0], 4, trickle=head) < 1 + 1.5  # headers a byte at a time
            assert _closed_within(slow[1], 4) < 1 + 1.5  # nothing at all
            # The other 198 were cut too, and the server still answers.
            time.sleep(0.5)
            response = httpx.post(
                f"{served.url}/v1/chat/completions",
                json={"model": "m", "messages": CHAT},
                timeout=5,
            )
            assert response.status_code == 200
        finally:
            for sock in slow:
                sock.close()
        with socket.create_connection(("127.0.0.1", port)) as idle:
            idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200" in idle.recv(65536).split(b"\r\n")[0]
            assert _closed_within(idle, 4) < 1 + 1.5  # an idle keep-alive connection
    assert "Traceback" not in served.output
