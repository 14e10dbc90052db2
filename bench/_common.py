"""Shared by the benchmarks: subprocess servers, /proc readings, a closed-loop load runner,
statistics, tables.

Everything binds to 127.0.0.1 only. Servers are child processes (so they do not share the
client's event loop or GIL) and are always stopped: terminate, then kill after a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import math
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
REQUEST_TIMEOUT_S = 30.0


class BenchError(Exception):
    """A benchmark cannot go on; the message says why, for a human."""


def out(text: str = "") -> None:
    """A line of the benchmark's result (stdout)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def progress(text: str) -> None:
    """A progress or error line (stderr), so stdout stays clean for --json."""
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# --- subprocess servers -------------------------------------------------------------------


def exit_on_sigterm() -> None:
    """Make SIGTERM act like Ctrl-C, so `finally` blocks still stop the child servers."""

    def handler(signum: int, frame: object) -> None:
        signal.raise_signal(signal.SIGINT)  # asyncio.run handles it: cancels, then raises

    signal.signal(signal.SIGTERM, handler)


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def cli_command() -> list[str]:
    """How to run `llm-gateway`: the venv's script next to this Python, else on PATH, else
    `python -m gateway.cli` (the same entry point)."""
    beside = Path(sys.executable).parent / "llm-gateway"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("llm-gateway")
    if found:
        return [found]
    return [sys.executable, "-m", "gateway.cli"]


@dataclass
class Server:
    """A running child server: its name (for messages), base URL, command and log file."""

    name: str
    url: str
    command: list[str]
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        tail = text.strip().splitlines()[-lines:]
        return "\n".join(f"    | {line}" for line in tail) or "    | (empty log)"

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise BenchError(
                f"the {self.name} exited during the run (code {self.process.returncode}); "
                f"its log:\n{self.log_tail()}"
            )


@dataclass(frozen=True)
class ServerSpec:
    """How to start a server and how to know it is ready: GET `url` + `ready_path` is 200."""

    name: str
    command: list[str]
    url: str
    ready_path: str


def gateway_command(*args: str) -> list[str]:
    """`llm-gateway <args>`."""
    return [*cli_command(), *args]


@contextmanager
def run_servers(specs: Sequence[ServerSpec]) -> Iterator[list[Server]]:
    """Start every server at once, yield when all answer their ready path, always stop them
    all (terminate, then kill after STOP_TIMEOUT_S). Output goes to a temporary log file per
    server, shown if one dies or never gets ready."""
    servers: list[Server] = []
    with tempfile.TemporaryDirectory(prefix="bench-servers-") as tmp:
        try:
            for i, spec in enumerate(specs):
                log_path = Path(tmp) / f"{i}-{spec.name.replace(' ', '-')}.log"
                with log_path.open("wb") as log:
                    try:
                        process = subprocess.Popen(
                            spec.command,
                            stdout=log,
                            stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL,
                        )
                    except OSError as exc:
                        raise BenchError(
                            f"cannot start the {spec.name} ({' '.join(spec.command)}): {exc}"
                        ) from exc
                servers.append(Server(spec.name, spec.url, spec.command, process, log_path))
            for spec, server in zip(specs, servers, strict=True):
                _wait_ready(server, spec.ready_path)
            try:
                yield servers
            except Exception as exc:
                dead = [s for s in servers if s.process.poll() is not None]
                if not dead:
                    raise
                s = dead[0]
                raise BenchError(
                    f"{describe_error(exc)}: the {s.name} had exited during the run "
                    f"(code {s.process.returncode}); its log:\n{s.log_tail()}"
                ) from exc
            for server in servers:
                server.check_alive()
        finally:
            for server in servers:
                stop_process(server.process)


@contextmanager
def run_server(spec: ServerSpec) -> Iterator[Server]:
    """One server, as `run_servers`."""
    with run_servers([spec]) as servers:
        yield servers[0]


def http_status(url: str, timeout: float = 1.0) -> int:
    """The status of a plain GET (raises OSError or http.client.HTTPException)."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or HOST, parts.port, timeout=timeout)
    try:
        connection.request("GET", parts.path or "/")
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def _wait_ready(server: Server, path: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise BenchError(
                f"the {server.name} exited at start-up (code {server.process.returncode}): "
                f"{' '.join(server.command)}\n{server.log_tail()}"
            )
        try:
            status = http_status(server.url + path)
            if status == 200:
                return
            last_error = f"HTTP {status}"
        except (OSError, http.client.HTTPException) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
        time.sleep(0.05)
    raise BenchError(
        f"the {server.name} did not answer GET {path} within {READY_TIMEOUT_S:.0f} s "
        f"({last_error}): {' '.join(server.command)}\n{server.log_tail()}"
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Terminate, wait up to STOP_TIMEOUT_S, then kill. Safe on an already exited process."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(STOP_TIMEOUT_S)


async def stop_async(process: asyncio.subprocess.Process) -> None:
    """`stop_process` for an asyncio child (wrk, a background load generator)."""
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)
    except TimeoutError:
        process.kill()
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT_S)


# --- a process's resources, from /proc ------------------------------------------------------

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name (which may hold spaces): field 3 onwards."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return text[text.rindex(")") + 2 :].split()


def process_tree(pid: int) -> list[int]:
    """`pid` and its live descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                parent = int(_stat_fields(int(entry))[1])
            except (OSError, ValueError, IndexError):
                continue  # gone meanwhile
            children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo += children.get(current, [])
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` and its live descendants (/proc/<pid>/stat)."""
    total = 0
    for member in process_tree(pid):
        try:
            fields = _stat_fields(member)
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / CLOCK_TICKS


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of `pid` alone: one read of /proc/<pid>/stat."""
    fields = _stat_fields(pid)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    """VmRSS of one process (/proc/<pid>/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise BenchError(f"no VmRSS in /proc/{pid}/status")


def open_fds(pid: int) -> int:
    """Open file descriptors of one process (/proc/<pid>/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def fd_limit(pid: int) -> int:
    """The soft open-files limit of a process (/proc/<pid>/limits)."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            value = line.split()[3]
            return 1 << 62 if value == "unlimited" else int(value)
    raise BenchError(f"no open-files limit in /proc/{pid}/limits")


# --- load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One request: total latency, time to the first body chunk, body chunks and bytes."""

    latency_s: float
    ttfb_s: float
    chunks: int
    nbytes: int


@dataclass
class Round:
    """One closed-loop round: `requests` requests by `concurrency` workers."""

    elapsed_s: float
    samples: list[Sample]

    @property
    def rps(self) -> float:
        return len(self.samples) / self.elapsed_s

    @property
    def chunks_per_s(self) -> float:
        return sum(s.chunks for s in self.samples) / self.elapsed_s


async def run_round(requests: int, concurrency: int, one: Callable[[], Awaitable[Sample]]) -> Round:
    """Run `requests` calls of `one` with `concurrency` workers, each starting its next request
    as soon as its last one ends. The first failure cancels the round and propagates."""
    samples: list[Sample] = []
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            samples.append(await one())

    start = time.perf_counter()
    async with asyncio.TaskGroup() as group:
        for _ in range(min(concurrency, requests)):
            group.create_task(worker())
    return Round(elapsed_s=time.perf_counter() - start, samples=samples)


def describe_error(exc: BaseException) -> str:
    """`Type: message` of the first leaf of an ExceptionGroup (as TaskGroup raises), else of
    `exc`; a BenchError's message alone, as it is written for a human."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    if isinstance(exc, BenchError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}" if str(exc) else f"{type(exc).__name__} (no message)"


# --- statistics ---------------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Series:
    """Per-round values of one metric, with the statistics the reports use."""

    values: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    @property
    def spread(self) -> float:
        """(max - min) / median: how much the rounds disagree, as a fraction."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def as_dict(self) -> dict[str, float | list[float]]:
        return {
            "median": self.median,
            "min": self.low,
            "max": self.high,
            "spread": self.spread,
            "rounds": self.values,
        }


@dataclass(frozen=True)
class Verdict:
    """Whether paired per-round ratios B/A show a real difference from 1."""

    significant: bool
    reason: str


MIN_ROUNDS_TO_JUDGE = 5  # by chance alone, n rounds all agree with probability 2 ** (1 - n)


def judge_ratios(ratios: Sequence[float]) -> Verdict:
    """Significant only if there are at least MIN_ROUNDS_TO_JUDGE rounds, every round agrees on
    the direction, AND the mean ratio is more than two standard errors from 1. Otherwise the
    difference is within the round-to-round noise."""
    n = len(ratios)
    if n < 2:
        return Verdict(False, "one round only: no estimate of noise")
    mean = statistics.fmean(ratios)
    stderr = statistics.stdev(ratios) / math.sqrt(n)
    same_side = all(r > 1 for r in ratios) or all(r < 1 for r in ratios)
    far = abs(mean - 1) > 2 * stderr
    detail = (
        f"mean {mean:.3f} +/- {2 * stderr:.3f} (2 s.e.), "
        f"rounds {min(ratios):.3f}..{max(ratios):.3f}"
    )
    if n < MIN_ROUNDS_TO_JUDGE:
        return Verdict(False, f"too few rounds to judge (need {MIN_ROUNDS_TO_JUDGE}); {detail}")
    if same_side and far:
        return Verdict(True, f"every round agrees; {detail}")
    why = "rounds disagree on the direction" if not same_side else "difference < 2 s.e."
    return Verdict(False, f"within noise: {why}; {detail}")


# --- interleaved comparison ---------------------------------------------------------------


@dataclass
class VariantResult:
    """The measured rounds of one variant (a client library, or a path to the simulator)."""

    rounds: list[Round] = field(default_factory=list)

    @property
    def samples(self) -> list[Sample]:
        return [s for r in self.rounds for s in r.samples]

    def rps(self) -> Series:
        return Series([r.rps for r in self.rounds])

    def chunks_per_s(self) -> Series:
        return Series([r.chunks_per_s for r in self.rounds])

    def chunks_per_request(self) -> float:
        samples = self.samples
        return sum(s.chunks for s in samples) / len(samples)

    def latency_ms(self, p: float) -> float:
        """Percentile `p` of every measured request's latency, all rounds pooled."""
        return 1000 * percentile([s.latency_s for s in self.samples], p)

    def ttfb_ms(self, p: float) -> float:
        return 1000 * percentile([s.ttfb_s for s in self.samples], p)

    def summary(self, stream: bool) -> dict[str, Any]:
        result: dict[str, Any] = {
            "requests": len(self.samples),
            "rps": self.rps().as_dict(),
            "p50_ms": self.latency_ms(50),
            "p99_ms": self.latency_ms(99),
        }
        if stream:
            result["ttfb_p50_ms"] = self.ttfb_ms(50)
            result["chunks_per_s"] = self.chunks_per_s().as_dict()
            result["chunks_per_request"] = self.chunks_per_request()
        return result


@dataclass
class Comparison:
    """Two variants measured in interleaved rounds: `candidate` relative to `baseline`."""

    name: str
    stream: bool
    baseline: str
    candidate: str
    results: dict[str, VariantResult]

    @property
    def base(self) -> VariantResult:
        return self.results[self.baseline]

    @property
    def cand(self) -> VariantResult:
        return self.results[self.candidate]

    def paired_rps(self) -> list[float]:
        """candidate/baseline req/s, round by round (the two ran back to back)."""
        pairs = zip(self.base.rounds, self.cand.rounds, strict=True)
        return [c.rps / b.rps for b, c in pairs]

    def paired_chunks(self) -> list[float]:
        pairs = zip(self.base.rounds, self.cand.rounds, strict=True)
        return [c.chunks_per_s / b.chunks_per_s for b, c in pairs]

    def rps_ratio(self) -> float:
        return Series(self.paired_rps()).median

    def verdict(self) -> Verdict:
        return judge_ratios(self.paired_rps())


async def compare(
    name: str,
    calls: Mapping[str, Callable[[], Awaitable[Sample]]],
    *,
    stream: bool,
    requests: int,
    concurrency: int,
    rounds: int,
) -> Comparison:
    """Warm up each of the two variants in `calls` (baseline first), then run `rounds` rounds
    of each, interleaved and alternating who goes first (A B, B A, A B, ...), so that drift in
    the machine's load falls on both alike."""
    variants = list(calls)
    if len(variants) != 2:
        raise ValueError("compare() takes exactly two variants")
    for variant in variants:  # open the connections, warm the code paths
        await run_round(max(2 * concurrency, 20), concurrency, calls[variant])
    results = {variant: VariantResult() for variant in variants}
    for i in range(rounds):
        for variant in variants if i % 2 == 0 else variants[::-1]:
            results[variant].rounds.append(await run_round(requests, concurrency, calls[variant]))
        progress(f"  {name}: round {i + 1}/{rounds} done")
    return Comparison(name, stream, variants[0], variants[1], results)


# --- output and arguments -----------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def parse_args(
    prog: str,
    description: str,
    *,
    requests: int,
    concurrency: int,
    rounds: int,
    argv: list[str] | None,
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument(
        "--requests", type=int, default=requests, help=f"requests per round (default {requests})"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=concurrency,
        help=f"requests in flight at once (default {concurrency})",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"measured rounds per variant and mode, interleaved (default {rounds})",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    for name in ("requests", "concurrency", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def machine() -> dict[str, object]:
    """What the numbers were measured on."""
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "loadavg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d"),
    }
