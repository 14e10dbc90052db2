"""The examples in `examples/`, run as scripts against `llm-gateway serve` (the built-in demo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
FALLBACK = "Error: Downstream AI orchestration exceeded its execution time budget."


def run_all(demo_url: str, script: str, *variants: list[str]) -> list[tuple[str, float]]:
    """Run the script once per argument list, all at once (their waits overlap); return each
    one's output and the seconds it reported."""
    env = {**os.environ, "LLM_GATEWAY_URL": demo_url}
    runs = [
        subprocess.Popen(
            [sys.executable, str(EXAMPLES / script), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in variants
    ]
    outputs = []
    for args, run in zip(variants, runs, strict=True):
        stdout, stderr = run.communicate(timeout=30)
        assert run.returncode == 0, f"{script} {args}: {stderr}"
        outputs.append(stdout)
    return [(output, reported_seconds(output)) for output in outputs]


def reported_seconds(output: str) -> float:
    last = output.strip().splitlines()[-1]
    return float(last.split(" s")[0].split()[-1].strip("("))


def test_financial_analyzer(demo_url: str) -> None:
    (batch, batch_s), (stream, stream_s) = run_all(
        demo_url,
        "financial_analyzer.py",
        ["--chunks", "6", "--stragglers", "2", "--budget", "1.5"],
        ["--chunks", "4", "--stragglers", "1", "--budget", "1.5", "--stream"],
    )
    assert batch.count(": ok: tok0") == 4
    assert batch.count("cut off at the deadline") == 2
    assert "4 of 6 chunks analysed" in batch
    lines = stream.splitlines()
    assert all(": ok: tok0" in line for line in lines[:3])
    assert "chunk 3: cut off at the deadline" in lines[3]
    assert "3 of 4 chunks analysed" in stream
    # The batch keeps its budget (test_client_budget holds the helpers to 50 ms; the scripts run
    # two at once, each collecting its own garbage, hence the wider bound here).
    assert 1.5 - 0.1 < batch_s < 1.5 + 0.1
    assert 1.5 - 0.1 < stream_s < 1.5 + 0.1


def test_orchestration(demo_url: str) -> None:
    runs = run_all(
        demo_url,
        "orchestration.py",
        [],
        ["--model", "demo-hang", "--budget", "1"],
        ["--model", "demo-hang", "--budget", "1", "--sync"],
        ["--db-delay", "5", "--budget", "1"],
        ["--model", "demo-stall", "--stream", "--budget", "10"],
    )
    (answer, _), (hung, hung_s), (hung_sync, hung_sync_s), (stalled_db, db_s), (stall, _) = runs
    assert answer.startswith("tok0 tok1")
    for output, seconds in [(hung, hung_s), (hung_sync, hung_sync_s), (stalled_db, db_s)]:
        assert output.startswith(FALLBACK)
        assert seconds < 1 + 1.0
    assert stall.startswith("tok0 tok1 tok2")
    assert "the stream ended early: upstream_idle_timeout" in stall
