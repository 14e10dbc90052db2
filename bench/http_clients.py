"""httpx2 vs aiohttp as the gateway's upstream client, measured against the fast upstream.

    python -m bench.http_clients [--requests N] [--concurrency C] [--rounds R] [--json]

The upstream is `bench.fast_upstream` in a child process (raw asyncio on uvloop, far faster
than either client), so the client is what is measured. The clients run on uvloop, as in the
gateway. httpx2 gets one `AsyncClient` with `Limits(max_connections=C,
max_keepalive_connections=C)`; aiohttp one `ClientSession` with `TCPConnector(limit=C)` (and a
`DummyCookieJar`, as the gateway configures it). Both are warmed up, then measured in the same
run, rounds interleaved (httpx2, aiohttp, then aiohttp, httpx2, ...) so that drift in the
machine's load hits both alike:

    non-streaming  POST /v1/chat/completions, model `fast`: req/s, p50/p99 latency
    streaming      model `stream-64x0ms` (64 events, each in its own loop turn), stream true,
                   read chunk by chunk (`aiter_bytes()` / `content.iter_any()`): req/s,
                   chunks/s (a chunk is one read from the socket), p50/p99 latency

Ratios are aiohttp/httpx2, per round (paired), and a difference counts as significant only if
every round agrees on its direction and the mean ratio is more than 2 standard errors from 1.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial

import aiohttp
import httpx2
import uvloop

from bench._common import (
    HOST,
    REQUEST_TIMEOUT_S,
    BenchError,
    Comparison,
    Sample,
    Series,
    ServerSpec,
    compare,
    describe_error,
    exit_on_sigterm,
    free_port,
    machine,
    out,
    parse_args,
    progress,
    run_server,
    table,
)
from bench.loadgen import chat_body

LIBS = ("httpx2", "aiohttp")
VERSIONS = {"httpx2": httpx2.__version__, "aiohttp": aiohttp.__version__}
JSON_HEADERS = {"content-type": "application/json"}
_DONE = b"data: [DONE]\n\n"

# (name, model, stream)
MODES = (
    ("non-streaming", "fast", False),
    ("streaming", "stream-64x0ms", True),
)


def _check(url: str, status: int, body: bytes) -> None:
    if status != 200:
        raise BenchError(f"POST {url}: HTTP {status}: {body[:300]!r}")


def _check_done(url: str, tail: bytes, nbytes: int) -> None:
    if tail != _DONE:
        raise BenchError(f"POST {url}: the stream ended without data: [DONE] ({nbytes} bytes)")


async def httpx2_whole(client: httpx2.AsyncClient, url: str, body: bytes) -> Sample:
    """A non-streaming POST, the whole body read; latency from send to the last byte."""
    start = time.perf_counter()
    response = await client.post(url, content=body, headers=JSON_HEADERS)
    latency = time.perf_counter() - start
    _check(url, response.status_code, response.content)
    return Sample(latency_s=latency, ttfb_s=latency, chunks=1, nbytes=len(response.content))


async def httpx2_stream(client: httpx2.AsyncClient, url: str, body: bytes) -> Sample:
    """A streaming POST read with `aiter_bytes()`; checks the stream ends with `[DONE]`."""
    start = time.perf_counter()
    async with client.stream("POST", url, content=body, headers=JSON_HEADERS) as response:
        if response.status_code != 200:
            _check(url, response.status_code, await response.aread())
        return await _read_stream(url, start, response.aiter_bytes())


async def aiohttp_whole(session: aiohttp.ClientSession, url: str, body: bytes) -> Sample:
    start = time.perf_counter()
    async with session.post(url, data=body, headers=JSON_HEADERS) as response:
        content = await response.read()
    latency = time.perf_counter() - start
    _check(url, response.status, content)
    return Sample(latency_s=latency, ttfb_s=latency, chunks=1, nbytes=len(content))


async def aiohttp_stream(session: aiohttp.ClientSession, url: str, body: bytes) -> Sample:
    """A streaming POST read with `content.iter_any()` (what has arrived, per read)."""
    start = time.perf_counter()
    async with session.post(url, data=body, headers=JSON_HEADERS) as response:
        if response.status != 200:
            _check(url, response.status, await response.read())
        return await _read_stream(url, start, response.content.iter_any())


async def _read_stream(url: str, start: float, reads: AsyncIterator[bytes]) -> Sample:
    """Each read counted (the client's own chunking); the time to the first and the last."""
    ttfb = 0.0
    chunks = nbytes = 0
    tail = b""
    async for chunk in reads:
        if not chunks:
            ttfb = time.perf_counter() - start
        chunks += 1
        nbytes += len(chunk)
        tail = (tail + chunk)[-len(_DONE) :]
    latency = time.perf_counter() - start
    _check_done(url, tail, nbytes)
    return Sample(latency_s=latency, ttfb_s=ttfb, chunks=chunks, nbytes=nbytes)


async def measure(url: str, requests: int, concurrency: int, rounds: int) -> list[Comparison]:
    """One client per library, both open for the whole run (as the gateway keeps its own)."""
    timeout = REQUEST_TIMEOUT_S
    comparisons = []
    async with (
        httpx2.AsyncClient(
            limits=httpx2.Limits(
                max_connections=concurrency, max_keepalive_connections=concurrency
            ),
            timeout=httpx2.Timeout(timeout),
            trust_env=False,
        ) as client,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=concurrency),
            timeout=aiohttp.ClientTimeout(total=timeout),
            cookie_jar=aiohttp.DummyCookieJar(),
        ) as session,
    ):
        for name, model, stream in MODES:
            body = chat_body(model, stream=stream)
            calls: dict[str, Callable[[], Awaitable[Sample]]] = {
                "httpx2": partial(httpx2_stream if stream else httpx2_whole, client, url, body),
                "aiohttp": partial(aiohttp_stream if stream else aiohttp_whole, session, url, body),
            }
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
    return comparisons


def ratios(c: Comparison) -> dict[str, float]:
    """aiohttp/httpx2: req/s and chunks/s as the median of per-round ratios; latency pooled."""
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
            f"aiohttp/httpx2: req/s x{r['rps']:.3f} (rounds {paired.low:.3f}..{paired.high:.3f}), "
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
        faster, by = ("aiohttp", ratio) if ratio >= 1 else ("httpx2", 1 / ratio)
        verdict = "significant" if c.verdict().significant else "within noise"
        parts.append(f"{c.name}: {faster} faster by {_pct(by)} req/s ({verdict})")
    significant = [c for c in comparisons if c.verdict().significant]
    directions = {c.rps_ratio() > 1 for c in significant}
    if not significant:
        overall = "no difference beyond noise between httpx2 and aiohttp"
    elif len(significant) == len(comparisons) and len(directions) == 1:
        overall = f"{'aiohttp' if directions.pop() else 'httpx2'} is faster in both modes"
    else:
        overall = "mixed: see the per-mode verdicts"
    return f"SUMMARY: {'; '.join(parts)} -> {overall}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(
        "python -m bench.http_clients",
        "httpx2 vs aiohttp against the fast upstream.",
        requests=800,
        concurrency=8,
        rounds=6,
        argv=argv,
    )
    exit_on_sigterm()
    port = free_port()
    progress(f"starting the fast upstream on {HOST}:{port} ...")
    upstream = ServerSpec(
        "fast upstream",
        [sys.executable, "-m", "bench.fast_upstream", "--port", str(port)],
        f"http://{HOST}:{port}",
        "/healthz",
    )
    try:
        with run_server(upstream) as server:
            url = f"{server.url}/v1/chat/completions"
            results = uvloop.run(measure(url, args.requests, args.concurrency, args.rounds))
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
                    "ratio_aiohttp_over_httpx2": ratios(c),
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
