"""The client side of llm-gateway: one deadline for a block of work, carried to the gateway.

    from gateway_client import chat_openai, deadline

    llm = chat_openai("gpt-4o")                  # LLM_GATEWAY_URL, LLM_GATEWAY_API_KEY
    async with deadline(20):                     # everything inside shares 20 s
        docs = await vector_db.search(question)  # bounded too, not only the LLM calls
        answer = await (prompt | llm).ainvoke({"docs": docs, "question": question})

Modules: `_deadline` (the context variable, `deadline`, `remaining`), `_transport` (the
header, the per-request bounds, the error mapping), `_errors` (the exception tree, drawn
there), `_factories` (clients pointed at the gateway), `_batch` (partial results).
"""

from gateway_client._batch import Completions, as_completed_within, gather_within
from gateway_client._deadline import DeadlineExceeded, DeadlineScope, deadline, remaining
from gateway_client._errors import (
    GatewayError,
    GatewayTimeout,
    Overloaded,
    RequestDeadlineExceeded,
    retry_after,
)
from gateway_client._factories import (
    anthropic_client,
    async_anthropic,
    async_http_client,
    async_openai,
    chat_openai,
    http_client,
    openai_client,
)

__all__ = [
    "Completions",
    "DeadlineExceeded",
    "DeadlineScope",
    "GatewayError",
    "GatewayTimeout",
    "Overloaded",
    "RequestDeadlineExceeded",
    "anthropic_client",
    "as_completed_within",
    "async_anthropic",
    "async_http_client",
    "async_openai",
    "chat_openai",
    "deadline",
    "gather_within",
    "http_client",
    "openai_client",
    "remaining",
    "retry_after",
]
