"""The README's code runs as written against `llm-gateway serve`'s demo.

Every fenced block of README.md is one of:
- ```python: run as a script with this Python; it must exit 0 and print something;
- ```sh / ```bash: each command (backslash continuations joined) must be a `curl` against the
  demo; it must exit 0 and print JSON, or an SSE stream whose every `data:` line is JSON or
  `[DONE]`, with no error before the first token;
- ```yaml: a whole config, which `llm-gateway check-config` must accept (every `${VAR}` it
  names gets a dummy value);
- ```text: not code;
- any block right after `<!-- readme-test: skip (why) -->`: not run, for a reason the README
  shows (set-up commands, Docker, fragments).

The snippets say http://127.0.0.1:8080, `make serve`'s address. The test does not take that
port (a developer's own `make serve` may hold it): it serves the demo on a free port and
rewrites that address in each snippet before running it, and sets LLM_GATEWAY_URL to it for
the client package.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.testing import wait_until_ready

README = Path(__file__).resolve().parents[1] / "README.md"
DEMO_ADDRESS = "http://127.0.0.1:8080"
# Variables whose value must have a shape (a URL) to pass check-config.
_DUMMIES = {"REDIS_URL": "redis://127.0.0.1:6379/0"}
SKIP_MARKER = re.compile(r"<!--\s*readme-test:\s*skip\s*\((.+)\)\s*-->")
RUNNABLE = {"python", "sh", "bash", "yaml"}
NOT_CODE = {"text"}


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    skip_reason: str | None

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language})"


def readme_blocks(text: str) -> list[Block]:
    """Every fenced block, with the skip marker that precedes it (blank lines between allowed)."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        fence = re.match(r"^(`{3,})(\S*)\s*$", lines[index])
        if fence is None:
            index += 1
            continue
        start = index
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].strip() == fence.group(1)), None
        )
        assert end is not None, f"README.md:{start + 1}: a fenced block that never closes"
        before = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = SKIP_MARKER.search(before)
        code = "\n".join(lines[start + 1 : end]) + "\n"
        reason = marker.group(1) if marker else None
        blocks.append(Block(start + 1, fence.group(2), code, reason))
        index = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
TO_RUN = [block for block in BLOCKS if block.language in RUNNABLE and block.skip_reason is None]


def test_every_block_is_run_or_skipped_visibly() -> None:
    """No block escapes silently: an untagged block or an unknown language fails here."""
    unknown = [
        str(block)
        for block in BLOCKS
        if block.skip_reason is None and block.language not in RUNNABLE | NOT_CODE
    ]
    assert not unknown, f"tag these blocks python, sh, yaml or text, or mark them: {unknown}"
    assert {block.language for block in TO_RUN} >= {"python", "sh", "yaml"}, TO_RUN


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`llm-gateway serve` with no config, in an empty directory: the demo on a free port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tmp_path_factory.mktemp("demo")
    with (directory / "serve.log").open("wb") as log:
        server = subprocess.Popen(
            [llm_gateway(), "serve", "--port", str(port)],
            cwd=directory,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_ready(f"{url}/readyz", server), (
            f"llm-gateway serve did not get ready:\n{(directory / 'serve.log').read_text()}"
        )
        yield url
    finally:
        server.terminate()
        server.wait(timeout=15)


def llm_gateway() -> str:
    command = shutil.which("llm-gateway", path=str(Path(sys.executable).parent))
    assert command is not None, "the gateway is not installed in this environment"
    return command


def snippet_env(demo_url: str) -> dict[str, str]:
    return {**os.environ, "LLM_GATEWAY_URL": f"{demo_url}/v1", "LLM_GATEWAY_API_KEY": "unused"}


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.language == "python"], ids=str)
def test_python_block_runs(block: Block, demo_url: str, tmp_path: Path) -> None:
    script = tmp_path / "snippet.py"
    script.write_text(block.code.replace(DEMO_ADDRESS, demo_url))
    run = subprocess.run(
        [sys.executable, str(script)],
        env=snippet_env(demo_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=40,
    )
    assert run.returncode == 0, f"{block} exited {run.returncode}:\n{run.stderr}"
    assert run.stdout.strip(), f"{block} printed nothing"


def shell_commands(code: str) -> list[str]:
    """The block's commands: continuation lines joined, blank lines and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line for line in joined.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.language in {"sh", "bash"}], ids=str)
def test_shell_block_runs(block: Block, demo_url: str) -> None:
    commands = shell_commands(block.code)
    assert commands, f"{block} has no command"
    for command in commands:
        assert shlex.split(command)[0] == "curl", (
            f"{block}: only curl requests run here; mark set-up blocks as skipped: {command}"
        )
        run = subprocess.run(
            ["bash", "-c", command.replace(DEMO_ADDRESS, demo_url)],
            capture_output=True,
            text=True,
            timeout=40,
        )
        assert run.returncode == 0, f"{block}: {command}\nexited {run.returncode}: {run.stderr}"
        check_answer(block, command, run.stdout)


def check_answer(block: Block, command: str, output: str) -> None:
    """A JSON answer that is not an error, or an SSE stream of JSON events whose first event is
    not an error (an error after the first token is what some demo models are for)."""
    where = f"{block}: {command}\n{output}"
    if not output.lstrip().startswith(("data:", "event:")):
        answer = json.loads(output)
        assert answer.get("error") is None, where  # a Responses answer has "error": null
        return
    payloads = [line[5:].strip() for line in output.splitlines() if line.startswith("data:")]
    events = [json.loads(payload) for payload in payloads if payload != "[DONE]"]
    assert events, where
    assert events[0].get("error") is None, where
    assert events[0].get("type") != "error", where


@pytest.mark.parametrize("block", [b for b in TO_RUN if b.language == "yaml"], ids=str)
def test_yaml_block_is_a_valid_config(block: Block, tmp_path: Path) -> None:
    config = tmp_path / "gateway.yaml"
    config.write_text(block.code)
    dummies = {
        name: _DUMMIES.get(name, f"dummy-{name.lower()}")
        for name in re.findall(r"\$\{(\w+)\}", block.code)
    }
    run = subprocess.run(
        [llm_gateway(), "check-config", str(config)],
        env={**os.environ, **dummies},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 0, f"{block} is not a valid config:\n{run.stdout}{run.stderr}"
