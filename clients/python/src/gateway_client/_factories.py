"""Clients pointed at the gateway: `openai`, LangChain's `ChatOpenAI`, `anthropic` (for
/v1/messages), or a bare HTTP client.

Each one gets the gateway's URL and key (arguments, else `LLM_GATEWAY_URL` and
`LLM_GATEWAY_API_KEY`, read when the client is made), an explicit finite timeout, no SDK
retries (the gateway retries and falls back, inside the budget, before anything reached you:
SDK retries on top would only multiply the wait) and a transport that carries `deadline()`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import openai

from gateway_client._http import httpx
from gateway_client._transport import AsyncDeadlineTransport, DeadlineTransport

if TYPE_CHECKING:
    from anthropic import Anthropic, AsyncAnthropic
    from langchain_openai import ChatOpenAI

URL_ENV = "LLM_GATEWAY_URL"
API_KEY_ENV = "LLM_GATEWAY_API_KEY"
DEFAULT_URL = "http://127.0.0.1:8080/v1"
NO_KEY = "no-key"  # the SDK insists on a key; a gateway without `auth` ignores it

# Per operation, as HTTP timeouts are: connecting, and each wait for bytes. 120 s is the
# gateway's default route budget, and the SDK sends the read timeout to the gateway
# (`x-stainless-read-timeout`), so the gateway, which knows which phase stalled, answers a
# 504 first. Use `deadline()` for a bound on the whole call.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)
# An idle connection is dropped after 4 s, before the gateway closes it (`keepalive_s`, 5 s by
# default): at equal timeouts a request could go out on a connection the gateway was closing,
# and fail with a connection error that nothing retries (`max_retries=0`).
DEFAULT_LIMITS = httpx.Limits(
    max_connections=1000, max_keepalive_connections=100, keepalive_expiry=4.0
)


def gateway_url(base_url: str | None = None) -> str:
    """The gateway's OpenAI base URL: `base_url`, else `$LLM_GATEWAY_URL`, else the local
    default. It includes `/v1`; a URL with no path at all gets `/v1` added."""
    url = (base_url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
    if urlsplit(url).path == "":
        url += "/v1"
    return url


def gateway_api_key(api_key: str | None = None) -> str:
    return api_key or os.environ.get(API_KEY_ENV) or NO_KEY


def async_http_client(
    *,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    limits: httpx.Limits = DEFAULT_LIMITS,
    transport: httpx.AsyncBaseTransport | None = None,
) -> httpx.AsyncClient:
    """An async HTTP client (of the library `openai` uses) that carries `deadline()`.

    For SDKs and wrappers you configure yourself, e.g.
    `ChatOpenAI(..., http_async_client=async_http_client())`. `transport` is the transport to
    wrap, for proxies or TLS settings; by default the library's own, with `limits`.
    """
    inner = transport if transport is not None else httpx.AsyncHTTPTransport(limits=limits)
    return httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        follow_redirects=True,
        transport=AsyncDeadlineTransport(inner),
    )


def http_client(
    *,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    limits: httpx.Limits = DEFAULT_LIMITS,
    transport: httpx.BaseTransport | None = None,
) -> httpx.Client:
    """The synchronous twin of `async_http_client`."""
    inner = transport if transport is not None else httpx.HTTPTransport(limits=limits)
    return httpx.Client(
        timeout=timeout,
        limits=limits,
        follow_redirects=True,
        transport=DeadlineTransport(inner),
    )


def async_openai(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 0,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: Any,
) -> openai.AsyncOpenAI:
    """An `openai.AsyncOpenAI` pointed at the gateway; other arguments go to the SDK."""
    _refuse_http_client(kwargs)
    return openai.AsyncOpenAI(
        base_url=gateway_url(base_url),
        api_key=gateway_api_key(api_key),
        timeout=timeout,
        max_retries=max_retries,
        http_client=async_http_client(timeout=timeout, transport=transport),
        **kwargs,
    )


def openai_client(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 0,
    transport: httpx.BaseTransport | None = None,
    **kwargs: Any,
) -> openai.OpenAI:
    """An `openai.OpenAI` (synchronous) pointed at the gateway; other arguments go to the SDK."""
    _refuse_http_client(kwargs)
    return openai.OpenAI(
        base_url=gateway_url(base_url),
        api_key=gateway_api_key(api_key),
        timeout=timeout,
        max_retries=max_retries,
        http_client=http_client(timeout=timeout, transport=transport),
        **kwargs,
    )


def chat_openai(
    model: str,
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 0,
    **kwargs: Any,
) -> ChatOpenAI:
    """A LangChain `ChatOpenAI` for the gateway's route `model`, usable with `invoke`,
    `ainvoke`, `stream`, `astream` and `batch`; other arguments go to `ChatOpenAI`.

    Needs `langchain-openai` (`pip install 'llm-gateway-client[langchain]'`).
    """
    from langchain_openai import ChatOpenAI
    from pydantic import SecretStr

    if "http_client" in kwargs or "http_async_client" in kwargs:
        raise TypeError("chat_openai() builds its own HTTP clients; use ChatOpenAI directly")
    # LangChain's own per-chunk timer duplicates the gateway's `idle_s`, and it re-labels any
    # TimeoutError raised by the stream (ours included) as its own "no chunk for 120 s".
    kwargs.setdefault("stream_chunk_timeout", None)
    return ChatOpenAI(
        model=model,
        base_url=gateway_url(base_url),
        api_key=SecretStr(gateway_api_key(api_key)),
        timeout=timeout,
        max_retries=max_retries,
        http_client=http_client(timeout=timeout),
        http_async_client=async_http_client(timeout=timeout),
        **kwargs,
    )


def async_anthropic(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 0,
    transport: httpx.AsyncBaseTransport | None = None,
    **kwargs: Any,
) -> AsyncAnthropic:
    """An `anthropic.AsyncAnthropic` for the gateway's Messages API (`/v1/messages`), carrying
    `deadline()` as `async_openai` does; the gateway's errors (Anthropic-shaped there) become
    this package's. `base_url` is the gateway's, with or without `/v1` (the SDK adds it).

    Needs `anthropic` (`pip install 'llm-gateway-client[anthropic]'`) on the same HTTP
    library as the installed `openai` (`httpx2` for both of today's versions).
    """
    import anthropic

    _refuse_http_client(kwargs)
    return anthropic.AsyncAnthropic(
        base_url=gateway_url(base_url).removesuffix("/v1"),
        api_key=gateway_api_key(api_key),
        timeout=timeout,
        max_retries=max_retries,
        http_client=async_http_client(timeout=timeout, transport=transport),
        **kwargs,
    )


def anthropic_client(
    *,
    base_url: str | None = None,
    api_key: str | None = None,
    timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
    max_retries: int = 0,
    transport: httpx.BaseTransport | None = None,
    **kwargs: Any,
) -> Anthropic:
    """The synchronous twin of `async_anthropic`."""
    import anthropic

    _refuse_http_client(kwargs)
    return anthropic.Anthropic(
        base_url=gateway_url(base_url).removesuffix("/v1"),
        api_key=gateway_api_key(api_key),
        timeout=timeout,
        max_retries=max_retries,
        http_client=http_client(timeout=timeout, transport=transport),
        **kwargs,
    )


def _refuse_http_client(kwargs: dict[str, Any]) -> None:
    if "http_client" in kwargs:
        raise TypeError(
            "this factory builds the HTTP client that carries the deadline; pass `transport=` "
            "to change how it connects"
        )
