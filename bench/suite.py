"""The gateway's performance against a direct connection and nginx, in one run.

    python -m bench.suite [--smoke] [--json FILE]

Child processes, all on 127.0.0.1: `bench.fast_upstream` (the upstream; its own req/s is
measured and must be far above the gateway's), nginx proxying to it (the reference "proxy
doing almost nothing"), and the gateway (`llm-gateway serve`, `--workers 1` and `--workers
2`, and `--workers 1` without metrics and with its cap shared through a redis-server on
loopback: "gateway w1 shared", in the throughput, latency and streaming runs, its Redis calls
per request read from its metrics). Load comes from wrk (closed loop, max throughput) and
from `bench.loadgen` (open loop, paced, latency counted from each request's scheduled time).
Sections:

    throughput   wrk req/s at concurrency 1, 16, 64: direct, nginx, gateway w1, w2;
                 gateway CPU per request (/proc utime+stime of its process tree) at c=16
    latency      paced 100, 500, 1000 req/s: p50/p99 direct, added by nginx and gateway w1
    streaming    50 events 1 ms apart: added TTFT and total (paced), CPU per relayed event
                 (wrk c=16)
    deadline     bench-hang (total_s 0.5) paced while healthy requests run: lateness
    stalls       1,000 / 5,000 / 10,000 streams stalled at once in a fresh gateway w1: RSS and
                 file descriptors per stream, lateness past idle_s, healthy requests' p99

Then the issue's targets, met or not. Targets are reported, never asserted: the exit code is 0
unless the harness breaks (a server that does not start, a wrong answer such as a non-200 for
`bench` or a stream without [DONE]): then 1, after printing and writing what was measured;
130 on Ctrl-C or SIGTERM. `--smoke` runs the same code with tiny counts (well under a minute)
so that CI keeps the harness working; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.metadata
import json
import math
import os
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import uvloop
import yaml

from bench import litellm_peer
from bench._common import (
    HOST,
    BenchError,
    Server,
    ServerSpec,
    cpu_seconds,
    describe_error,
    exit_on_sigterm,
    fd_limit,
    free_port,
    gateway_command,
    machine,
    open_fds,
    out,
    process_cpu_seconds,
    progress,
    rss_bytes,
    run_servers,
    stop_async,
    stop_process,
    table,
)
from bench.loadgen import (
    Result,
    Target,
    chat_body,
    closed_loop,
    ms_stats,
    open_stream,
    paced,
    summary,
)

# What the upstream does, by model name (see bench/fast_upstream.py), and the gateway's routes.
STREAM_EVENTS, STREAM_GAP_MS = 50, 1
FAST, STREAM = "fast", f"stream-{STREAM_EVENTS}x{STREAM_GAP_MS}ms"
STALL, HANG = "stall-1000ms", "hang"
IDLE_S, TTFT_S, STALL_TOTAL_S = 2.0, 5.0, 60.0
HANG_TOTAL_S, MARGIN_S = 0.5, 0.05  # the gateway answers 504 at total_s - margin_s
# LLM-shaped traffic: answers of 100 tokens 20 ms apart (50 tokens/s), and short answers of 12.
LLM_EVENTS, LLM_GAP_MS = 100, 20
LLM = f"stream-{LLM_EVENTS}x{LLM_GAP_MS}ms"
ANSWER_EVENTS = 12
ANSWER = f"stream-{ANSWER_EVENTS}x1ms"
EXPIRY_SPREAD_MS = 500  # the stalled streams' last content events, spread over this
ROUTES: dict[str, tuple[str, dict[str, float] | None]] = {
    "bench": (FAST, None),
    "bench-stream": (STREAM, None),
    "bench-stall": (STALL, {"idle_s": IDLE_S, "ttft_s": TTFT_S, "total_s": STALL_TOTAL_S}),
    "bench-hang": (HANG, {"total_s": HANG_TOTAL_S}),
    "llm": (LLM, None),
    "answer": (ANSWER, None),
    "answer-optout": (ANSWER, None),
}
# Routes on the defaults a user has: a non-streaming call is streamed upstream and assembled.
# The others are `upstream_stream: false` (the opt-out), as the proxy-path sections measure it.
DEFAULT_ROUTES = frozenset({"llm", "answer"})
CPU_CONCURRENCY = 16
STALL_TARGET = 10_000
STALL_WINDOW = 1000  # streams opened but not yet at the upstream (the gateway's backlog: 2048)
RELEASE_AFTER_S = TTFT_S - 1.5  # release held stalls before the first ones hit ttft_s
RAMP_LIMIT_S = 60.0  # opening the streams stops here, whatever is left
FD_RESERVE = 300  # descriptors kept free in the gateway beside the stalled streams' two each
WANTED_NOFILE = 200_000


@dataclass(frozen=True)
class Params:
    smoke: bool
    wrk_s: int  # one wrk run (wrk's unit is whole seconds)
    rounds: int  # wrk runs per (target, concurrency), interleaved
    concurrencies: tuple[int, ...]
    rates: tuple[float, ...]  # paced non-streaming
    paced_s: float  # one paced run
    stream_rate: float
    healthy_rate: float  # the healthy load beside hangs and stalls
    healthy_s: float  # the healthy load's baseline run, and the deadline run
    hang_rate: float
    stall_sizes: tuple[int, ...]
    warmup: int  # closed-loop requests per target before measuring
    llm_streams: int  # concurrent LLM-shaped streams (and assembled answers)
    llm_ramp_s: float  # they are opened over this


FULL = Params(
    smoke=False,
    wrk_s=3,
    rounds=3,
    concurrencies=(1, 16, 64),
    rates=(100, 500, 1000),
    paced_s=10.0,
    stream_rate=50,
    healthy_rate=200,
    healthy_s=10.0,
    hang_rate=10,
    stall_sizes=(1000, 5000, STALL_TARGET),
    warmup=500,
    llm_streams=1000,
    llm_ramp_s=3.0,
)
SMOKE = Params(
    smoke=True,
    wrk_s=1,
    rounds=1,
    concurrencies=(1, 16, 64),
    rates=(20, 50),
    paced_s=1.0,
    stream_rate=20,
    healthy_rate=20,
    healthy_s=1.5,
    hang_rate=5,
    stall_sizes=(50,),
    warmup=50,
    llm_streams=20,
    llm_ramp_s=0.3,
)


@dataclass(frozen=True)
class Via:
    """A way to the upstream: direct, nginx, or a gateway (whose process tree is `pid`)."""

    name: str
    url: str  # .../v1/chat/completions
    fast_model: str
    stream_model: str
    pid: int | None = None

    def body(self, stream: bool) -> bytes:
        return chat_body(self.stream_model if stream else self.fast_model, stream=stream)


@dataclass
class Run:
    """Everything one run gathers; `problems` are wrong answers (the exit code is then 1)."""

    params: Params
    litellm: bool = False  # the peer, opt-in
    data: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        progress(f"  PROBLEM: {text}")
        self.problems.append(text)


# --- set-up ------------------------------------------------------------------------------


def tool(name: str) -> str:
    """The path of wrk or nginx (nginx is in /usr/sbin, often not on a user's PATH)."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")
    if path is None:
        package = "nginx-light (or nginx)" if name == "nginx" else name
        raise BenchError(f"{name} is not installed (Debian/Ubuntu: apt-get install {package})")
    return path


def require_tools() -> dict[str, str]:
    """wrk, nginx and redis-server, with their versions; a clear error if one is missing."""
    versions = {}
    for name in ("wrk", "nginx", "redis-server"):
        done = subprocess.run([tool(name), "-v"], capture_output=True, text=True, timeout=10)
        text = (done.stdout + done.stderr).strip().splitlines()
        versions[name] = text[0] if text else "?"
    return versions


def raise_fd_limit() -> dict[str, Any]:
    """Raise this process's open-files limit (children inherit it): the hard limit too if
    allowed (root with CAP_SYS_RESOURCE), else the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    note = ""
    if hard != resource.RLIM_INFINITY and hard < WANTED_NOFILE:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (WANTED_NOFILE, WANTED_NOFILE))
        except (ValueError, OSError) as exc:
            note = f"cannot raise the hard limit {hard} to {WANTED_NOFILE}: {exc}"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return {"soft": soft, "hard": hard, "note": note}


def gateway_config(upstream_url: str) -> dict[str, Any]:
    """Healthy routes on one upstream entry, the stalling and hanging ones on another (the
    same server): outlier ejection would rightly eject an upstream that stalls thousands of
    streams, and the healthy requests measured beside them must not be caught by it."""
    routes = []
    for model, (target, budget) in ROUTES.items():
        upstream = "faulty" if model in ("bench-stall", "bench-hang") else "fast"
        route: dict[str, Any] = {
            "model": model,
            "targets": [{"upstream": upstream, "model": target}],
        }
        if budget is not None:
            route["budget"] = budget
        # The proxy-path routes opt out of assembling (the sections measuring them say so);
        # the LLM-shaped ones keep the default.
        if model not in DEFAULT_ROUTES:
            route["upstream_stream"] = False
        routes.append(route)
    common = {"base_url": f"{upstream_url}/v1", "max_connections": 20000, "max_pending": 20000}
    upstreams = [
        {"name": "fast", **common},
        {"name": "faulty", **common, "outlier": {"consecutive_failures": 1_000_000}},
    ]
    return {"upstreams": upstreams, "routes": routes}


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    upstream fast {{
        server {host}:{upstream_port};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
        }}
    }}
}}
"""


@dataclass
class Setup:
    tmp: Path
    upstream_port: int = 0

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}"

    def upstream(self) -> ServerSpec:
        self.upstream_port = free_port()
        command = [sys.executable, "-m", "bench.fast_upstream", "--port", str(self.upstream_port)]
        return ServerSpec("fast upstream", command, self.upstream_url, "/healthz")

    def nginx(self) -> ServerSpec:
        port = free_port()
        conf = self.tmp / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(tmp=self.tmp, host=HOST, port=port, upstream_port=self.upstream_port)
        )
        command = [
            tool("nginx"),
            "-e",
            str(self.tmp / "error.log"),
            "-p",
            str(self.tmp),
            "-c",
            str(conf),
        ]
        return ServerSpec("nginx", command, f"http://{HOST}:{port}", "/healthz")

    def gateway(
        self, workers: int, *, metrics: bool = True, redis_url: str | None = None
    ) -> ServerSpec:
        """The gateway; without metrics too, so their cost per request is measured, and with
        its cap shared through Redis (never full here: what is measured is the round trips)."""
        kind = "shared" if redis_url else "metrics" if metrics else "bare"
        config = self.tmp / f"gateway-{kind}.yaml"
        data = gateway_config(self.upstream_url)
        data["server"] = {"metrics": metrics}
        if redis_url:
            data["shared"] = {"redis_url": redis_url, "key_prefix": "bench:"}
        config.write_text(yaml.safe_dump(data, sort_keys=False))
        port = free_port()
        command = gateway_command(
            "serve",
            "--config",
            str(config),
            "--port",
            str(port),
            "--workers",
            str(workers),
            "--log-level",
            "warning",
        )
        name = f"gateway w{workers}" + ("" if metrics else " no-metrics")
        name += " shared" if redis_url else ""
        return ServerSpec(name, command, f"http://{HOST}:{port}", "/readyz")


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[str]:
    """A redis-server on loopback without persistence, for the shared cap; its URL."""
    port = free_port()
    command = [tool("redis-server"), "--port", str(port), "--bind", HOST]
    command += ["--save", "", "--appendonly", "no", "--dir", str(tmp)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection((HOST, port), 1) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise BenchError(f"redis-server did not start on port {port}")
            time.sleep(0.05)
        yield f"redis://{HOST}:{port}/0"
    finally:
        stop_process(process)


def via_direct(upstream: Server) -> Via:
    return Via("direct", f"{upstream.url}/v1/chat/completions", FAST, STREAM)


def via_proxy(server: Server, gateway: bool) -> Via:
    url = f"{server.url}/v1/chat/completions"
    if gateway:
        return Via(server.name, url, "bench", "bench-stream", server.pid)
    return Via(server.name, url, FAST, STREAM)


# --- checks and warm-up --------------------------------------------------------------------


def check_answer(result: Result, *, stream: bool, events: int = STREAM_EVENTS) -> str:
    """Why a normal answer is wrong ('' when it is right)."""
    if result.failure:
        return result.failure
    if result.status != 200:
        return f"HTTP {result.status}: {result.body[:200]!r}"
    if not stream:
        return (
            ""
            if b'"chat.completion"' in result.body
            else f"not a chat.completion: {result.body[:200]!r}"
        )
    if not result.done_seen:
        return f"stream without data: [DONE] ({result.events} events, error {result.error_event!r})"
    if result.events != events + 1:  # the content events and the finish_reason chunk
        return f"{result.events} data events, not {events} and the finish chunk"
    return ""


def tally(
    run: Run, what: str, results: list[Result], *, stream: bool, events: int = STREAM_EVENTS
) -> None:
    """Count wrong answers among `results` as problems (one line per kind)."""
    counts: dict[str, int] = {}
    for result in results:
        why = check_answer(result, stream=stream, events=events)
        if why:
            counts[why[:120]] = counts.get(why[:120], 0) + 1
    for why, n in counts.items():
        run.problem(f"{what}: {n} of {len(results)} answers wrong: {why}")


async def warm_up(run: Run, vias: list[Via], targets: dict[str, Target]) -> None:
    """Check one answer of each kind per path (a wrong one stops the run), then warm up."""
    for via in vias:
        target = targets[via.name]
        for stream in (False, True):
            results = await closed_loop(
                target, target.request(via.body(stream)), count=1, concurrency=1, stream=stream
            )
            why = check_answer(results[0], stream=stream)
            if why:
                kind = "streaming" if stream else "non-streaming"
                raise BenchError(f"{via.name}: a {kind} request got a wrong answer: {why}")
        request = target.request(via.body(False))
        results = await closed_loop(target, request, count=run.params.warmup, concurrency=16)
        tally(run, f"warm-up via {via.name}", results, stream=False)


# --- wrk ---------------------------------------------------------------------------------

WRK_LUA = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRK_JSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"bytes\\": %d, "
    .. "\\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, \\"status\\": %d, "
    .. "\\"timeout\\": %d, \\"p50_us\\": %.1f, \\"p99_us\\": %.1f, \\"max_us\\": %.1f}}\\n",
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status,
    e.timeout, latency:percentile(50), latency:percentile(99), latency.max))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: dict[str, int]
    cpu_s: float | None  # the gateway's CPU during the run, if measured


async def run_wrk(
    run: Run, tmp: Path, via: Via, *, stream: bool, concurrency: int, cpu: bool
) -> WrkResult:
    """One wrk run (1 thread, `concurrency` connections), the gateway's CPU around it."""
    script = tmp / f"wrk-{via.name.replace(' ', '-')}-{'stream' if stream else 'whole'}.lua"
    if not script.exists():
        script.write_text(WRK_LUA.format(body=via.body(stream).decode()))
    seconds = run.params.wrk_s
    command = [
        tool("wrk"),
        "-t1",
        f"-c{concurrency}",
        f"-d{seconds}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        via.url,
    ]
    cpu_before = cpu_seconds(via.pid) if cpu and via.pid else None
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), seconds + 30)
    finally:
        await stop_async(process)
    cpu_used = cpu_seconds(via.pid) - cpu_before if cpu_before is not None and via.pid else None
    lines = [line for line in stdout.decode().splitlines() if line.startswith("WRK_JSON ")]
    if process.returncode != 0 or not lines:
        raise BenchError(
            f"wrk failed (code {process.returncode}): {' '.join(command)}\n"
            f"{stdout.decode()[-500:]}{stderr.decode()[-500:]}"
        )
    raw = json.loads(lines[-1][len("WRK_JSON ") :])
    errors = {k: int(raw[k]) for k in ("connect", "read", "write", "status", "timeout") if raw[k]}
    if errors:
        run.problem(f"wrk via {via.name}, c={concurrency}, stream={stream}: errors {errors}")
    return WrkResult(
        requests=int(raw["requests"]),
        rps=raw["requests"] / (raw["duration_us"] / 1e6),
        p50_ms=raw["p50_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        errors=errors,
        cpu_s=cpu_used,
    )


def median(values: list[float]) -> float:
    return statistics.median(values)


async def throughput(run: Run, tmp: Path, vias: list[Via]) -> None:
    """wrk at each concurrency through each path; rounds interleaved, the order rotating."""
    p = run.params
    rounds: dict[str, dict[int, list[WrkResult]]] = {
        v.name: {c: [] for c in p.concurrencies} for v in vias
    }
    for i in range(p.rounds):
        for j, concurrency in enumerate(p.concurrencies):
            shift = (i + j) % len(vias)
            for via in vias[shift:] + vias[:shift]:
                result = await run_wrk(
                    run,
                    tmp,
                    via,
                    stream=False,
                    concurrency=concurrency,
                    cpu=concurrency == CPU_CONCURRENCY,
                )
                rounds[via.name][concurrency].append(result)
        progress(f"  throughput: round {i + 1}/{p.rounds} done")
    section: dict[str, Any] = {"wrk_s": p.wrk_s, "rounds": p.rounds, "paths": {}, "cpu": {}}
    direct = rounds["direct"]
    for via in vias:
        per_c = {}
        for c, results in rounds[via.name].items():
            rps = median([r.rps for r in results])
            per_c[str(c)] = {
                "rps": rps,
                "x_direct": rps / median([r.rps for r in direct[c]]),
                "p50_ms": median([r.p50_ms for r in results]),
                "p99_ms": median([r.p99_ms for r in results]),
                "rounds": [dataclasses.asdict(r) for r in results],
            }
        section["paths"][via.name] = per_c
        if via.pid is not None and CPU_CONCURRENCY in rounds[via.name]:
            results = rounds[via.name][CPU_CONCURRENCY]
            section["cpu"][via.name] = {
                "concurrency": CPU_CONCURRENCY,
                "us_per_request": median(
                    [1e6 * (r.cpu_s or 0.0) / r.requests for r in results if r.requests]
                ),
            }
    best = {name: max(c["rps"] for c in per_c.values()) for name, per_c in section["paths"].items()}
    gateway_best = max(v for k, v in best.items() if k.startswith("gateway"))
    section["upstream_check"] = {
        "direct_max_rps": best["direct"],
        "gateway_max_rps": gateway_best,
        "headroom": best["direct"] / gateway_best,
    }
    run.data["throughput"] = section


# --- paced latency -----------------------------------------------------------------------


def _stream_stats(results: list[Result], value: Callable[[Result], float]) -> dict[str, float]:
    return ms_stats(value(r) for r in results if not check_answer(r, stream=True))


async def latency(run: Run, vias: list[Via], targets: dict[str, Target]) -> None:
    """Paced non-streaming runs at each rate; added = path minus direct, same rate."""
    p = run.params
    section: dict[str, Any] = {"paced_s": p.paced_s, "rates": {}}
    for k, rate in enumerate(p.rates):
        per_via: dict[str, Any] = {}
        shift = k % len(vias)
        for via in vias[shift:] + vias[:shift]:
            target = targets[via.name]
            request = target.request(via.body(False))
            await paced(target, request, rate=rate, count=max(5, int(rate * 0.2)))  # warm-up
            results = await paced(target, request, rate=rate, count=int(rate * p.paced_s))
            tally(run, f"paced {rate:g}/s via {via.name}", results, stream=False)
            per_via[via.name] = summary(results, rate=rate)
        direct = per_via["direct"]["latency"]
        for name, s in per_via.items():
            if name != "direct" and s["latency"] and direct:
                s["added"] = {
                    "p50_ms": s["latency"]["p50_ms"] - direct["p50_ms"],
                    "p99_ms": s["latency"]["p99_ms"] - direct["p99_ms"],
                }
        section["rates"][f"{rate:g}"] = per_via
        progress(f"  latency: {rate:g} req/s done")
    run.data["latency"] = section


async def streaming(
    run: Run, tmp: Path, vias: list[Via], targets: dict[str, Target], gateway: Via
) -> None:
    """Paced streams: TTFT (first `data:` event) and total; wrk c=16 for CPU per event."""
    p = run.params
    section: dict[str, Any] = {
        "events": STREAM_EVENTS,
        "gap_ms": STREAM_GAP_MS,
        "rate": p.stream_rate,
        "paced_s": p.paced_s,
        "paths": {},
    }
    for via in vias:
        target = targets[via.name]
        request = target.request(via.body(True))
        results = await paced(
            target,
            request,
            rate=p.stream_rate,
            count=max(2, int(p.stream_rate * p.paced_s)),
            stream=True,
        )
        tally(run, f"paced streams via {via.name}", results, stream=True)
        section["paths"][via.name] = {
            "streams": len(results),
            "ttft": _stream_stats(results, lambda r: r.ttft),
            "total": _stream_stats(results, lambda r: r.latency),
        }
    direct = section["paths"]["direct"]
    for name, s in section["paths"].items():
        if name != "direct" and s["ttft"] and direct["ttft"]:
            s["added"] = {
                f"{what}_{q}_ms": s[what][f"{q}_ms"] - direct[what][f"{q}_ms"]
                for what in ("ttft", "total")
                for q in ("p50", "p99")
            }
    wrk: dict[str, Any] = {}
    for via in vias:
        result = await run_wrk(
            run, tmp, via, stream=True, concurrency=CPU_CONCURRENCY, cpu=via is gateway
        )
        wrk[via.name] = {
            "streams_per_s": result.rps,
            "p50_ms": result.p50_ms,
            "p99_ms": result.p99_ms,
        }
        if via is gateway and result.cpu_s is not None and result.requests:
            section["cpu"] = {
                "path": via.name,
                "concurrency": CPU_CONCURRENCY,
                "us_per_event": 1e6 * result.cpu_s / (result.requests * STREAM_EVENTS),
                "us_per_stream": 1e6 * result.cpu_s / result.requests,
            }
    section["wrk"] = wrk
    progress("  streaming: done")
    run.data["streaming"] = section


# --- LLM-shaped traffic --------------------------------------------------------------------


def _gap_stats(results: list[Result]) -> dict[str, float]:
    return ms_stats(g for r in results if not r.failure and r.gaps for g in r.gaps)


def _added(path: dict[str, float], direct: dict[str, float]) -> dict[str, float]:
    return {k: path[k] - direct[k] for k in ("p50_ms", "p99_ms") if k in path and k in direct}


async def llm_traffic(run: Run, upstream: Server, gateway: Via) -> None:
    """LLM-shaped streams (many at once, 100 content events 20 ms apart, opened over a few
    seconds), direct and through gateway w1 on its defaults; then the same answers asked
    without streaming (assembled by the gateway from the upstream's stream). Each pass is run
    once unmeasured first, so that connections are open and pooled as in a steady state."""
    p = run.params
    n, rate = p.llm_streams, p.llm_streams / p.llm_ramp_s
    direct = Target(f"{upstream.url}/v1/chat/completions", max_connections=n + 16)
    through = Target(gateway.url, max_connections=n + 16)
    pid = gateway.pid
    assert pid is not None
    section: dict[str, Any] = {
        "streams": n,
        "events": LLM_EVENTS,
        "gap_ms": LLM_GAP_MS,
        "opened_over_s": p.llm_ramp_s,
        "settings": "defaults (no upstream_stream: false)",
        "paths": {},
    }

    async def one_pass(target: Target, model: str, stream: bool) -> tuple[list[Result], float]:
        request = target.request(chat_body(model, stream=stream))
        await paced(target, request, rate=rate, count=n, stream=stream)  # warm: pools
        # The measured pass opens its own connections: reusing the warm pass's, idle for
        # seconds, races the server's keep-alive timeout (a few were reset in the first run).
        target.close()
        before = cpu_seconds(pid) if target is through else 0.0
        results = await paced(target, request, rate=rate, count=n, stream=stream, gaps=stream)
        cpu = cpu_seconds(pid) - before if target is through else 0.0
        return results, cpu

    try:
        streamed: dict[str, list[Result]] = {}
        for name, target, model in (("direct", direct, LLM), (gateway.name, through, "llm")):
            results, cpu = await one_pass(target, model, True)
            tally(run, f"LLM-shaped streams via {name}", results, stream=True, events=LLM_EVENTS)
            ok = [r for r in results if not check_answer(r, stream=True, events=LLM_EVENTS)]
            streamed[name] = results
            entry: dict[str, Any] = {
                "ok": len(ok),
                "ttft": ms_stats(r.ttft for r in ok),
                "gap": _gap_stats(ok),
                "total": ms_stats(r.latency for r in ok),
                "send_lag": ms_stats(max(0.0, r.sent - r.scheduled) for r in results if r.sent),
            }
            if target is through:
                events = sum(r.events for r in ok)
                entry["cpu"] = {"s": cpu, "us_per_event": 1e6 * cpu / events if events else None}
            section["paths"][name] = entry
            progress(f"  LLM-shaped streams via {name}: done")
        d, g = section["paths"]["direct"], section["paths"][gateway.name]
        g["added"] = {
            "ttft": _added(g["ttft"], d["ttft"]),
            "gap": _added(g["gap"], d["gap"]),
            "total": _added(g["total"], d["total"]),
        }
        results, cpu = await one_pass(through, "llm", False)
        tally(run, "LLM-shaped answers assembled", results, stream=False)
        ok = [r for r in results if not check_answer(r, stream=False)]
        latency = ms_stats(r.latency for r in ok)
        section["assembled"] = {
            "ok": len(ok),
            "latency": latency,
            "added_vs_direct_stream_total": _added(latency, d["total"]),
            "cpu": {
                "s": cpu,
                "us_per_request": 1e6 * cpu / len(ok) if ok else None,
                "us_per_event": 1e6 * cpu / (len(ok) * (LLM_EVENTS + 1)) if ok else None,
            },
        }
        progress("  LLM-shaped answers assembled: done")
    finally:
        direct.close()
        through.close()
    run.data["llm"] = section


async def short_answers(run: Run, tmp: Path, gateway: Via) -> None:
    """Non-streaming calls of a 12-event answer, wrk c=16: the default path (streamed upstream,
    assembled) against `upstream_stream: false` (the opt-out: a whole answer upstream);
    then one stream alone (wrk c=1): CPU per relayed event when no other stream shares the
    loop's wake-ups."""
    p = run.params
    default = dataclasses.replace(gateway, name=f"{gateway.name} answer", fast_model="answer")
    optout = dataclasses.replace(
        gateway, name=f"{gateway.name} answer opt-out", fast_model="answer-optout"
    )
    rounds: dict[str, list[WrkResult]] = {default.name: [], optout.name: []}
    for i in range(p.rounds):
        for via in (default, optout) if i % 2 == 0 else (optout, default):
            rounds[via.name].append(
                await run_wrk(run, tmp, via, stream=False, concurrency=CPU_CONCURRENCY, cpu=True)
            )
    section: dict[str, Any] = {"events": ANSWER_EVENTS, "concurrency": CPU_CONCURRENCY}
    for key, via in (("default", default), ("opt_out", optout)):
        results = rounds[via.name]
        section[key] = {
            "route": via.fast_model,
            "rps": median([r.rps for r in results]),
            "p50_ms": median([r.p50_ms for r in results]),
            "p99_ms": median([r.p99_ms for r in results]),
            "us_per_request": median(
                [1e6 * (r.cpu_s or 0.0) / r.requests for r in results if r.requests]
            ),
        }
    section["opt_out"]["label"] = "upstream_stream: false (an opt-out, not the default)"
    lone = [
        await run_wrk(run, tmp, gateway, stream=True, concurrency=1, cpu=True)
        for _ in range(p.rounds)
    ]
    section["lone_stream"] = {
        "events": STREAM_EVENTS,
        "gap_ms": STREAM_GAP_MS,
        "streams_per_s": median([r.rps for r in lone]),
        "us_per_event": median(
            [1e6 * (r.cpu_s or 0.0) / (r.requests * STREAM_EVENTS) for r in lone if r.requests]
        ),
    }
    run.data["answers"] = section
    progress("  short answers and the lone stream: done")


# --- background healthy load -------------------------------------------------------------


@dataclass
class Background:
    summary: dict[str, Any] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def background_load(
    url: str, model: str, rate: float, max_s: float, *, samples: bool = False
) -> AsyncIterator[Background]:
    """`bench.loadgen` in its own process, paced; measuring from its READY until the block
    ends (its stdin is then closed), at most `max_s`. Always stopped. With `samples`, its
    summary has every request's [scheduled, latency_s], for a window picked afterwards."""
    command = [
        sys.executable,
        "-m",
        "bench.loadgen",
        "--url",
        url,
        "--model",
        model,
        "--rate",
        str(rate),
        "--duration",
        str(max_s),
        "--until-stdin-closes",
        *(["--samples"] if samples else []),
    ]
    process = await asyncio.create_subprocess_exec(
        *command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**26
    )
    assert process.stdin is not None
    assert process.stdout is not None
    background = Background()
    try:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if line.strip() != b"READY":
            raise BenchError(f"the background load did not start: {' '.join(command)}")
        yield background
        process.stdin.close()
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line:
            raise BenchError(f"the background load died: {' '.join(command)}")
        background.summary = json.loads(line)
    finally:
        await stop_async(process)


def healthy_problems(run: Run, what: str, s: dict[str, Any]) -> None:
    for why, n in s.get("failures", {}).items():
        run.problem(f"{what}: {n} of {s['requests']} healthy requests failed: {why}")


async def deadline(run: Run, gateway: Via) -> None:
    """bench-hang (total_s 0.5) paced while healthy requests run on the same gateway."""
    p = run.params
    target = Target(gateway.url)
    request = target.request(chat_body("bench-hang"))
    try:
        async with background_load(gateway.url, "bench", p.healthy_rate, p.healthy_s + 30) as bg:
            results = await paced(
                target, request, rate=p.hang_rate, count=max(3, int(p.hang_rate * p.healthy_s))
            )
    finally:
        target.close()
    healthy_problems(run, "healthy requests beside hangs", bg.summary)
    wrong = [r for r in results if r.status != 504 or b"deadline_exceeded" not in r.body]
    if wrong:
        r = wrong[0]
        run.problem(
            f"bench-hang: {len(wrong)} of {len(results)} answers were not 504 "
            f"deadline_exceeded, e.g. {r.failure or r.status} {r.body[:200]!r}"
        )
    wrong_ids = {id(r) for r in wrong}
    ok = [r for r in results if id(r) not in wrong_ids]
    expected = HANG_TOTAL_S - MARGIN_S
    run.data["deadline"] = {
        "total_s": HANG_TOTAL_S,
        "margin_s": MARGIN_S,
        "hangs": len(results),
        "hang_rate": p.hang_rate,
        "healthy_rate": p.healthy_rate,
        "late_vs_deadline": ms_stats(r.latency - expected for r in ok),
        "late_vs_budget": ms_stats(r.latency - HANG_TOTAL_S for r in ok),
        "response": ms_stats(r.latency for r in ok),
        "healthy": bg.summary,
    }
    progress("  deadline: done")


# --- stalled streams -----------------------------------------------------------------------


async def control(upstream: Target, path: str) -> dict[str, Any]:
    results = await closed_loop(upstream, upstream.request(None, path), count=1, concurrency=1)
    result = results[0]
    if result.failure or result.status != 200:
        raise BenchError(f"upstream {path}: {result.failure or result.status}")
    data: dict[str, Any] = json.loads(result.body)
    return data


def stall_cap(gateway_pid: int, requested: int) -> tuple[int, str]:
    """How many stalled streams fit: each holds two descriptors in the gateway (client and
    upstream socket) and one in this process and in the upstream."""
    limit = min(fd_limit(gateway_pid), resource.getrlimit(resource.RLIMIT_NOFILE)[0])
    cap = (limit - open_fds(gateway_pid) - FD_RESERVE) // 2
    if requested <= cap:
        return requested, ""
    cap = cap // 100 * 100 if cap >= 1000 else cap
    return cap, (
        f"{requested:,} stalled streams cannot be reached: the gateway's open-file limit is "
        f"{limit} (raising it needs CAP_SYS_RESOURCE) and each stalled stream holds 2 "
        f"descriptors there (client and upstream socket); ran {cap:,} instead"
    )


@dataclass
class Peak:
    live: int = 0  # streams that had their content event and had not ended
    rss: int = 0
    fds: int = 0
    at_s: float = 0.0


async def sample_peak(
    pid: int, results: list[Result], n: int, start: float, end: asyncio.Event, peak: Peak
) -> None:
    """Sample the gateway's RSS and descriptors whenever more streams are live than at the
    last sample (in a thread: listing 20,000 descriptors takes a while), until all n are."""
    while not end.is_set():
        live = sum(1 for r in results if r.first_event and not r.done)
        if live > peak.live:
            rss, fds = await asyncio.to_thread(lambda: (rss_bytes(pid), open_fds(pid)))
            peak.live, peak.rss, peak.fds, peak.at_s = live, rss, fds, time.monotonic() - start
            if live >= n:
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(end.wait(), 0.05)


def stall_outcome(result: Result) -> str:
    if result.failure:
        return result.failure[:80]
    if result.status != 200:
        return f"HTTP {result.status}"
    if b"upstream_idle_timeout" in result.error_event:
        return "idle_timeout"
    if result.error_event:
        return f"error event {result.error_event[:80]!r}"
    return "ended without an error event"


async def stall_run(run: Run, gateway: Server, upstream_url: str, n: int) -> dict[str, Any]:
    """n streams to bench-stall opened together (as fast as the gateway takes them), held at
    the upstream until all have arrived, then released one after another over
    EXPIRY_SPREAD_MS: one content event each, then only comments, until the gateway ends each
    one idle_s later; so the idle deadlines of all fall within that spread."""
    p = run.params
    url = f"{gateway.url}/v1/chat/completions"
    via = Via(gateway.name, url, "bench", "bench-stream", gateway.pid)
    gw_target, upstream = Target(url), Target(upstream_url)
    try:
        await warm_up(run, [via], {via.name: gw_target})
        gw_target.close()
        async with background_load(url, "bench", p.healthy_rate, p.healthy_s + 30) as baseline:
            await asyncio.sleep(p.healthy_s)
        healthy_problems(run, f"healthy baseline before {n} stalls", baseline.summary)
        requested = n
        n, note = stall_cap(gateway.pid, n)
        if note:
            progress(f"  NOTE: {note}")
        rss0, fds0 = rss_bytes(gateway.pid), open_fds(gateway.pid)
        request = gw_target.request(chat_body("bench-stall", stream=True))
        results: list[Result] = []
        tasks: list[asyncio.Task[Result]] = []
        peak, ended = Peak(), asyncio.Event()
        async with background_load(url, "bench", p.healthy_rate, 600, samples=True) as during:
            arrived0 = (await control(upstream, "/control/stats"))["stall_arrived"]
            await control(upstream, "/control/hold")
            start = time.monotonic()
            sampler = asyncio.create_task(sample_peak(gateway.pid, results, n, start, ended, peak))
            cpu_trace: list[tuple[float, float]] = []
            cpu_sampler = asyncio.create_task(sample_cpu(gateway.pid, ended, cpu_trace))
            released_at, reason, held_at_release = 0.0, "", 0
            while True:
                stats = await control(upstream, "/control/stats")
                arrived = stats["stall_arrived"] - arrived0
                failed = sum(1 for r in results if r.done)  # refused: they never arrive
                for _ in range(min(n, arrived + failed + STALL_WINDOW) - len(results)):
                    results.append(Result(scheduled=time.monotonic()))
                    tasks.append(asyncio.create_task(open_stream(gw_target, request, results[-1])))
                if not released_at:
                    if arrived + failed >= n:
                        reason = "all arrived"
                    elif stats["oldest_held_s"] >= RELEASE_AFTER_S:
                        reason = f"the first had waited {RELEASE_AFTER_S:g} s (ttft_s {TTFT_S:g})"
                    elif time.monotonic() - start > RAMP_LIMIT_S:
                        reason = f"time limit {RAMP_LIMIT_S:g} s"
                    if reason:
                        held_at_release = stats["held"]
                        await control(upstream, f"/control/release?spread_ms={EXPIRY_SPREAD_MS}")
                        released_at = time.monotonic()
                late = time.monotonic() - start > RAMP_LIMIT_S  # opens that never arrive
                if released_at and (len(results) == n or late):
                    break
                await asyncio.sleep(0.01)
            opened_s = time.monotonic() - start
            _, pending = await asyncio.wait(tasks, timeout=IDLE_S + TTFT_S + 15)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for r in results:
                if not r.done:
                    r.failure, r.done = "did not end", time.monotonic()
            ended.set()
            await sampler
            await cpu_sampler
        healthy_problems(run, f"healthy requests during {n} stalls", during.summary)
        gateway.check_alive()
        left = (await control(upstream, "/control/stats"))["open_streams"]
        for _ in range(50):
            if left == 0:
                break
            await asyncio.sleep(0.1)
            left = (await control(upstream, "/control/stats"))["open_streams"]
    finally:
        gw_target.close()
        upstream.close()
    outcomes: dict[str, int] = {}
    for r in results:
        outcome = stall_outcome(r)
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if not r.failure and r.status not in (200, 503, 504):
            run.problem(f"bench-stall: HTTP {r.status}: {r.body[:200]!r}")
    idled = [r for r in results if stall_outcome(r) == "idle_timeout"]
    from_upstream = []
    for r in idled:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            sent_s = json.loads(r.first_data)["bench_sent_ns"] / 1e9
            from_upstream.append(r.done - sent_s - IDLE_S)
    base_p99 = baseline.summary.get("latency", {}).get("p99_ms")
    during_p99 = during.summary.get("latency", {}).get("p99_ms")
    expiry = expiry_window(idled, during.summary.pop("samples", []), base_p99, cpu_trace)
    growth = peak.rss - rss0 if peak.live else None
    return {
        "requested": requested,
        "streams": n,
        "note": note,
        "opened_s": opened_s,
        "release": {
            "reason": reason,
            "held": held_at_release,
            "after_s": released_at - start,
        },
        "peak_live": peak.live,
        "all_live_at_once": peak.live == n,
        "sampled_at_s": peak.at_s,
        "rss_before_mb": rss0 / 2**20,
        "rss_growth_mb": growth / 2**20 if growth is not None else None,
        "rss_per_stream_kb": growth / 1024 / peak.live if growth is not None else None,
        "fds_before": fds0,
        "fds_per_stream": (peak.fds - fds0) / peak.live if peak.live else None,
        "outcomes": outcomes,
        "ended_by_idle": len(idled),
        "late_past_idle": ms_stats(r.done - r.last_event - IDLE_S for r in idled),
        "late_past_idle_from_upstream_send": ms_stats(from_upstream),
        "upstream_streams_left": left,
        "healthy_baseline": baseline.summary,
        "healthy_during": during.summary,
        "healthy_added_p99_ms": during_p99 - base_p99
        if during_p99 is not None and base_p99 is not None
        else None,
        "expiry": expiry,
    }


async def sample_cpu(pid: int, end: asyncio.Event, trace: list[tuple[float, float]]) -> None:
    """(time.monotonic(), the gateway's CPU seconds) every 20 ms until `end`, and once after.
    One process (a gateway w1): its own /proc/<pid>/stat, not the tree's (a scan of /proc)."""
    while True:
        trace.append((time.monotonic(), process_cpu_seconds(pid)))
        if end.is_set():
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(end.wait(), 0.02)


def expiry_window(
    idled: list[Result],
    samples: list[list[float | None]],
    base_p99: float | None,
    cpu_trace: list[tuple[float, float]],
) -> dict[str, Any]:
    """The healthy requests scheduled while the stalls expire (from the first idle deadline to
    the last stream's end): their latency, and its p99 over the baseline's; the gateway's CPU
    in that window (from the samples just outside it), per expired stream."""
    if not idled:
        return {}
    start = min(r.last_event for r in idled) + IDLE_S
    end = max(r.done for r in idled)
    before = [cpu for at, cpu in cpu_trace if at <= start]
    after = [cpu for at, cpu in cpu_trace if at >= end]
    cpu = after[0] - before[-1] if before and after else None
    inside = [lat for at, lat in samples if at is not None and start <= at <= end]
    ok = [lat for lat in inside if lat is not None]
    latency = ms_stats(ok)
    return {
        "window_s": end - start,
        "healthy_requests": len(inside),
        "healthy_failed": len(inside) - len(ok),
        "healthy_latency": latency,
        "cpu_us_per_expired_stream": 1e6 * cpu / len(idled) if cpu is not None else None,
        "healthy_added_p99_ms": latency["p99_ms"] - base_p99
        if latency and base_p99 is not None
        else None,
    }


# --- the run -----------------------------------------------------------------------------


async def main_phase(run: Run, tmp: Path, servers: dict[str, Server]) -> None:
    upstream = servers["fast upstream"]
    vias = [via_direct(upstream), via_proxy(servers["nginx"], gateway=False)]
    vias += [via_proxy(servers[f"gateway w{w}"], gateway=True) for w in (1, 2)]
    vias.append(via_proxy(servers["gateway w1 no-metrics"], gateway=True))  # throughput only
    shared = via_proxy(servers["gateway w1 shared"], gateway=True)
    vias.append(shared)
    targets = {via.name: Target(via.url) for via in vias}
    try:
        progress("checking answers and warming up ...")
        await warm_up(run, vias, targets)
        progress("throughput (wrk) ...")
        await throughput(run, tmp, vias)
        paced_vias = [*vias[:3], shared]  # direct, nginx, gateway w1, gateway w1 shared
        progress("paced latency ...")
        await latency(run, paced_vias, targets)
        progress("streaming ...")
        await streaming(run, tmp, paced_vias, targets, vias[2])
        progress("LLM-shaped streams and assembled answers ...")
        await llm_traffic(run, upstream, vias[2])
        progress("short answers: the default path and the opt-out; a lone stream ...")
        await short_answers(run, tmp, vias[2])
    finally:
        for target in targets.values():
            target.close()
    run.data["shared"] = await shared_calls(servers["gateway w1 shared"])
    progress("deadline precision ...")
    await deadline(run, vias[2])


async def shared_calls(gateway: Server) -> dict[str, Any]:
    """The shared gateway's Redis calls per request, and their mean time, from its metrics."""
    async with aiohttp.ClientSession() as session, session.get(f"{gateway.url}/metrics") as got:
        text = await got.text()

    def total(pattern: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{pattern} (\S+)$", text, re.MULTILINE))

    requests = total(r"llm_gateway_requests_total\{[^}]*\}")
    calls = {
        op: total(rf'llm_gateway_shared_ops_total\{{op="{op}",outcome="[a-z]+"\}}')
        for op in ("acquire", "release", "renew")
    }
    acquire_s = total(r'llm_gateway_shared_op_seconds_sum\{op="acquire"\}')
    return {
        "requests": requests,
        "calls": calls,
        "acquire_per_request": calls["acquire"] / requests if requests else 0.0,
        "release_per_request": calls["release"] / requests if requests else 0.0,
        "acquire_mean_ms": 1000 * acquire_s / calls["acquire"] if calls["acquire"] else 0.0,
    }


async def peer(run: Run, tmp: Path, litellm: Server) -> None:
    """LiteLLM on the proxy path's exchanges (a whole answer; a 50-event stream), wrk c=16,
    beside gateway w1's numbers from the same run: the same upstream answers, so the ratios
    compare the two proxies' work."""
    p = run.params
    via = Via(
        litellm.name, f"{litellm.url}/v1/chat/completions", "bench", "bench-stream", litellm.pid
    )
    target = Target(via.url)
    try:
        for stream in (False, True):  # one checked answer of each kind
            (result,) = await closed_loop(
                target, target.request(via.body(stream)), count=1, concurrency=1, stream=stream
            )
            if result.failure or result.status != 200 or (stream and not result.done_seen):
                raise BenchError(
                    f"LiteLLM: a {'streaming' if stream else 'whole'} request got a wrong "
                    f"answer: {result.failure or result.status} {result.body[:200]!r}"
                )
        await closed_loop(
            target, target.request(via.body(False)), count=p.warmup // 5, concurrency=16
        )
    finally:
        target.close()
    whole = [await run_wrk(run, tmp, via, stream=False, concurrency=CPU_CONCURRENCY, cpu=True)]
    streams = [await run_wrk(run, tmp, via, stream=True, concurrency=CPU_CONCURRENCY, cpu=True)]
    section: dict[str, Any] = {
        "version": litellm_peer.VERSION,
        "workers": 1,
        "whole": {
            "rps": median([r.rps for r in whole]),
            "us_per_request": median([1e6 * (r.cpu_s or 0.0) / r.requests for r in whole]),
        },
        "stream": {
            "streams_per_s": median([r.rps for r in streams]),
            "us_per_event": median(
                [1e6 * (r.cpu_s or 0.0) / (r.requests * STREAM_EVENTS) for r in streams]
            ),
        },
    }
    gw_rps = _get(run.data, "throughput", "paths", "gateway w1", str(CPU_CONCURRENCY), "rps")
    gw_event = _get(run.data, "streaming", "cpu", "us_per_event")
    section["ratios"] = {
        "rps_whole": gw_rps / section["whole"]["rps"] if gw_rps else None,
        "cpu_per_event": section["stream"]["us_per_event"] / gw_event if gw_event else None,
        "gateway": "gateway w1, routes bench (upstream_stream: false: a whole answer upstream, "
        "as LiteLLM asks for one) and bench-stream, from the throughput and streaming sections",
    }
    run.data["litellm"] = section
    progress("  LiteLLM: done")


def run_all(run: Run, tmp: Path) -> None:
    setup = Setup(tmp)
    progress("starting the fast upstream and redis-server ...")
    with run_servers([setup.upstream()]) as (upstream,), redis_server(tmp) as redis_url:
        progress(
            "starting nginx and the gateway with 1 and 2 workers, without metrics, and with "
            "its cap shared through Redis ..."
        )
        gateways = [setup.gateway(1), setup.gateway(2), setup.gateway(1, metrics=False)]
        gateways.append(setup.gateway(1, redis_url=redis_url))
        with run_servers([setup.nginx(), *gateways]) as started:
            servers = {s.name: s for s in [upstream, *started]}
            uvloop.run(main_phase(run, tmp, servers))
        stalls: dict[str, Any] = {
            "idle_s": IDLE_S,
            "ttft_s": TTFT_S,
            "upstream_model": STALL,
            "runs": [],
        }
        if run.litellm:
            progress(f"LiteLLM {litellm_peer.VERSION}, the Python peer ...")
            os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no download
            spec = litellm_peer.server(tmp, upstream.url, {"bench": FAST, "bench-stream": STREAM})
            with run_servers([spec]) as (litellm,):
                uvloop.run(peer(run, tmp, litellm))
        run.data["stalls"] = stalls
        for n in run.params.stall_sizes:
            progress(f"stalled streams: {n:,} (a fresh gateway w1) ...")
            with run_servers([setup.gateway(1)]) as (gateway,):
                result = uvloop.run(stall_run(run, gateway, upstream.url, n))
            stalls["runs"].append(result)
            progress(
                f"  {result['streams']:,} stalls: peak {result['peak_live']:,} live, "
                f"{result['ended_by_idle']:,} ended by idle_s"
            )


# --- targets and report --------------------------------------------------------------------


def _get(data: dict[str, Any], *keys: str) -> Any:
    value: Any = data
    for key in keys:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


@dataclass(frozen=True)
class Goal:
    what: str
    limit: float
    unit: str
    at_most: bool  # True: value <= limit is met; False: value >= limit
    how: str
    value: float | None

    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value <= self.limit if self.at_most else self.value >= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {
            "target": self.what,
            "limit": self.limit,
            "unit": self.unit,
            "at_most": self.at_most,
            "value": self.value,
            "met": self.met(),
            "how": self.how,
        }


def goals(data: dict[str, Any], params: Params) -> list[Goal]:
    tp = data.get("throughput", {})
    c1 = str(min(params.concurrencies))
    direct_p50 = _get(tp, "paths", "direct", c1, "p50_ms")
    gw_p50 = _get(tp, "paths", "gateway w1", c1, "p50_ms")
    top_rate = f"{max(params.rates):g}"
    w2 = _get(tp, "paths", "gateway w2") or {}
    st = data.get("streaming", {})
    stall_runs = _get(data, "stalls", "runs") or []
    largest = max(stall_runs, key=lambda r: r["streams"], default=None)
    per_stream_kb = largest and largest["rss_per_stream_kb"]
    lateness = [r["late_past_idle"].get("max_ms") for r in stall_runs if r["late_past_idle"]]
    expiry_run = next((r for r in stall_runs if r["streams"] == 5000), largest)
    llm = data.get("llm", {})
    llm_gw: dict[str, Any] = {}
    for name, value in (_get(llm, "paths") or {}).items():
        if name != "direct":
            llm_gw = value
    answers = data.get("answers", {})
    peer = data.get("litellm", {})
    all_idled = all(r["ended_by_idle"] == r["streams"] for r in stall_runs) and stall_runs
    late_max = max(lateness) if lateness and all_idled else (math.inf if stall_runs else None)
    llm_goals = [
        Goal(
            "CPU per relayed event, LLM-shaped streams",
            10,
            "us",
            True,
            f"gateway w1 defaults, {params.llm_streams:,} streams of {LLM_EVENTS} events "
            f"{LLM_GAP_MS} ms apart: CPU / content events",
            _get(llm_gw, "cpu", "us_per_event"),
        ),
        Goal(
            "added TTFT p99, LLM-shaped streams",
            2,
            "ms",
            True,
            "gateway w1 p99 minus direct p99, same run",
            _get(llm_gw, "added", "ttft", "p99_ms"),
        ),
        Goal(
            "added gap between events p99, LLM-shaped streams",
            2,
            "ms",
            True,
            "every gap between two content events: gateway w1 p99 minus direct p99",
            _get(llm_gw, "added", "gap", "p99_ms"),
        ),
        Goal(
            "CPU per assembled event, the same answers not streamed",
            10,
            "us",
            True,
            "gateway w1 defaults (streamed upstream, assembled): CPU / upstream content events",
            _get(llm, "assembled", "cpu", "us_per_event"),
        ),
        Goal(
            f"CPU per non-streaming request, {ANSWER_EVENTS}-event answer (default path)",
            300,
            "us",
            True,
            f"gateway w1, route `answer`, wrk c={CPU_CONCURRENCY}: CPU / requests",
            _get(answers, "default", "us_per_request"),
        ),
        Goal(
            f"CPU per non-streaming request, {ANSWER_EVENTS}-event answer (opt-out)",
            200,
            "us",
            True,
            f"gateway w1, route `answer-optout` (upstream_stream: false), wrk c={CPU_CONCURRENCY}",
            _get(answers, "opt_out", "us_per_request"),
        ),
        Goal(
            "CPU per event, a lone stream",
            40,
            "us",
            True,
            f"gateway w1, wrk c=1, {STREAM_EVENTS} events {STREAM_GAP_MS} ms apart",
            _get(answers, "lone_stream", "us_per_event"),
        ),
        Goal(
            "healthy added p99 while stalls expire together",
            50,
            "ms",
            True,
            f"{(expiry_run or {}).get('streams', 0):,} stalls, idle deadlines within "
            f"{EXPIRY_SPREAD_MS} ms; healthy requests scheduled in the expiry window",
            _get(expiry_run or {}, "expiry", "healthy_added_p99_ms"),
        ),
        Goal(
            "stalls ended late past idle_s, p99 (expiring together)",
            100,
            "ms",
            True,
            "the same run: last content event (client side) to the stream's end, minus idle_s",
            _get(expiry_run or {}, "late_past_idle", "p99_ms"),
        ),
        Goal(
            "stalls ended late past idle_s, max (expiring together)",
            250,
            "ms",
            True,
            "the same run",
            _get(expiry_run or {}, "late_past_idle", "max_ms"),
        ),
        Goal(
            "RSS per stalled stream",
            40,
            "kB",
            True,
            "largest run, growth per live stream at the peak",
            per_stream_kb,
        ),
    ]
    if peer:
        llm_goals += [
            Goal(
                "throughput over LiteLLM's, non-streaming",
                10,
                "x",
                False,
                f"wrk c={CPU_CONCURRENCY}, same upstream answer: gateway w1 req/s / LiteLLM's",
                _get(peer, "ratios", "rps_whole"),
            ),
            Goal(
                "CPU per event, LiteLLM's over the gateway's",
                10,
                "x",
                False,
                f"wrk c={CPU_CONCURRENCY} streams of {STREAM_EVENTS} events: LiteLLM / gateway w1",
                _get(peer, "ratios", "cpu_per_event"),
            ),
        ]
    return [
        *llm_goals,
        Goal(
            "gateway CPU per non-streaming request (opt-out, `fast`)",
            200,
            "us",
            True,
            f"gateway w1, upstream_stream: false, wrk c={CPU_CONCURRENCY}: (utime+stime) / "
            "requests",
            _get(tp, "cpu", "gateway w1", "us_per_request"),
        ),
        Goal(
            "added p50 at concurrency 1",
            0.3,
            "ms",
            True,
            f"closed loop, wrk -c{c1}: gateway w1 p50 minus direct p50",
            gw_p50 - direct_p50 if gw_p50 is not None and direct_p50 is not None else None,
        ),
        Goal(
            f"added p99 at {top_rate} req/s",
            2,
            "ms",
            True,
            f"paced {top_rate} req/s: gateway w1 p99 minus direct p99",
            _get(data, "latency", "rates", top_rate, "gateway w1", "added", "p99_ms"),
        ),
        Goal(
            "req/s with --workers 2",
            5000,
            "req/s",
            False,
            "wrk, best of the concurrencies",
            max((c["rps"] for c in w2.values()), default=None),
        ),
        Goal(
            "streaming added TTFT p50",
            1,
            "ms",
            True,
            "paced streams, gateway w1 minus direct",
            _get(st, "paths", "gateway w1", "added", "ttft_p50_ms"),
        ),
        Goal(
            "streaming added total p50",
            2,
            "ms",
            True,
            "paced streams, gateway w1 minus direct",
            _get(st, "paths", "gateway w1", "added", "total_p50_ms"),
        ),
        Goal(
            "gateway CPU per relayed event",
            30,
            "us",
            True,
            f"gateway w1, wrk c={CPU_CONCURRENCY} streams: CPU / content events "
            "(per-request work included)",
            _get(st, "cpu", "us_per_event"),
        ),
        Goal(
            "stalled streams live at once, one worker",
            STALL_TARGET,
            "streams",
            False,
            "largest run: streams with their token and not yet ended, at the peak",
            largest and largest["peak_live"],
        ),
        Goal(
            f"RSS growth for {STALL_TARGET:,} stalled streams",
            512,
            "MB",
            True,
            "largest run, per live stream at the peak, times 10,000",
            per_stream_kb * STALL_TARGET / 1024 if per_stream_kb is not None else None,
        ),
        Goal(
            "stalled streams ended late past idle_s (max)",
            100,
            "ms",
            True,
            "every run: last token (as the client saw it) to the end; inf if any stream was "
            "not ended by the idle timeout",
            late_max,
        ),
        Goal(
            "healthy added p99 during stalls",
            5,
            "ms",
            True,
            f"largest run, paced {params.healthy_rate:g} req/s: p99 during minus p99 before",
            largest and largest["healthy_added_p99_ms"],
        ),
        Goal(
            "deadline precision p99",
            20,
            "ms",
            True,
            f"bench-hang: response time minus (total_s - margin_s) = {HANG_TOTAL_S - MARGIN_S:g} s",
            _get(data, "deadline", "late_vs_deadline", "p99_ms"),
        ),
    ]


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def report(data: dict[str, Any], params: Params) -> Iterator[str]:
    if params.smoke:
        yield "SMOKE RUN: tiny counts; the numbers check the harness, not the gateway."
        yield ""
    tp = data["throughput"]
    yield f"throughput: wrk -t1, {tp['wrk_s']} s x {tp['rounds']} round(s), median req/s"
    cs = [str(c) for c in params.concurrencies]
    rows = [
        [name, *(f"{per_c[c]['rps']:,.0f} (x{per_c[c]['x_direct']:.3f})" for c in cs)]
        for name, per_c in tp["paths"].items()
    ]
    yield table(["path", *(f"c={c}" for c in cs)], rows)
    cpu = "; ".join(f"{k} {v['us_per_request']:.0f} us" for k, v in tp["cpu"].items())
    check = tp["upstream_check"]
    yield f"gateway CPU per request at c={CPU_CONCURRENCY}: {cpu}"
    yield (
        f"upstream check: direct {check['direct_max_rps']:,.0f} req/s, best gateway "
        f"{check['gateway_max_rps']:,.0f} req/s: x{check['headroom']:.1f} headroom"
    )
    yield ""
    lat = data["latency"]
    yield f"latency: paced (open loop), {lat['paced_s']:g} s per run, ms from the scheduled send"
    rows = []
    for rate, per_via in lat["rates"].items():
        d = per_via["direct"]["latency"]
        row = [f"{rate}/s", _f(d.get("p50_ms"), 3), _f(d.get("p99_ms"), 3)]
        for name in ("nginx", "gateway w1"):
            added = per_via[name].get("added", {})
            row += [_f(added.get("p50_ms"), 3), _f(added.get("p99_ms"), 3)]
        row.append(_f(max(s["send_lag"].get("p99_ms", 0.0) for s in per_via.values()), 3))
        rows.append(row)
    yield table(
        ["rate", "direct p50", "p99", "nginx +p50", "+p99", "gateway +p50", "+p99", "send lag p99"],
        rows,
    )
    yield ""
    st = data["streaming"]
    yield (
        f"streaming: {st['events']} events {st['gap_ms']} ms apart, paced {st['rate']:g}/s; "
        "added ms vs direct"
    )
    rows = []
    for name, s in st["paths"].items():
        added = s.get("added", {})
        rows.append(
            [
                name,
                _f(s["ttft"].get("p50_ms"), 3),
                _f(s["total"].get("p50_ms"), 3),
                _f(added.get("ttft_p50_ms"), 3),
                _f(added.get("ttft_p99_ms"), 3),
                _f(added.get("total_p50_ms"), 3),
                _f(added.get("total_p99_ms"), 3),
                _f(st["wrk"][name]["streams_per_s"], 0),
            ]
        )
    yield table(
        [
            "path",
            "TTFT p50",
            "total p50",
            "+TTFT p50",
            "+TTFT p99",
            "+total p50",
            "+total p99",
            f"streams/s c={CPU_CONCURRENCY}",
        ],
        rows,
    )
    if "cpu" in st:
        yield (
            f"gateway CPU: {st['cpu']['us_per_event']:.1f} us per relayed event "
            f"({st['cpu']['us_per_stream']:.0f} us per stream)"
        )
    yield ""
    yield from report_llm(data)
    yield from report_shared(data)
    dl = data["deadline"]
    late, budget = dl["late_vs_deadline"], dl["late_vs_budget"]
    yield (
        f"deadline: {dl['hangs']} bench-hang requests (total_s {dl['total_s']:g}) beside "
        f"{dl['healthy_rate']:g} req/s healthy: late past total_s - margin_s p50 "
        f"{_f(late.get('p50_ms'))} ms, p99 {_f(late.get('p99_ms'))} ms, max "
        f"{_f(late.get('max_ms'))} ms (past total_s itself: p50 {_f(budget.get('p50_ms'))} ms, "
        f"p99 {_f(budget.get('p99_ms'))} ms)"
    )
    yield ""
    stalls = data["stalls"]
    yield (
        f"stalled streams: one fresh gateway w1 per size, idle_s {stalls['idle_s']:g}, "
        f"upstream model {stalls['upstream_model']}"
    )
    rows = []
    for r in stalls["runs"]:
        late = r["late_past_idle"]
        rows.append(
            [
                f"{r['streams']:,}",
                f"{r['peak_live']:,}",
                _f(r["opened_s"]),
                _f(r["rss_growth_mb"], 1),
                _f(r["rss_per_stream_kb"], 1),
                _f(r["fds_per_stream"]),
                f"{r['ended_by_idle']:,}",
                _f(late.get("p50_ms"), 1),
                _f(late.get("p99_ms"), 1),
                _f(late.get("max_ms"), 1),
                _f(r["healthy_added_p99_ms"]),
                _f(r["expiry"].get("healthy_added_p99_ms")),
            ]
        )
    yield table(
        [
            "streams",
            "peak live",
            "open s",
            "RSS +MB",
            "KB/stream",
            "fds/stream",
            "ended by idle",
            "late p50",
            "p99",
            "max ms",
            "healthy +p99 ms",
            "in expiry",
        ],
        rows,
    )
    for r in stalls["runs"]:
        if r["note"]:
            yield f"NOTE: {r['note']}"
        if r["outcomes"].get("idle_timeout", 0) != r["streams"]:
            yield f"outcomes of {r['streams']:,}: {r['outcomes']}"
    yield ""
    yield "targets (from the issue; reported, not asserted)"
    rows = []
    for g in data["targets"]:
        sign = "<=" if g["at_most"] else ">="
        met = {True: "met", False: "NOT met", None: "n/a"}[g["met"]]
        rows.append([g["target"], f"{sign} {g['limit']:,g} {g['unit']}", _f(g["value"]), met])
    yield table(["target", "limit", "value", ""], rows)


def report_llm(data: dict[str, Any]) -> Iterator[str]:
    """The LLM-shaped sections: many long streams, the same answers assembled, short answers
    on the default path and the opt-out, a lone stream, and the peer if it ran."""
    llm = data["llm"]
    yield (
        f"LLM-shaped streams: {llm['streams']:,} opened over {llm['opened_over_s']:g} s, "
        f"{llm['events']} events {llm['gap_ms']} ms apart, {llm['settings']}; ms"
    )
    rows = []
    for name, s in llm["paths"].items():
        added = s.get("added", {})
        rows.append(
            [
                name,
                _f(s["ttft"].get("p50_ms"), 3),
                _f(s["ttft"].get("p99_ms"), 3),
                _f(s["gap"].get("p99_ms"), 3),
                _f(added.get("ttft", {}).get("p50_ms"), 3),
                _f(added.get("ttft", {}).get("p99_ms"), 3),
                _f(added.get("gap", {}).get("p99_ms"), 3),
                _f(s.get("cpu", {}).get("us_per_event"), 1),
            ]
        )
    yield table(
        [
            "path",
            "TTFT p50",
            "p99",
            "gap p99",
            "+TTFT p50",
            "+TTFT p99",
            "+gap p99",
            "CPU us/event",
        ],
        rows,
    )
    a = llm["assembled"]
    yield (
        "the same answers not streamed (assembled, defaults): CPU "
        f"{_f(a['cpu']['us_per_request'], 0)} us per request, "
        f"{_f(a['cpu']['us_per_event'], 1)} us per assembled event; added vs "
        f"direct stream's end p50 {_f(a['added_vs_direct_stream_total'].get('p50_ms'), 3)} ms, "
        f"p99 {_f(a['added_vs_direct_stream_total'].get('p99_ms'), 3)} ms"
    )
    ans = data["answers"]
    d, o, lone = ans["default"], ans["opt_out"], ans["lone_stream"]
    yield (
        f"{ans['events']}-event answers not streamed, wrk c={ans['concurrency']}: default "
        f"(assembled) {_f(d['us_per_request'], 0)} us per request, {d['rps']:,.0f} req/s; "
        f"opt-out ({o['label']}) {_f(o['us_per_request'], 0)} us, {o['rps']:,.0f} req/s"
    )
    yield (
        f"a lone stream ({lone['events']} events {lone['gap_ms']} ms apart, wrk c=1): "
        f"{_f(lone['us_per_event'], 1)} us per event"
    )
    peer = data.get("litellm")
    if peer:
        yield (
            f"LiteLLM {peer['version']} (1 worker), wrk c={CPU_CONCURRENCY}: non-streaming "
            f"{peer['whole']['rps']:,.0f} req/s at {_f(peer['whole']['us_per_request'], 0)} us "
            f"per request; streams {_f(peer['stream']['us_per_event'], 1)} us per event. "
            f"Gateway w1 x{_f(peer['ratios']['rps_whole'], 1)} the req/s, "
            f"1/{_f(peer['ratios']['cpu_per_event'], 1)} the CPU per event"
        )
    yield ""


def report_shared(data: dict[str, Any]) -> Iterator[str]:
    """The shared cap's cost: the same gateway w1 with and without `shared` (Redis on
    loopback, a cap never reached), from the sections above."""
    plain, shared = "gateway w1", "gateway w1 shared"
    cpu = data["throughput"]["cpu"]
    c = str(CPU_CONCURRENCY)
    paths = data["throughput"]["paths"]
    sh = data["shared"]
    yield "shared cap (Redis on loopback, one cap never full): gateway w1 without / with shared"
    yield (
        f"  CPU per request at c={c}: {cpu[plain]['us_per_request']:.0f} / "
        f"{cpu[shared]['us_per_request']:.0f} us; req/s at c={c}: "
        f"{paths[plain][c]['rps']:,.0f} / {paths[shared][c]['rps']:,.0f}"
    )
    for rate, per_via in data["latency"]["rates"].items():
        a, b = per_via[plain].get("added", {}), per_via[shared].get("added", {})
        yield (
            f"  paced {rate}/s, added vs direct p50 {_f(a.get('p50_ms'), 3)} / "
            f"{_f(b.get('p50_ms'), 3)} ms, p99 {_f(a.get('p99_ms'), 3)} / "
            f"{_f(b.get('p99_ms'), 3)} ms"
        )
    streams = data["streaming"]["paths"]
    yield (
        "  streams, added total p50 "
        f"{_f(streams[plain].get('added', {}).get('total_p50_ms'), 3)} / "
        f"{_f(streams[shared].get('added', {}).get('total_p50_ms'), 3)} ms"
    )
    yield (
        f"  Redis calls per request: acquire {sh['acquire_per_request']:.3f}, release "
        f"{sh['release_per_request']:.3f} (renew {sh['calls']['renew']:.0f} in all); "
        f"mean acquire {sh['acquire_mean_ms']:.3f} ms"
    )
    yield ""


def finite(data: Any) -> Any:
    """JSON-safe: inf/nan become None."""
    if isinstance(data, float) and not math.isfinite(data):
        return None
    if isinstance(data, dict):
        return {k: finite(v) for k, v in data.items()}
    if isinstance(data, list):
        return [finite(v) for v in data]
    return data


def versions() -> dict[str, Any]:
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            check=False,
            timeout=10,
        )
        commit = done.stdout.strip() or None
    return {
        "gateway_commit": commit,
        "uvloop": importlib.metadata.version("uvloop"),
        "aiohttp": aiohttp.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every result here")
    parser.add_argument(
        "--litellm",
        action="store_true",
        help=f"also measure LiteLLM's proxy {litellm_peer.VERSION} (installed on first use "
        "into its own venv, see bench/litellm_peer.py)",
    )
    args = parser.parse_args(argv)
    params = SMOKE if args.smoke else FULL
    exit_on_sigterm()
    run = Run(params, litellm=args.litellm)
    run.data.update(
        benchmark="suite", smoke=params.smoke, machine=machine(), params=dataclasses.asdict(params)
    )
    started = time.monotonic()
    code = 0
    try:
        run.data["versions"] = {**versions(), **require_tools()}
        run.data["nofile"] = raise_fd_limit()
        with tempfile.TemporaryDirectory(prefix="bench-suite-") as tmp:
            run_all(run, Path(tmp))
    except KeyboardInterrupt:
        progress("bench.suite: interrupted; the servers were stopped")
        run.data["error"] = "interrupted"
        code = 130
    except Exception as exc:
        progress(f"bench.suite FAILED: {describe_error(exc)}")
        run.data["error"] = describe_error(exc)
        code = 1
    run.data["elapsed_s"] = time.monotonic() - started
    run.data["targets"] = [g.as_dict() for g in goals(run.data, params)]
    run.data["problems"] = run.problems
    if code == 0:
        for line in report(run.data, params):
            out(line)
        out(f"\n({run.data['elapsed_s']:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps(finite(run.data), indent=2) + "\n")
    if code == 0 and run.problems:
        progress(f"bench.suite FAILED: {len(run.problems)} wrong answer(s):")
        for problem in run.problems:
            progress(f"  {problem}")
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
