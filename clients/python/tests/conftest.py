"""Real peers for the client's tests: the simulator and a gateway, each served by uvicorn on a
loopback port in its own thread, with the real `openai` and `langchain-openai` as callers.

The gateway (`pip install -e .` at the repository root) is needed only here, never by the
package. This directory is not a Python package: its modules are named `test_client_*` so they
can run in one pytest session with the gateway's own `tests` package.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from gateway.app import create_app
from gateway.config import parse_config
from gateway.testing import LiveServer as LiveServer  # the tests import both from here
from gateway.testing import LiveSimulator, wait_until_ready

SLACK_S = 1.0  # scheduling noise: the tests share two cores with other test runs

Simulator = LiveSimulator


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


@pytest.fixture(scope="session")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`llm-gateway serve` with no config, in an empty directory: the demo on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = shutil.which("llm-gateway", path=str(Path(sys.executable).parent))
    assert command is not None, "the gateway is not installed in this environment"
    server = subprocess.Popen(
        [command, "serve", "--port", str(port)],
        cwd=tmp_path_factory.mktemp("demo"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ready(f"{url}/readyz", server), "llm-gateway serve did not get ready"
        yield f"{url}/v1"
    finally:
        server.terminate()
        server.wait(timeout=10)


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
