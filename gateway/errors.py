"""The gateway's errors, each rendered as an OpenAI error envelope.

    GatewayError                      status, OpenAI type and code, retry hint
     ├── InternalError                500 internal_error: a bug, never a traceback to the client
     ├── BadRequest                   400 invalid_json / invalid_request / invalid_deadline_header
     ├── AuthenticationFailed         401 invalid_api_key
     ├── ModelNotAllowed              403 model_not_allowed: the key may not use the route
     ├── ModelNotFound                404 model_not_found
     ├── RequestTooLarge              413 request_too_large
     ├── RateLimited                  429 rate_limit_exceeded: a key's quota, Retry-After and
     │                                    OpenAI's x-ratelimit-* headers (gateway.tenants)
     ├── UpstreamFailed               502 upstream_connect_error / upstream_protocol_error
     ├── Overloaded                   503 upstream_saturated / circuit_open / shutting_down /
     │                                    shared_state_unavailable (gateway.shared), Retry-After
     ├── BudgetExceeded (TimeoutError) 504 deadline_exceeded / upstream_*_timeout, with a phase
     └── UpstreamStatus               the upstream's own error status and body, passed through

`x-should-retry` tells the `openai` SDK whether its own retry could help: never for a bad
request or a spent budget (a retry would only multiply the caller's wait), yes after shedding.
Transport exceptions become these in one place: `upstream.map_transport_error`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import ClassVar, Literal

Phase = Literal["pool", "connect", "ttft", "idle", "attempt", "total"]

_TIMEOUT_CODES: dict[Phase, str] = {
    "pool": "upstream_pool_timeout",
    "connect": "upstream_connect_timeout",
    "ttft": "upstream_ttft_timeout",
    "idle": "upstream_idle_timeout",
    "attempt": "deadline_exceeded",
    "total": "deadline_exceeded",
}


class GatewayError(Exception):
    status: int = 500
    type: ClassVar[str] = "server_error"
    should_retry: bool = False

    def __init__(self, message: str, *, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.param = param

    def headers(self) -> dict[str, str]:
        return {"x-should-retry": "true" if self.should_retry else "false"}

    def body(self) -> bytes:
        return envelope(self.message, type=self.type, code=self.code, param=self.param)


class InternalError(GatewayError):
    status = 500


class BadRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    status = 401
    type = "authentication_error"


class ModelNotFound(GatewayError):
    status = 404
    type = "invalid_request_error"


class ModelNotAllowed(GatewayError):
    status = 403
    type = "permission_error"


class RateLimited(GatewayError):
    """Over a key's quota: the `openai` SDK waits for `retry-after-ms` and tries again."""

    status = 429
    type = "rate_limit_error"
    should_retry = True

    def __init__(self, message: str, *, limit: str, headers: Mapping[str, str]) -> None:
        super().__init__(message, code="rate_limit_exceeded")
        self.limit = limit  # requests, tokens or concurrent
        self.limit_headers = dict(headers)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.limit_headers}


class RequestTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"


class UpstreamFailed(GatewayError):
    """The upstream refused, reset, or spoke something that is not HTTP/OpenAI."""

    status = 502
    type = "upstream_error"


class Overloaded(GatewayError):
    status = 503
    type = "overloaded_error"
    should_retry = True

    def __init__(self, message: str, *, code: str, retry_after_s: int = 1) -> None:
        super().__init__(message, code=code)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {**super().headers(), "retry-after": str(self.retry_after_s)}


class BudgetExceeded(GatewayError, TimeoutError):
    status = 504
    type = "timeout_error"

    def __init__(self, phase: Phase, message: str) -> None:
        super().__init__(message, code=_TIMEOUT_CODES[phase])
        self.phase = phase


def envelope(message: str, *, type: str, code: str, param: str | None = None) -> bytes:
    error = {"message": message, "type": type, "param": param, "code": code}
    return json.dumps({"error": error}).encode()


class UpstreamStatus(GatewayError):
    """An upstream answered with an error status: relayed with its own body.

    The gateway owns retries, so the SDK is told not to repeat them, except where the upstream
    asked to be called back later (429/503 with Retry-After).
    """

    def __init__(
        self, status: int, body: bytes, headers: Mapping[str, str], passed: Mapping[str, str]
    ) -> None:
        super().__init__(f"The upstream answered {status}.", code=f"upstream_status_{status}")
        self.status = status
        self.raw_body = body
        self.content_type = headers.get("content-type", "application/json")
        self.passed = dict(passed)  # rate limits and Retry-After, for the client
        self.should_retry = "retry-after" in self.passed and status in (429, 503)

    def headers(self) -> dict[str, str]:
        return {**super().headers(), **self.passed, "content-type": self.content_type}

    def body(self) -> bytes:
        return self.raw_body
