"""Real peers for the client's tests: the simulator and a gateway, each served by uvicorn on a
loopback port in its own thread, with the real `openai` and `langchain-openai` as callers.

The gateway (`pip install -e .` at the repository root) is needed only here, never by the
package. This directory is not a Python package: its modules are named `test_client_*` so they
can run in one pytest session with the gateway's own `tests` package.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Self

import httpx2
import pytest
import uvicorn
from gateway.app import create_app
from gateway.config import parse_config
from gateway.simulator import create_simulator_app
from starlette.types import ASGIApp

SLACK_S = 1.0  # scheduling noise: the tests share two cores with other test runs


class LiveServer:
    """An ASGI app served by uvicorn on 127.0.0.1 with a free port, in a background thread."""

    def __init__(self, app: ASGIApp) -> None:
        config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="auto")
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


class Simulator(LiveServer):
    def __init__(self) -> None:
        super().__init__(create_simulator_app())

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def stats(self) -> dict[str, Any]:
        response = httpx2.get(f"{self.url}/sim/stats", timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], within_s: float = 3.0
    ) -> dict[str, Any]:
        """Poll the stats until `predicate` holds; fail with the last stats if it never does."""
        deadline = time.monotonic() + within_s
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise AssertionError(f"the simulator never reached the expected state: {stats}")
            time.sleep(0.02)

    def budget_seen_ms(self) -> int:
        """The `X-Request-Timeout-Ms` the gateway forwarded with the last upstream request: at
        most what the gateway received (it forwards what remains minus its margin)."""
        return int(self.stats()["last_headers"]["x-request-timeout-ms"])


GatewayFactory = Callable[..., LiveServer]


async def close_chat_model(llm: Any) -> None:
    """Close the HTTP clients of a `ChatOpenAI`, as an app would at shutdown (the tests turn
    the warnings about connections left open into errors)."""
    await llm.http_async_client.aclose()
    llm.http_client.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    with Simulator() as server:
        yield server


@pytest.fixture
def gateway(simulator: Simulator) -> Iterator[GatewayFactory]:
    """Start gateways for config dicts; `${SIM}` in strings becomes the simulator's /v1 URL."""
    started: list[LiveServer] = []

    def start(data: dict[str, Any]) -> LiveServer:
        config = parse_config(data, env={"SIM": simulator.base_url})
        server = LiveServer(create_app(config)).__enter__()
        started.append(server)
        return server

    yield start
    for server in [*started, simulator]:  # all at once: each takes ~0.15 s to stop
        server.request_exit()
    for server in started:
        server.__exit__(None, None, None)


def routes(*specs: tuple[str, str, dict[str, float]], **upstream: Any) -> dict[str, Any]:
    """A config with one simulator upstream and a route per `(model, target model, budget)`."""
    return {
        "upstreams": [{"name": "sim", "base_url": "${SIM}", **upstream}],
        "routes": [
            {
                "model": model,
                "targets": [{"upstream": "sim", "model": target}],
                **({"budget": budget} if budget else {}),
            }
            for model, target, budget in specs
        ],
    }


@pytest.fixture
def unaccepting_port() -> Iterator[int]:
    """A port whose listen backlog is full: a TCP connect to it hangs (SYNs are dropped)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fillers = []
    for _ in range(4):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in [*fillers, listener]:
            sock.close()
