"""httpx (0.28) vs httpx2 (2.16) as the gateway's upstream client, measured against the simulator.

    python -m bench.http_clients [--requests N] [--concurrency C] [--rounds R] [--json]

The simulator runs as a child process (`llm-gateway simulate`), so it does not share this
process's event loop or GIL. Each library gets one `AsyncClient` with
`Limits(max_connections=C, max_keepalive_connections=C)`, warmed up, then both are measured in
the same run, rounds interleaved (httpx, httpx2, then httpx2, httpx, ...) so that drift in the
machine's load hits both alike:

    non-streaming  POST /v1/chat/completions, model sim@tokens=16: req/s, p50/p99 latency
    streaming      the same with model sim@tokens=64 and stream true, read with aiter_bytes():
                   req/s, chunks/s (a chunk is one read from the socket), p50/p99 latency

Ratios are httpx2/httpx, per round (paired), and a difference counts as significant only if
every round agrees on its direction and the mean ratio is more than 2 standard errors from 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
from functools import partial

import httpx2

from bench._common import (
    REQUEST_TIMEOUT_S,
    AnyClient,
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

try:
    import httpx
except ImportError:  # not a dependency of the gateway itself
    sys.exit("bench.http_clients needs httpx as well as httpx2: pip install 'httpx==0.28.1'")

LIBS = ("httpx", "httpx2")
VERSIONS = {"httpx": httpx.__version__, "httpx2": httpx2.__version__}

# (name, model, stream)
MODES = (
    ("non-streaming", "sim@tokens=16", False),
    ("streaming", "sim@tokens=64", True),
)


def make_client(lib: str, concurrency: int) -> AnyClient:
    """One pool of `concurrency` connections, all kept alive (as the gateway configures it)."""
    if lib == "httpx":
        return httpx.AsyncClient(
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency),
            timeout=httpx.Timeout(REQUEST_TIMEOUT_S),
            trust_env=False,
        )
    return pooled_client(concurrency)


async def measure(url: str, requests: int, concurrency: int, rounds: int) -> list[Comparison]:
    clients = {lib: make_client(lib, concurrency) for lib in LIBS}
    comparisons = []
    try:
        for name, model, stream in MODES:
            body = chat_body(model, stream=stream)
            post = post_stream if stream else post_whole
            calls = {lib: partial(post, clients[lib], url, body) for lib in LIBS}
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
    """httpx2/httpx: req/s and chunks/s as the median of per-round ratios; latency pooled."""
    result = {
        "rps": c.rps_ratio(),
        "p50": c.cand.latency_ms(50) / c.base.latency_ms(50),
        "p99": c.cand.latency_ms(99) / c.base.latency_ms(99),
    }
    if c.stream:
        result["chunks_per_s"] = Series(c.paired_chunks()).median
    return result


def _pct(ratio: float) -> str:
    return f"{(ratio - 1) * 100:.1f}%"


def report(comparisons: list[Comparison], requests: int, concurrency: int) -> list[str]:
    lines = []
    for (name, model, _), c in zip(MODES, comparisons, strict=True):
        lines.append(
            f"{name}: model {model}, {len(c.base.rounds)} rounds x {requests} requests per "
            f"client, concurrency {concurrency}"
        )
        headers = ["client", "req/s", "rounds min..max", "spread", "p50 ms", "p99 ms"]
        if c.stream:
            headers += ["chunks/s", "chunks/req"]
        rows = []
        for lib in LIBS:
            v = c.results[lib]
            rps = v.rps()
            row = [
                f"{lib} {VERSIONS[lib]}",
                f"{rps.median:.0f}",
                f"{rps.low:.0f}..{rps.high:.0f}",
                f"{rps.spread * 100:.0f}%",
                f"{v.latency_ms(50):.2f}",
                f"{v.latency_ms(99):.2f}",
            ]
            if c.stream:
                row += [f"{v.chunks_per_s().median:.0f}", f"{v.chunks_per_request():.1f}"]
            rows.append(row)
        lines.append(table(headers, rows))
        r = ratios(c)
        paired = Series(c.paired_rps())
        text = (
            f"httpx2/httpx: req/s x{r['rps']:.3f} (rounds {paired.low:.3f}..{paired.high:.3f}), "
            f"p50 x{r['p50']:.3f}, p99 x{r['p99']:.3f}"
        )
        if c.stream:
            text += f", chunks/s x{r['chunks_per_s']:.3f}"
        lines += [text, f"  -> {c.verdict().reason}", ""]
    return lines


def conclusion(comparisons: list[Comparison]) -> str:
    parts = []
    for c in comparisons:
        ratio = c.rps_ratio()
        faster, by = ("httpx2", ratio) if ratio >= 1 else ("httpx", 1 / ratio)
        verdict = "significant" if c.verdict().significant else "within noise"
        parts.append(f"{c.name}: {faster} faster by {_pct(by)} req/s ({verdict})")
    significant = [c for c in comparisons if c.verdict().significant]
    directions = {c.rps_ratio() > 1 for c in significant}
    if not significant:
        overall = "no difference beyond noise between httpx and httpx2"
    elif len(significant) == len(comparisons) and len(directions) == 1:
        overall = f"{'httpx2' if directions.pop() else 'httpx'} is faster in both modes"
    else:
        overall = "mixed: see the per-mode verdicts"
    return f"SUMMARY: {'; '.join(parts)} -> {overall}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        "python -m bench.http_clients",
        "httpx vs httpx2 against the simulator.",
        requests=800,
        concurrency=8,
        rounds=6,
        argv=argv,
    )
    exit_on_sigterm()
    port = free_port()
    progress(f"starting the simulator on 127.0.0.1:{port} ...")
    try:
        with run_server(
            "simulator",
            ["simulate", "--port", str(port), "--log-level", "warning"],
            port,
            "/v1/models",
        ) as sim:
            url = f"{sim.url}/v1/chat/completions"
            results = asyncio.run(measure(url, args.requests, args.concurrency, args.rounds))
    except Exception as exc:
        progress(f"bench.http_clients FAILED: {describe_error(exc)}")
        return 1
    except KeyboardInterrupt:
        progress("bench.http_clients: interrupted; the servers were stopped")
        return 130
    summary = conclusion(results)
    if args.json:
        data = {
            "benchmark": "http_clients",
            "machine": machine(),
            "versions": VERSIONS,
            "requests": args.requests,
            "concurrency": args.concurrency,
            "rounds": args.rounds,
            "modes": {
                c.name: {
                    "model": model,
                    **{lib: c.results[lib].summary(c.stream) for lib in LIBS},
                    "ratio_httpx2_over_httpx": ratios(c),
                    "paired_rps_ratios": c.paired_rps(),
                    "significant": c.verdict().significant,
                    "verdict": c.verdict().reason,
                }
                for (_, model, _), c in zip(MODES, results, strict=True)
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
