"""The seed article's financial analyzer, rewritten on `gateway_client`.

The original built a `ChatOpenAI(model="gpt-4o")` per chunk with no timeout and waited on
`asyncio.gather(*tasks, return_exceptions=True)`: one stalled call held the whole batch, its
socket and, upstream, its GPU. Here the batch has one budget. What finishes in time is kept,
the stragglers are cancelled (the gateway sees the disconnect and stops the upstream work)
and reported; `--stream` prints each result as it arrives instead (the seed's "Solution 3",
`asyncio.as_completed`, for a UI that shows partial results).

Against the built-in demo (`llm-gateway serve` in another terminal; `demo-hang` never
answers, so `--stragglers 3` shows three calls cut off at the budget):

    export LLM_GATEWAY_URL=http://127.0.0.1:8080/v1
    python examples/financial_analyzer.py --chunks 10 --stragglers 3 --budget 2
    python examples/financial_analyzer.py --chunks 10 --stragglers 3 --budget 2 --stream
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Awaitable, Sequence

from gateway_client import DeadlineExceeded, as_completed_within, chat_openai, gather_within
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate

PROMPT = ChatPromptTemplate.from_template("Extract metrics from this data: {data}")


async def extract_financial_metrics(llm: BaseChatModel, document_chunk: str) -> str:
    """One chunk. No timeout here: the caller's budget bounds it, whatever it awaits."""
    message = await (PROMPT | llm).ainvoke({"data": document_chunk})
    return str(message.content)


def analyses(
    chunks: Sequence[str], *, llm: BaseChatModel, slow: BaseChatModel, stragglers: int = 0
) -> list[Awaitable[str]]:
    """A call per chunk; the last `stragglers` chunks go to the `slow` model instead."""
    first_straggler = len(chunks) - stragglers
    return [
        extract_financial_metrics(slow if index >= first_straggler else llm, chunk)
        for index, chunk in enumerate(chunks)
    ]


async def run_parallel_analysis(
    calls: Sequence[Awaitable[str]], *, budget_s: float
) -> list[str | BaseException]:
    """Every chunk's metrics or its error, in order, within `budget_s` (at most 8 at once)."""
    return await gather_within(budget_s, *calls, limit=8)


def describe(outcome: str | BaseException) -> str:
    if isinstance(outcome, DeadlineExceeded):
        return "cut off at the deadline"
    if isinstance(outcome, BaseException):
        return f"failed: {outcome!r}"
    return f"ok: {outcome}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--chunks", type=int, default=10)
    parser.add_argument("--stragglers", type=int, default=0)
    parser.add_argument("--budget", type=float, default=5.0, help="seconds for the whole batch")
    parser.add_argument("--stream", action="store_true", help="print results as they arrive")
    args = parser.parse_args()
    chunks = [f"Q{i % 4 + 1} revenue {10 + i}.0M, margin {20 + i}%" for i in range(args.chunks)]
    # The clients are built once, as an app does at start-up (each costs tens of ms: TLS
    # certificates, lazy imports); the budget is for the batch. One client per model, shared
    # by its calls, so their connections are reused.
    llm = chat_openai(args.model)
    slow = chat_openai("demo-hang") if args.stragglers else llm
    calls = analyses(chunks, llm=llm, slow=slow, stragglers=args.stragglers)

    started = time.monotonic()
    if args.stream:
        outcomes: dict[int, str | BaseException] = {}
        async for index, outcome in as_completed_within(args.budget, calls, limit=8):
            outcomes[index] = outcome
            print(f"{time.monotonic() - started:5.2f}s chunk {index}: {describe(outcome)}")
        results = [outcomes[index] for index in range(len(chunks))]
        elapsed = time.monotonic() - started
    else:
        results = await run_parallel_analysis(calls, budget_s=args.budget)
        elapsed = time.monotonic() - started
        for index, outcome in enumerate(results):
            print(f"chunk {index}: {describe(outcome)}")
    done = sum(not isinstance(outcome, BaseException) for outcome in results)
    print(f"{done} of {len(chunks)} chunks analysed in {elapsed:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
