"""The gateway's overhead: the same requests direct to the simulator and through the gateway.

    python -m bench.overhead [--requests N] [--concurrency C] [--rounds R] [--json]

Two child processes: the simulator (`llm-gateway simulate`) and the gateway (`llm-gateway
serve`, with a temporary config: one upstream, the simulator; route `bench` -> sim@tokens=16
and `bench-stream` -> sim@tokens=64; generous budgets; max_connections above the
concurrency). The client is one httpx2.AsyncClient per path, `Limits(max_connections=C)`.
Direct and gateway rounds are interleaved (direct, gateway, then gateway, direct, ...):

    non-streaming  POST /v1/chat/completions: req/s, p50/p99 latency
    streaming      the same with stream true, read with aiter_bytes(): req/s, p50/p99 latency,
                   time to the first body byte (TTFB) p50

Ratios are gateway/direct; "added" is the gateway's p50 minus the direct p50. Note that the
client, the gateway and the simulator share the machine's CPUs: at saturation the gateway's
CPU time is taken from the other two, so req/s ratios include that contention.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

import httpx2
import yaml

from bench._common import (
    Comparison,
    Series,
    chat_body,
    compare,
    describe_error,
    exit_on_sigterm,
    free_port,
    machine,
    out,
    parse_args,
    pooled_client,
    post_stream,
    post_whole,
    progress,
    run_server,
    table,
)

PATHS = ("direct", "gateway")
# (name, model sent direct, route sent to the gateway (its target is the direct model), stream)
MODES = (
    ("non-streaming", "sim@tokens=16", "bench", False),
    ("streaming", "sim@tokens=64", "bench-stream", True),
)


def gateway_config(simulator_url: str, concurrency: int) -> dict[str, Any]:
    """One upstream (the simulator) with room to spare; one route per mode, generous budgets."""
    budget = {"total_s": 60, "ttft_s": 30, "idle_s": 30, "attempt_s": 60}
    return {
        "upstreams": [
            {
                "name": "sim",
                "base_url": f"{simulator_url}/v1",
                "max_connections": max(64, 4 * concurrency),
                "max_pending": max(256, 16 * concurrency),
            }
        ],
        "routes": [
            {"model": route, "targets": [{"upstream": "sim", "model": model}], "budget": budget}
            for _, model, route, _ in MODES
        ],
    }


async def measure(
    urls: dict[str, str], requests: int, concurrency: int, rounds: int
) -> list[Comparison]:
    clients = {path: pooled_client(concurrency) for path in PATHS}
    comparisons = []
    try:
        for name, model, route, stream in MODES:
            post = post_stream if stream else post_whole
            bodies = {
                "direct": chat_body(model, stream=stream),
                "gateway": chat_body(route, stream=stream),
            }
            calls = {path: partial(post, clients[path], urls[path], bodies[path]) for path in PATHS}
            comparisons.append(
                await compare(
                    name,
                    calls,
                    stream=stream,
                    requests=requests,
                    concurrency=concurrency,
                    rounds=rounds,
                )
            )
    finally:
        for client in clients.values():
            await client.aclose()
    return comparisons


def ratios(c: Comparison) -> dict[str, float]:
    """gateway/direct (req/s: median of per-round ratios; latencies pooled) and added ms."""
    result = {
        "rps": c.rps_ratio(),
        "p50": c.cand.latency_ms(50) / c.base.latency_ms(50),
        "p99": c.cand.latency_ms(99) / c.base.latency_ms(99),
        "added_p50_ms": c.cand.latency_ms(50) - c.base.latency_ms(50),
        "added_p99_ms": c.cand.latency_ms(99) - c.base.latency_ms(99),
    }
    if c.stream:
        result["ttfb_p50"] = c.cand.ttfb_ms(50) / c.base.ttfb_ms(50)
        result["added_ttfb_p50_ms"] = c.cand.ttfb_ms(50) - c.base.ttfb_ms(50)
    return result


def report(comparisons: list[Comparison], requests: int, concurrency: int) -> list[str]:
    lines = []
    for (name, model, route, _), c in zip(MODES, comparisons, strict=True):
        lines.append(
            f"{name}: direct model {model} vs gateway route {route}, {len(c.base.rounds)} "
            f"rounds x {requests} requests per path, concurrency {concurrency}"
        )
        headers = ["path", "req/s", "rounds min..max", "spread", "p50 ms", "p99 ms"]
        if c.stream:
            headers += ["TTFB p50 ms"]
        rows = []
        for path in PATHS:
            v = c.results[path]
            rps = v.rps()
            row = [
                path,
                f"{rps.median:.0f}",
                f"{rps.low:.0f}..{rps.high:.0f}",
                f"{rps.spread * 100:.0f}%",
                f"{v.latency_ms(50):.2f}",
                f"{v.latency_ms(99):.2f}",
            ]
            if c.stream:
                row.append(f"{v.ttfb_ms(50):.2f}")
            rows.append(row)
        lines.append(table(headers, rows))
        r = ratios(c)
        paired = Series(c.paired_rps())
        text = (
            f"gateway/direct: req/s x{r['rps']:.3f} (rounds {paired.low:.3f}..{paired.high:.3f}), "
            f"p50 x{r['p50']:.2f} (+{r['added_p50_ms']:.2f} ms), "
            f"p99 x{r['p99']:.2f} (+{r['added_p99_ms']:.2f} ms)"
        )
        if c.stream:
            text += f", TTFB p50 x{r['ttfb_p50']:.2f} (+{r['added_ttfb_p50_ms']:.2f} ms)"
        lines += [text, f"  -> req/s difference: {c.verdict().reason}", ""]
    return lines


def conclusion(comparisons: list[Comparison]) -> str:
    parts = []
    for c in comparisons:
        r = ratios(c)
        part = (
            f"{c.name}: gateway at {r['rps'] * 100:.0f}% of direct req/s, "
            f"+{r['added_p50_ms']:.2f} ms p50"
        )
        if c.stream:
            part += f", +{r['added_ttfb_p50_ms']:.2f} ms TTFB p50"
        parts.append(part)
    return "SUMMARY: " + "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        "python -m bench.overhead",
        "The gateway's overhead vs direct to the simulator.",
        requests=400,
        concurrency=8,
        rounds=6,
        argv=argv,
    )
    exit_on_sigterm()
    sim_port, gw_port = free_port(), free_port()
    while gw_port == sim_port:
        gw_port = free_port()
    try:
        progress(f"starting the simulator on 127.0.0.1:{sim_port} ...")
        with (
            run_server(
                "simulator",
                ["simulate", "--port", str(sim_port), "--log-level", "warning"],
                sim_port,
                "/v1/models",
            ) as sim,
            tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp,
        ):
            config_path = Path(tmp) / "gateway.yaml"
            config_path.write_text(yaml.safe_dump(gateway_config(sim.url, args.concurrency)))
            progress(f"starting the gateway on 127.0.0.1:{gw_port} ...")
            serve = ["serve", "--config", str(config_path), "--port", str(gw_port)]
            with run_server(
                "gateway", [*serve, "--log-level", "warning"], gw_port, "/readyz"
            ) as gw:
                urls = {
                    "direct": f"{sim.url}/v1/chat/completions",
                    "gateway": f"{gw.url}/v1/chat/completions",
                }
                results = asyncio.run(measure(urls, args.requests, args.concurrency, args.rounds))
    except Exception as exc:
        progress(f"bench.overhead FAILED: {describe_error(exc)}")
        return 1
    except KeyboardInterrupt:
        progress("bench.overhead: interrupted; the servers were stopped")
        return 130
    summary = conclusion(results)
    if args.json:
        data = {
            "benchmark": "overhead",
            "machine": machine(),
            "client": f"httpx2 {httpx2.__version__}",
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "modes": {
                c.name: {
                    "direct_model": model,
                    "gateway_route": route,
                    **{path: c.results[path].summary(c.stream) for path in PATHS},
                    "ratio_gateway_over_direct": ratios(c),
                    "paired_rps_ratios": c.paired_rps(),
                    "verdict": c.verdict().reason,
                }
                for (_, model, route, _), c in zip(MODES, results, strict=True)
            },
            "summary": summary,
        }
        out(json.dumps(data, indent=2))
    else:
        for line in report(results, args.requests, args.concurrency):
            out(line)
        out(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
