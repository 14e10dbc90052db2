"""How requests are built and answers read, against `httpx2.MockTransport` (no sockets): the
deadline header, the per-request timeouts, and the error mapping, including chunk boundaries
in a stream. The same code runs against a real gateway in the other test modules."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext

import httpx2
import openai
import pytest

from gateway_client import (
    DeadlineExceeded,
    GatewayError,
    GatewayTimeout,
    Overloaded,
    async_http_client,
    deadline,
    http_client,
    openai_client,
)
from gateway_client._transport import Budget, ErrorEventScanner

Handler = Callable[[httpx2.Request], httpx2.Response]


def recording(seen: list[httpx2.Request], response: httpx2.Response | None = None) -> Handler:
    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return response if response is not None else httpx2.Response(200, json={"ok": True})

    return handle


def client(handler: Handler, timeout: float | httpx2.Timeout = 120.0) -> httpx2.Client:
    return http_client(timeout=timeout, transport=httpx2.MockTransport(handler))


def test_no_header_and_the_clients_own_timeouts_outside_a_deadline() -> None:
    seen: list[httpx2.Request] = []
    client(recording(seen), timeout=httpx2.Timeout(120, connect=5)).get("http://gw/v1/models")
    assert "x-request-timeout-ms" not in seen[0].headers
    assert seen[0].extensions["timeout"] == {"connect": 5, "read": 120, "write": 120, "pool": 120}


def test_the_header_is_the_whole_milliseconds_left_and_shrinks() -> None:
    seen: list[httpx2.Request] = []
    http = client(recording(seen))
    with deadline(2):
        http.get("http://gw/v1/models")
        time.sleep(0.05)
        http.get("http://gw/v1/models")
    first, second = (int(request.headers["x-request-timeout-ms"]) for request in seen)
    assert 1900 < first <= 2000
    assert second <= first - 50


def test_timeouts_are_bounded_by_what_is_left() -> None:
    seen: list[httpx2.Request] = []
    with deadline(1):
        client(recording(seen), timeout=httpx2.Timeout(120, connect=0.5)).get("http://gw/")
    timeouts = seen[0].extensions["timeout"]
    assert timeouts["connect"] == 0.5  # already tighter than the deadline
    for phase in ("read", "write", "pool"):
        assert 0.9 < timeouts[phase] <= 1


def test_a_callers_own_tighter_header_stands() -> None:
    seen: list[httpx2.Request] = []
    with deadline(5):
        client(recording(seen)).get("http://gw/", headers={"X-Request-Timeout-Ms": "300"})
    assert seen[0].headers["x-request-timeout-ms"] == "300"


def test_nothing_is_sent_once_the_deadline_has_passed() -> None:
    seen: list[httpx2.Request] = []
    with deadline(0.01):
        time.sleep(0.02)
        with pytest.raises(DeadlineExceeded):
            client(recording(seen)).get("http://gw/")
    assert seen == []


def test_the_sdk_sends_the_header_through_the_factory() -> None:
    seen: list[httpx2.Request] = []
    completion = {
        "id": "x",
        "object": "chat.completion",
        "created": 0,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "finish_reason": "stop",
                "message": {"role": "assistant", "content": "hi"},
            }
        ],
    }
    sdk = openai_client(
        base_url="http://gw/v1",
        transport=httpx2.MockTransport(recording(seen, httpx2.Response(200, json=completion))),
    )
    with deadline(3):
        sdk.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    request = seen[0]
    assert str(request.url) == "http://gw/v1/chat/completions"
    assert 2900 < int(request.headers["x-request-timeout-ms"]) <= 3000
    assert request.headers["authorization"] == "Bearer no-key"
    assert request.extensions["timeout"]["read"] <= 3


def gateway_error(status: int, code: str, **headers: str) -> httpx2.Response:
    body = {"error": {"message": f"it went {code}", "type": "x", "param": None, "code": code}}
    return httpx2.Response(status, json=body, headers={"x-request-id": "req-1", **headers})


@pytest.mark.parametrize(
    "code",
    [
        "deadline_exceeded",
        "upstream_ttft_timeout",
        "upstream_idle_timeout",
        "upstream_connect_timeout",
        "upstream_pool_timeout",
    ],
)
def test_a_504_budget_code_is_a_gateway_timeout_outside_a_deadline(code: str) -> None:
    http = client(lambda _: gateway_error(504, code))
    with pytest.raises(GatewayTimeout) as caught:
        http.get("http://gw/")
    error = caught.value
    assert isinstance(error, TimeoutError)
    assert isinstance(error, openai.APIError)
    assert (error.code, error.status_code, error.request_id) == (code, 504, "req-1")
    assert code in str(error)


def test_a_504_budget_code_is_deadline_exceeded_inside_one() -> None:
    http = client(lambda _: gateway_error(504, "upstream_ttft_timeout"))
    with pytest.raises(DeadlineExceeded) as caught, deadline(5):
        http.get("http://gw/")
    assert caught.value.code == "upstream_ttft_timeout"
    assert isinstance(caught.value.__cause__, GatewayTimeout)


@pytest.mark.parametrize("code", ["upstream_saturated", "circuit_open"])
@pytest.mark.parametrize("in_deadline", [False, True])
def test_a_503_shed_is_overloaded_with_retry_after(code: str, in_deadline: bool) -> None:
    http = client(lambda _: gateway_error(503, code, **{"retry-after": "3"}))
    with pytest.raises(Overloaded) as caught, deadline(5) if in_deadline else nullcontext():
        http.get("http://gw/")
    assert (caught.value.code, caught.value.retry_after) == (code, 3.0)


def test_other_errors_are_left_to_the_sdk() -> None:
    upstreams_own = httpx2.Response(503, json={"error": {"code": "server_overloaded"}})
    assert client(lambda _: upstreams_own).get("http://gw/").status_code == 503
    not_json = httpx2.Response(504, text="Gateway Timeout")
    assert client(lambda _: not_json).get("http://gw/").text == "Gateway Timeout"


def sse(*events: bytes, split_every: int) -> Handler:
    """A stream whose bytes arrive in chunks of `split_every`, cutting events anywhere."""
    data = b"".join(events)

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), split_every):
            yield data[start : start + split_every]

    return lambda _: httpx2.Response(
        200, headers={"content-type": "text/event-stream"}, content=chunks()
    )


TOKEN = b'data: {"choices": [{"delta": {"content": "error"}}]}\n\n'
IDLE = b'data: {"error": {"message": "stalled", "code": "upstream_idle_timeout"}}\n\n'
PROTOCOL = b'data: {"error": {"message": "nonsense", "code": "upstream_protocol_error"}}\n\n'


@pytest.mark.parametrize("split_every", [1, 7, 1000])
def test_a_final_error_event_is_raised_after_the_tokens_before_it(split_every: int) -> None:
    http = client(sse(TOKEN, TOKEN, IDLE, split_every=split_every))
    received: list[bytes] = []
    with pytest.raises(GatewayTimeout) as caught, http.stream("POST", "http://gw/") as response:
        received.extend(response.iter_bytes())
    assert b"".join(received) == TOKEN + TOKEN
    assert caught.value.code == "upstream_idle_timeout"
    assert caught.value.status_code is None


def test_an_unmapped_error_event_is_passed_on_for_the_sdk() -> None:
    http = client(sse(TOKEN, PROTOCOL, split_every=5))
    with http.stream("POST", "http://gw/") as response:
        assert b"".join(response.iter_bytes()) == TOKEN + PROTOCOL


def test_the_scanner_keeps_an_incomplete_line_until_it_ends() -> None:
    scanner = ErrorEventScanner(httpx2.Request("POST", "http://gw/"), {}, Budget())
    assert scanner.feed(b'data: {"a"') == (b"", None)
    assert scanner.feed(b": 1}\n\n: keep") == (b'data: {"a": 1}\n\n', None)
    assert scanner.flush() == b": keep"


@pytest.mark.anyio
async def test_the_async_client_maps_the_same_way() -> None:
    seen: list[httpx2.Request] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        seen.append(request)
        return gateway_error(504, "deadline_exceeded")

    async with async_http_client(transport=httpx2.MockTransport(handle)) as http:
        with pytest.raises(GatewayTimeout):
            await http.get("http://gw/")
        async with deadline(2):
            with pytest.raises(DeadlineExceeded):
                await http.get("http://gw/")
    assert "x-request-timeout-ms" not in seen[0].headers
    assert 1900 < int(seen[1].headers["x-request-timeout-ms"]) <= 2000


def test_gateway_errors_are_openai_errors() -> None:
    assert issubclass(GatewayError, openai.APIError)
    assert issubclass(Overloaded, GatewayError)
    assert not issubclass(Overloaded, TimeoutError)


def test_the_gateway_imports_neither_this_package_nor_the_sdks() -> None:
    """DESIGN §8: the client is a separate distribution; `import gateway` stays lean."""
    check = (
        "import sys, gateway.app, gateway.cli; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'gateway_client', 'langchain_core', 'langchain_openai', 'openai'}))"
    )
    output = subprocess.run(
        [sys.executable, "-c", check], capture_output=True, text=True, check=True
    ).stdout
    assert output.strip() == "[]"
