"""The seed article's orchestration engine, rewritten on `gateway_client`.

The original wrapped `chain.ainvoke` in `asyncio.wait_for(..., timeout=20.0)` on top of a
model built with `timeout=15.0, max_retries=2`: three clocks that do not know about each
other, and a vector-database lookup outside all of them. Here one `deadline()` covers the
whole block, the lookup included; the gateway receives what is left of it with every call
(`X-Request-Timeout-Ms`), so it answers a clear error before the caller's clock runs out; and
the synchronous form (`--sync`) bounds each request the same way.

Against the built-in demo (`llm-gateway serve` in another terminal):

    export LLM_GATEWAY_URL=http://127.0.0.1:8080/v1
    python examples/orchestration.py                          # an answer
    python examples/orchestration.py --model demo-hang --budget 2    # the fallback, after 2 s
    python examples/orchestration.py --db-delay 5 --budget 2         # a stalled vector database
    python examples/orchestration.py --model demo-stall --stream     # tokens, then the stall
    python examples/orchestration.py --model demo-hang --budget 2 --sync
"""

from __future__ import annotations

import argparse
import asyncio
import time

from gateway_client import DeadlineExceeded, GatewayTimeout, chat_openai, deadline
from langchain_core.language_models import BaseChatModel
from langchain_core.prompts import ChatPromptTemplate

PROMPT = ChatPromptTemplate.from_template(
    "Analyze infrastructure logs: {logs}\nRelated incidents: {incidents}"
)
FALLBACK = "Error: Downstream AI orchestration exceeded its execution time budget."


async def search_incidents(logs: str, *, delay_s: float) -> list[str]:
    """Stands for a vector-database query (Pinecone, Chroma): any awaitable is bounded."""
    await asyncio.sleep(delay_s)
    return ["INC-1042 disk pressure on db-3", "INC-0977 connection pool exhausted"]


async def safe_agent_execution(
    llm: BaseChatModel, user_input: str, *, budget_s: float = 20.0, db_delay_s: float = 0.1
) -> str:
    try:
        async with deadline(budget_s):  # one budget for everything below
            incidents = await search_incidents(user_input, delay_s=db_delay_s)
            response = await (PROMPT | llm).ainvoke(
                {"logs": user_input, "incidents": "; ".join(incidents)}
            )
            return str(response.content)
    except DeadlineExceeded:
        return FALLBACK


def safe_agent_execution_sync(llm: BaseChatModel, user_input: str, *, budget_s: float) -> str:
    """The same for synchronous code: each request made inside is bounded by what is left."""
    try:
        with deadline(budget_s):
            response = (PROMPT | llm).invoke({"logs": user_input, "incidents": "none"})
            return str(response.content)
    except DeadlineExceeded:
        return FALLBACK


async def stream_analysis(llm: BaseChatModel, user_input: str, *, budget_s: float) -> None:
    """Tokens as they come; a stall or the deadline ends the stream with an error, never a
    hang, and never a cut stream that looks complete."""
    try:
        async with deadline(budget_s):
            async for chunk in (PROMPT | llm).astream({"logs": user_input, "incidents": "none"}):
                print(chunk.content, end="", flush=True)
        print()
    except (DeadlineExceeded, GatewayTimeout) as error:
        print(f"\n[the stream ended early: {error.code or 'the deadline passed'}]")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--budget", type=float, default=20.0)
    parser.add_argument("--db-delay", type=float, default=0.1)
    parser.add_argument("--sync", action="store_true", help="the synchronous form")
    parser.add_argument("--stream", action="store_true", help="stream the answer")
    args = parser.parse_args()
    llm = chat_openai(args.model)
    logs = "03:12 db-3 p99 latency 4.2s; 03:13 pool wait 30s; 03:14 504s on /checkout"

    started = time.monotonic()
    if args.stream:
        asyncio.run(stream_analysis(llm, logs, budget_s=args.budget))
    elif args.sync:
        print(safe_agent_execution_sync(llm, logs, budget_s=args.budget))
    else:
        answer = safe_agent_execution(llm, logs, budget_s=args.budget, db_delay_s=args.db_delay)
        print(asyncio.run(answer))
    print(f"({time.monotonic() - started:.2f} s)")


if __name__ == "__main__":
    main()
