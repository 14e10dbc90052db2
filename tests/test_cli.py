"""The `llm-gateway` command: check-config output and exit codes, and `serve` as a user runs it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2 as httpx
import openai
import pytest

from gateway.cli import main
from gateway.testing import wait_until_ready
from tests.conftest import CHAT, Simulator

VALID = """
upstreams:
  - name: primary
    base_url: http://127.0.0.1:9/v1/
    api_key: ${CLI_TEST_KEY}
routes:
  - model: gpt-x
    targets:
      - {upstream: primary, model: real-model}
    budget: {total_s: 20, ttft_s: 8}
"""

INVALID = """
upstreams:
  - name: primary
    base_url: ftp://nowhere
    max_conns: 3
routes:
  - model: gpt-x
    targets:
      - {upstream: missing}
    budget: {total_s: 5, ttft_s: 9}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    return path


def test_check_config_prints_resolved_routes_with_secrets_masked(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CLI_TEST_KEY", "sk-very-secret")
    assert main(["check-config", str(write(tmp_path, VALID))]) == 0
    out = capsys.readouterr().out
    assert "gpt-x" in out
    assert "real-model" in out
    assert "http://127.0.0.1:9/v1" in out
    assert "sk-very-secret" not in out


def test_check_config_lists_every_error_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", str(write(tmp_path, INVALID))]) == 1
    err = capsys.readouterr().err
    for path in (
        "upstreams[0].base_url:",
        "upstreams[0].max_conns:",
        "routes[0].targets[0].upstream:",
        "routes[0].budget.ttft_s:",
    ):
        assert path in err, err


def test_check_config_names_a_missing_variable_without_leaking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CLI_TEST_KEY", raising=False)
    assert main(["check-config", str(write(tmp_path, VALID))]) == 1
    assert "upstreams[0].api_key: environment variable CLI_TEST_KEY" in capsys.readouterr().err


def test_check_config_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check-config", str(tmp_path / "nope.yaml")]) == 1
    assert "not found" in capsys.readouterr().err


# --- serve, as a process ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@dataclass
class Served:
    url: str
    process: subprocess.Popen[bytes]
    log: Path  # where its output goes, readable while it runs

    @property
    def output(self) -> str:
        """Everything the process printed so far (all of it, once it has stopped)."""
        return self.log.read_text(errors="replace")

    def debug_config(self) -> dict[str, Any]:
        answer: dict[str, Any] = httpx.get(f"{self.url}/debug/config", timeout=5).json()
        return answer

    def wait_generation(self, number: int, within_s: float = 10.0) -> dict[str, Any]:
        """/debug/config once the config generation `number` is loaded."""
        deadline = time.monotonic() + within_s
        while (state := self.debug_config())["generation"] != number:
            if time.monotonic() > deadline:
                raise AssertionError(f"never reached generation {number}: {state}")
            time.sleep(0.05)
        return state


def start_cli(args: list[str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
    """`llm-gateway ARGS...` as a real process, its output going to `log`."""
    with log.open("wb") as sink:
        return subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", *args],
            cwd=cwd,
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=os.environ.copy(),
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM, then SIGKILL if it has not ended within 15 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def serving(args: list[str], cwd: Path) -> Iterator[Served]:
    """Run `llm-gateway serve ...`; yield it once /readyz says so; stop it after."""
    port = free_port()
    log = cwd / f"serve-{port}.log"
    process = start_cli(["serve", "--port", str(port), *args], log, cwd)
    served = Served(url=f"http://127.0.0.1:{port}", process=process, log=log)
    try:
        if not wait_until_ready(f"{served.url}/readyz", process):
            if process.poll() is None:
                raise AssertionError(f"serve never became ready:\n{served.output}")
            raise AssertionError(f"serve exited with {process.returncode}:\n{served.output}")
        yield served
    finally:
        stop_process(process)


def test_serve_without_config_runs_the_demo(tmp_path: Path) -> None:
    with serving([], cwd=tmp_path) as served:
        url = served.url
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="any")
        completion = client.chat.completions.create(model="demo", messages=CHAT)
        assert completion.choices[0].message.content
        models = {model.id for model in client.models.list()}
        assert {"demo", "demo-stall", "demo-hang"} <= models
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:
            client.chat.completions.create(model="demo-hang", messages=CHAT)
        assert caught.value.status_code == 504
        assert time.monotonic() - started < 3 + 2  # the demo route's total_s, with slack
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as caught:  # the README's table, not streaming
            client.chat.completions.create(model="demo-stall", messages=CHAT)
        assert caught.value.code == "upstream_idle_timeout"
        assert time.monotonic() - started < 2 + 2
        client.close()
    # The fast loop and parser are installed with the gateway, used, and named at start-up.
    assert "serving with event loop uvloop and HTTP parser httptools" in served.output


def test_serve_with_a_config_file_and_two_workers(tmp_path: Path, simulator: Simulator) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text(
        f"upstreams: [{{name: sim, base_url: '{simulator.base_url}'}}]\n"
        "routes: [{model: m, targets: [{upstream: sim, model: sim@tokens=2}]}]\n"
    )
    args = ["--config", str(config), "--workers", "2", "--log-level", "warning"]
    with serving(args, cwd=tmp_path) as served:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="any")
        for _ in range(4):
            assert client.chat.completions.create(model="m", messages=CHAT).choices
        client.close()
    assert simulator.stats()["completed"] == 4
    assert "gateway.access" not in served.output  # the workers kept the chosen log level


def test_serve_logs_one_access_line_per_request(tmp_path: Path, simulator: Simulator) -> None:
    config = tmp_path / "custom.yaml"
    config.write_text(
        f"upstreams: [{{name: sim, base_url: '{simulator.base_url}'}}]\n"
        "routes: [{model: m, targets: [{upstream: sim}]}]\n"
    )
    with serving(["--config", str(config), "--workers", "2"], cwd=tmp_path) as served:
        client = openai.OpenAI(base_url=f"{served.url}/v1", api_key="any")
        client.chat.completions.create(model="m", messages=CHAT)
        client.close()
    assert served.output.count("gateway.access") == 1
    assert "outcome=ok" in served.output


def test_serve_refuses_a_bad_config_before_starting(tmp_path: Path) -> None:
    config = write(tmp_path, INVALID)
    result = subprocess.run(
        [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert "routes[0].targets[0].upstream:" in result.stderr


def _cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=cwd,
    )


def test_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("llm-gateway ")


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["serve", "--workers", "0"], "--workers: must be a positive integer"),
        (["serve", "--port", "70000"], "--port: must be a port from 1 to 65535"),
        (["serve", "--log-level", "loud"], "--log-level: invalid choice"),
        (["serve", "--config", "no-such.yaml"], "no-such.yaml"),
    ],
)
def test_bad_options_are_one_clear_line(tmp_path: Path, args: list[str], says: str) -> None:
    result = _cli(*args, cwd=tmp_path)
    assert result.returncode != 0
    assert says in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_a_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _cli("serve", "--port", str(port), cwd=tmp_path)
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_help_shows_the_defaults() -> None:
    result = _cli("serve", "--help")
    assert "(default: 8080)" in result.stdout
    assert "(default: 1)" in result.stdout


@pytest.mark.parametrize("command", ["serve", "simulate"])
def test_help_shows_each_default_once(command: str) -> None:
    result = _cli(command, "--help")
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for line in result.stdout.splitlines():
        assert line.count("(default:") <= 1, line
    assert "(default: None)" not in text
    assert "(default: False)" not in text  # a flag has no default worth a word
    if command == "serve":
        assert "(default: ./gateway.yaml if present, else the built-in demo)" in text
        assert "text or json (default: server.log_format)" in text
        # --config, --host, --port, --workers, --log-level, --log-format
        assert text.count("(default: ") == 6


def test_check_config_into_a_pipe_closed_early(tmp_path: Path) -> None:
    """`llm-gateway check-config FILE | head -3` on a config whose description is far longer
    than a pipe holds: head exits after three lines, and the rest is dropped quietly."""
    routes = "".join(
        f"  - model: gpt-{i}\n    targets:\n      - {{upstream: primary, model: m-{i}}}\n"
        for i in range(1000)
    )
    upstreams = VALID.split("routes:")[0].replace("${CLI_TEST_KEY}", "k")
    config = write(tmp_path, f"{upstreams}routes:\n{routes}")
    errors = tmp_path / "stderr"
    with errors.open("wb") as stderr:
        check = subprocess.Popen(
            [sys.executable, "-m", "gateway.cli", "check-config", str(config)],
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    assert check.stdout is not None
    head = subprocess.Popen(["head", "-3"], stdin=check.stdout, stdout=subprocess.PIPE)
    check.stdout.close()  # head holds the only reading end: when it exits, the pipe closes
    out, _ = head.communicate(timeout=30)
    assert check.wait(timeout=30) == 0  # the config is valid; the reader left early
    assert errors.read_text() == ""
    assert out.decode().splitlines()[0].startswith("server: ")
    assert len(out.splitlines()) == 3
