"""The errors the gateway reports with its own codes, as exceptions that say what happened.

    TimeoutError (built-in)
     ├── DeadlineExceeded     inside deadline(): its budget ran out, on the client's clock or
     │                        the gateway's (504 deadline_exceeded, upstream_*_timeout)
     │    └── RequestDeadlineExceeded   as raised while sending or reading a request: also
     │                                  an openai.OpenAIError, so SDKs pass it through
     └── GatewayTimeout       outside deadline(): the gateway's 504 for a budget that ran out
    openai.APIError
     └── GatewayError         an error with one of the gateway's codes: code, status_code
          ├── GatewayTimeout  (also a TimeoutError, above)
          └── Overloaded      503 upstream_saturated / circuit_open / shutting_down: retry_after

A 429 over a key's quota (`rate_limit_exceeded`) stays the SDK's own `openai.RateLimitError`,
so the SDK's retries (`max_retries`) wait for its `retry-after-ms` as they do with OpenAI;
`retry_after(error.response.headers)` reads the wait when it is raised.

`except TimeoutError` catches every budget failure; `except openai.APIError` keeps catching
everything the gateway answers. With `anthropic` installed these are `anthropic.AnthropicError`s
too: that SDK passes only its own errors through a transport unchanged (any other becomes its
`APIConnectionError`), so `async_anthropic` raises the same errors. LangChain passes these
through unchanged (it re-wraps only the SDK's own status classes). Other statuses (400, 401,
404, 502, an upstream's own error) stay the SDK's usual errors. `error_for` decides, in one
place, which error an answer becomes.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from typing import Any

import openai

from gateway_client._deadline import DeadlineExceeded
from gateway_client._http import httpx

try:
    from anthropic import AnthropicError
except ImportError:  # an optional dependency: a stand-in base that changes nothing

    class AnthropicError(Exception):  # type: ignore[no-redef]
        pass


TIMEOUT_CODES = frozenset(
    {
        "deadline_exceeded",
        "upstream_ttft_timeout",
        "upstream_idle_timeout",
        "upstream_connect_timeout",
        "upstream_pool_timeout",
    }
)
OVERLOAD_CODES = frozenset({"upstream_saturated", "circuit_open", "shutting_down"})


class RequestDeadlineExceeded(DeadlineExceeded, openai.OpenAIError, AnthropicError):
    """`DeadlineExceeded` as the HTTP transport raises it. Being an `openai.OpenAIError` too, it
    goes through every SDK version unchanged (`openai<3` wraps any other exception raised while
    sending in `APIConnectionError`, and may retry it); LangChain passes it on as well."""


class GatewayError(openai.APIError, AnthropicError):
    """The gateway answered with one of its own error codes.

    `status_code` is the HTTP status, or `None` when the error arrived as the final event of a
    stream that had already started (the status was 200 then). `request_id` is the gateway's
    `X-Request-Id`, for its logs.
    """

    code: str

    def __init__(
        self,
        message: str,
        *,
        code: str,
        request: httpx.Request,
        body: object,
        status_code: int | None,
        request_id: str | None,
    ) -> None:
        super().__init__(message, request, body=body)
        self.code = code
        self.status_code = status_code
        self.request_id = request_id


class GatewayTimeout(GatewayError, TimeoutError):
    """A budget ran out at the gateway (504) for a request made outside `deadline()`."""


class Overloaded(GatewayError):
    """The gateway shed the request (503): try again after `retry_after` seconds, if given."""

    def __init__(self, message: str, *, retry_after: float | None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.retry_after = retry_after


def error_for(
    *,
    error: Mapping[str, Any],
    request: httpx.Request,
    headers: Mapping[str, str],
    status_code: int | None,
    in_deadline: bool,
) -> Exception | None:
    """The exception for the gateway error object `error` (the envelope's `"error"`), or `None`
    when its code is not one this package maps (the SDK's own error applies then)."""
    code = error.get("code")
    if not isinstance(code, str):
        return None
    message = error.get("message")
    text = f"{message} ({code})" if isinstance(message, str) and message else code
    common: dict[str, Any] = {
        "code": code,
        "request": request,
        "body": dict(error),
        "status_code": status_code,
        "request_id": headers.get("x-request-id"),
    }
    if code in TIMEOUT_CODES:
        timeout = GatewayTimeout(text, **common)
        if not in_deadline:
            return timeout
        exceeded = RequestDeadlineExceeded(f"the gateway reported: {text}", code=code)
        exceeded.__cause__ = timeout
        return exceeded
    if code in OVERLOAD_CODES:
        return Overloaded(text, retry_after=retry_after(headers), **common)
    return None


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms`, or `Retry-After` in seconds or as an HTTP date
    (e.g. of a 429's `openai.RateLimitError`: `retry_after(error.response.headers)`)."""
    if (value := headers.get("retry-after-ms")) is not None:
        try:
            return _non_negative(float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return _non_negative(float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _non_negative(seconds: float) -> float | None:
    return max(0.0, seconds) if math.isfinite(seconds) else None
