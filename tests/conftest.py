"""Shared test peers: real uvicorn servers on loopback ports, each in its own thread and loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Self

import anyio
import httpx2 as httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.app import create_app
from gateway.config import parse_config
from gateway.testing import LiveServer as LiveServer  # the tests import both from here
from gateway.testing import LiveSimulator

Simulator = LiveSimulator

# Where Debian puts daemons (nginx, redis-server): often not on a user's PATH.
_SBIN = "/usr/sbin:/usr/local/sbin"


def require_tool(name: str, *, package: str) -> str:
    """The path of the system tool `name`, which a test drives as a real peer. Missing, the test
    is skipped with a reason naming the Debian/Ubuntu `package` to install (`make test` installs
    it when run as root: scripts/test-tools); under CI=true it fails instead, as CI installs
    every tool and a skip there would hide a test that never ran."""
    __tracebackhide__ = True  # the skip names the test's line, not this one
    path = shutil.which(name, path=f"{os.environ.get('PATH', '')}:{_SBIN}")
    if path is not None:
        return path
    reason = f"{name} is not installed: apt-get install {package} (or `make test` as root)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must install it")
    pytest.skip(reason)


def require_redis_server() -> str:
    """The path of redis-server, for the tests of state shared through Redis."""
    return require_tool("redis-server", package="redis-server")


class RawServer:
    """A raw asyncio TCP server on a loopback port, in a thread with its own loop: for peers
    that must misbehave below HTTP. Subclasses answer each connection in `handle`."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._serve()), daemon=True)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _serve(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    def __enter__(self) -> Self:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=5)


class SocketCounter(RawServer):
    """A TCP relay on a loopback port in front of `port` that counts the sockets through it:
    the one exact way to see how many connections a client really holds open at once."""

    def __init__(self, port: int) -> None:
        super().__init__()
        self._target = port
        self.open = self.peak = self.total = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.total += 1
        self.peak = max(self.peak, self.open)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            self.open -= 1
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def debug_state(server: LiveServer) -> dict[str, Any]:
    result: dict[str, Any] = httpx.get(f"{server.url}/debug/inflight", timeout=5).json()
    return result


def wait_until_idle(server: LiveServer, within_s: float = 3.0) -> None:
    """Nothing in flight, nothing queued, no socket busy: no leaked slot, no leaked socket."""
    deadline = time.monotonic() + within_s
    while True:
        state = debug_state(server)
        if not state["inflight"] and all(
            pool["admitted"] == 0 and pool["queued"] == 0 and pool["connections_active"] == 0
            for pool in state["pools"].values()
        ):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"the gateway is not idle: {state}")
        time.sleep(0.02)


def wait_until_queued(server: LiveServer, upstream: str, count: int, within_s: float = 3.0) -> None:
    deadline = time.monotonic() + within_s
    while (state := debug_state(server))["pools"][upstream]["queued"] != count:
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {count} queued: {state}")
        time.sleep(0.02)


async def off_loop(function: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking check in a worker thread so the test's own clients keep running."""
    return await anyio.to_thread.run_sync(function, *args)


def raw_http(server: LiveServer, head: bytes, chunks: list[bytes]) -> bytes:
    """Send a request by hand (to control framing) and read the response head."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head)
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass  # the server may close once it has answered; the answer is what counts
        answer = b""
        while b"\r\n\r\n" not in answer or not _complete(answer):
            chunk = sock.recv(65536)
            if not chunk:
                break
            answer += chunk
        return answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return len(body) >= int(value)
    return True


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


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


@pytest.fixture
def simulator() -> Iterator[Simulator]:
    server = Simulator()
    with server:
        yield server


GatewayFactory = Callable[..., LiveServer]

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]


def sdk(server: LiveServer, **kwargs: Any) -> openai.AsyncOpenAI:
    """The real `openai` SDK pointed at a gateway, with its defaults (retries included)."""
    kwargs.setdefault("api_key", "client-key")
    return openai.AsyncOpenAI(base_url=f"{server.url}/v1", **kwargs)


@pytest.fixture
def gateway(simulator: Simulator) -> Iterator[GatewayFactory]:
    """Start gateways for config dicts; `${SIM}` in strings becomes the simulator's /v1 URL."""
    started: list[LiveServer] = []

    def start(data: dict[str, Any], env: dict[str, str] | None = None) -> LiveServer:
        config = parse_config(data, env={"SIM": simulator.base_url, **(env or {})})
        server = LiveServer(create_app(config)).__enter__()
        started.append(server)
        return server

    yield start
    for server in reversed(started):
        server.__exit__(None, None, None)


def one_route(
    model: str = "m",
    *,
    target_model: str = "sim",
    budget: dict[str, float] | None = None,
    retry: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config dict with one simulator upstream and one route."""
    route: dict[str, Any] = {
        "model": model,
        "targets": [{"upstream": "sim", "model": target_model}],
    }
    if budget:
        route["budget"] = budget
    if retry:
        route["retry"] = retry
    data: dict[str, Any] = {
        "upstreams": [{"name": "sim", "base_url": "${SIM}", **(upstream or {})}],
        "routes": [route],
    }
    if server:
        data["server"] = server
    return data


class RedisServer:
    """A real `redis-server` on a free loopback port, without persistence; `stop()` and
    `start()` again on the same port play an outage."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._directory = directory
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        command += ["--save", "", "--appendonly", "no", "--dir", str(self._directory)]
        self._process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._process.poll() is None:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self._process is not None:
            self._process.kill()
            self._process.wait(timeout=10)
            self._process = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis for the test session; tests keep apart by key prefix."""
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own, for tests that stop it."""
    require_redis_server()
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()
