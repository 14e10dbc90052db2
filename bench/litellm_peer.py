"""LiteLLM's proxy as the Python peer, for `python -m bench.suite --litellm` (opt-in: heavy).

The bench installs it, pinned, into a venv of its own (LITELLM_VENV, default
~/.cache/llm-gateway-bench/litellm-<version>), never into the project's; the first run
downloads it (a few minutes), later runs reuse it. One worker, in front of the same fast
upstream as the gateway, with the same model names as the gateway's proxy-path routes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from bench._common import HOST, BenchError, ServerSpec, free_port, progress

VERSION = "1.108.7"  # the version the comparison was made with
INSTALL_TIMEOUT_S = 1200


def venv_dir() -> Path:
    default = Path.home() / ".cache" / "llm-gateway-bench" / f"litellm-{VERSION}"
    return Path(os.environ.get("LITELLM_VENV", default))


def ensure_installed() -> Path:
    """The `litellm` command of the pinned version, installed into its venv if need be; a
    BenchError that says why if it cannot be."""
    venv = venv_dir()
    command = venv / "bin" / "litellm"
    python = venv / "bin" / "python"
    if command.exists() and _installed_version(python) == VERSION:
        return command
    progress(f"installing litellm[proxy]=={VERSION} into {venv} (once; a few minutes) ...")
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        done = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"litellm[proxy]=={VERSION}"],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise BenchError(f"--litellm: cannot install litellm[proxy]=={VERSION}: {exc}") from exc
    if done.returncode != 0 or not command.exists():
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise BenchError(
            f"--litellm: `pip install litellm[proxy]=={VERSION}` into {venv} failed "
            f"(code {done.returncode}); the peer cannot run here:\n  " + "\n  ".join(tail)
        )
    return command


def _installed_version(python: Path) -> str | None:
    if not python.exists():
        return None
    done = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout.strip() or None


def server(tmp: Path, upstream_url: str, models: dict[str, str]) -> ServerSpec:
    """LiteLLM's proxy, one worker, each of `models` (its name -> the upstream's model) sent
    to the upstream as an OpenAI-compatible model."""
    command = ensure_installed()
    config = {
        "model_list": [
            {
                "model_name": name,
                "litellm_params": {
                    "model": f"openai/{target}",
                    "api_base": f"{upstream_url}/v1",
                    "api_key": "bench",
                },
            }
            for name, target in models.items()
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        # Loopback only, no keys: as the gateway is run in the bench (no auth).
        "general_settings": {"dangerously_permit_weak_or_unset_master_key": True},
    }
    path = tmp / "litellm.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    port = free_port()
    argv = [str(command), "--config", str(path), "--host", HOST, "--port", str(port)]
    argv += ["--num_workers", "1"]
    return ServerSpec(f"LiteLLM {VERSION}", argv, f"http://{HOST}:{port}", "/health/liveliness")
