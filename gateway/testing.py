"""Real servers for tests: any ASGI app (a gateway, the simulator) served by uvicorn on a free
loopback port in a background thread, and the simulator with its counters at hand.

The gateway's tests and the client package's tests both use these, and so can users testing
their own stacks against the simulator. Nothing in the gateway imports this module.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Self

import anyio
import uvicorn
from starlette.types import ASGIApp

from gateway.http_server import HeaderTimeoutProtocol
from gateway.simulator import create_simulator_app

Stats = dict[str, Any]


class LiveServer:
    """`app` served by uvicorn on 127.0.0.1 with a free port, in a background thread, with the
    HTTP protocol `llm-gateway serve` runs."""

    def __init__(self, app: ASGIApp) -> None:
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=0,
            log_level="warning",
            lifespan="auto",
            http=HeaderTimeoutProtocol,
            timeout_graceful_shutdown=5,
        )
        self.app = app
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.request_exit()
        self._thread.join(timeout=10)

    def request_exit(self) -> None:
        """Ask the server to stop (it does within ~0.1 s); `__exit__` then waits for it."""
        self._server.should_exit = True


class LiveSimulator(LiveServer):
    """A new simulator (`gateway.simulator`), its counters read from `GET /sim/stats`."""

    def __init__(self) -> None:
        super().__init__(create_simulator_app())

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stats(self) -> Stats:
        with urllib.request.urlopen(f"{self.url}/sim/stats", timeout=5) as response:
            result: Stats = json.load(response)
        return result

    def wait_for(self, predicate: Callable[[Stats], bool], within_s: float = 3.0) -> Stats:
        """Poll the stats until `predicate` holds; fail with the last stats if it never does."""
        deadline = time.monotonic() + within_s
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the simulator never reached the expected state: {stats}")
            time.sleep(0.02)

    async def until(self, predicate: Callable[[Stats], bool], within_s: float = 3.0) -> Stats:
        """`wait_for` for async tests: polls in a worker thread, so the test's loop runs on."""
        return await anyio.to_thread.run_sync(self.wait_for, predicate, within_s)

    def budget_seen_ms(self) -> int:
        """The `X-Request-Timeout-Ms` the gateway forwarded with the last upstream request: at
        most what the gateway received (it forwards what remains minus its margin)."""
        return int(self.stats()["last_headers"]["x-request-timeout-ms"])


def wait_until_ready(url: str, process: subprocess.Popen[Any], within_s: float = 20.0) -> bool:
    """Poll `url` until it answers 200 (True); False if `process` exits or `within_s` pass
    first, for the caller to say why with what it knows (the process's output)."""
    deadline = time.monotonic() + within_s
    while process.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return True
        except (urllib.error.URLError, OSError):  # not listening yet, or not ready (503)
            pass
        time.sleep(0.1)
    return False
