"""End to end through real sockets: the openai SDK → gateway (uvicorn) → simulator (uvicorn)."""

from __future__ import annotations

import json
import logging
import socket
from typing import Any

import anyio
import httpx2 as httpx
import openai
import pytest

from gateway.config import UpstreamConfig
from gateway.relay import Relay
from gateway.upstream import mask_secrets
from tests.conftest import CHAT, GatewayFactory, LiveServer, Simulator, one_route, raw_http, sdk

pytestmark = pytest.mark.anyio


def post(server: LiveServer, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", timeout=10, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    assert response.headers["x-should-retry"] in ("true", "false")
    return error


# --- the happy paths, through the real SDK -------------------------------------------------


async def test_chat_non_streaming(gateway: GatewayFactory, simulator: Simulator) -> None:
    server = gateway(one_route("gpt-x", target_model="sim@tokens=5"))
    async with sdk(server) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-x", messages=CHAT, extra_headers={"x-request-id": "req-123"}
        )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert raw.headers["x-request-id"] == "req-123"
    assert raw.headers["x-gateway-upstream"] == "sim"
    assert raw.headers["x-gateway-attempts"] == "1"
    timing = raw.headers["server-timing"]
    for phase in ("queue", "upstream", "ttft", "total"):
        assert f"{phase};dur=" in timing
    seen = simulator.stats()
    assert seen["last_body"]["model"] == "sim@tokens=5"  # the target's model, the rest unchanged
    assert seen["last_body"]["messages"] == CHAT
    assert "authorization" not in seen["last_headers"]  # the client's key never goes upstream


def test_the_upstream_gets_the_clients_values_exactly(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    """Integers past 64 bits stay integers (NaN: tests/test_jsonbody.py): only `model` changes."""
    server = gateway(one_route("gpt-x", target_model="sim@tokens=1"))
    body = b'{"model": "gpt-x", "messages": [], "seed": 123456789012345678901234567890}'
    assert post(server, "/v1/chat/completions", content=body).status_code == 200
    sent = simulator.stats()["last_body"]
    assert sent == {
        "model": "sim@tokens=1",
        "messages": [],
        "seed": 123456789012345678901234567890,
        "stream": True,  # asked as a stream, so the stream guards apply (tests/test_resilience.py)
        "stream_options": {"include_usage": True},
    }


async def test_upstream_key_from_config_replaces_the_clients(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    server = gateway(one_route(upstream={"api_key": "${UP_KEY}"}), env={"UP_KEY": "sk-upstream"})
    async with sdk(server, api_key="sk-client") as client:
        await client.chat.completions.create(model="m", messages=CHAT)
    assert simulator.stats()["last_headers"]["authorization"] == "Bearer sk-upstream"


async def test_chat_streaming_relays_every_token(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@tokens=7,gap-ms=10"))
    async with sdk(server) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        pieces = [chunk.choices[0].delta.content async for chunk in stream if chunk.choices]
    assert len([p for p in pieces if p]) == 7


async def test_streaming_events_arrive_as_they_are_produced(gateway: GatewayFactory) -> None:
    """No buffering: with 300 ms between tokens, the chunks reach the client spread out."""
    server = gateway(one_route(target_model="sim@tokens=4,gap-ms=300"))
    arrivals: list[float] = []
    async with sdk(server) as client:
        stream = await client.chat.completions.create(model="m", messages=CHAT, stream=True)
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                arrivals.append(anyio.current_time())
    assert len(arrivals) == 4
    assert arrivals[-1] - arrivals[0] > 0.6  # three gaps of 300 ms, with slack


async def test_completions_both_modes(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@tokens=3"))
    async with sdk(server) as client:
        completion = await client.completions.create(model="m", prompt="hi")
        assert completion.choices[0].text
        stream = await client.completions.create(model="m", prompt="hi", stream=True)
        texts = [chunk.choices[0].text async for chunk in stream if chunk.choices]
    assert len([t for t in texts if t]) == 3


async def test_embeddings(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    async with sdk(server) as client:
        result = await client.embeddings.create(model="m", input=["a", "b"])
    assert len(result.data) == 2
    assert result.data[0].embedding


def test_embeddings_ignore_a_stream_flag(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    response = post(server, "/v1/embeddings", json={"model": "m", "input": "a", "stream": True})
    assert response.status_code == 200
    assert response.json()["data"][0]["embedding"]


def test_errors_carry_request_id_and_server_timing(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    response = post(server, "/v1/chat/completions", content=b"{", headers={"x-request-id": "r1"})
    assert response.status_code == 400
    assert response.headers["x-request-id"] == "r1"
    assert "total;dur=" in response.headers["server-timing"]


async def test_models_lists_the_routes(gateway: GatewayFactory) -> None:
    data = one_route("first")
    data["routes"].append({"model": "second", "targets": [{"upstream": "sim"}]})
    server = gateway(data)
    async with sdk(server) as client:
        models = [model.id async for model in client.models.list()]
    assert models == ["first", "second"]


# --- auth -----------------------------------------------------------------------------------


def test_auth_rejects_missing_and_wrong_keys(gateway: GatewayFactory) -> None:
    data = one_route()
    data["auth"] = {"keys": [{"name": "team-a", "key": "${TEAM_KEY}"}]}
    server = gateway(data, env={"TEAM_KEY": "sk-team"})
    body = {"model": "m", "messages": CHAT}
    right = {"authorization": "Bearer sk-team"}
    assert_error(post(server, "/v1/chat/completions", json=body), 401, "invalid_api_key")
    wrong = {"authorization": "Bearer sk-other"}
    assert_error(
        post(server, "/v1/chat/completions", json=body, headers=wrong), 401, "invalid_api_key"
    )
    for path in ("/v1/models", "/debug/inflight"):
        assert_error(httpx.get(f"{server.url}{path}", timeout=5), 401, "invalid_api_key")
        assert httpx.get(f"{server.url}{path}", headers=right, timeout=5).status_code == 200
    assert post(server, "/v1/chat/completions", json=body, headers=right).status_code == 200


# --- bad input: each its own clear error ----------------------------------------------------


@pytest.mark.parametrize(
    ("body", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_request", None),
        (b'{"messages": []}', "invalid_request", "model"),
        (b'{"model": 3}', "invalid_request", "model"),
        (b'{"model": "m", "stream": "yes"}', "invalid_request", "stream"),
    ],
)
def test_bad_request_bodies(
    gateway: GatewayFactory, body: bytes, code: str, param: str | None, simulator: Simulator
) -> None:
    server = gateway(one_route())
    error = assert_error(post(server, "/v1/chat/completions", content=body), 400, code)
    assert error["param"] == param
    assert simulator.stats()["total"] == 0


def test_unknown_model_is_404(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    response = post(server, "/v1/chat/completions", json={"model": "nope", "messages": CHAT})
    error = assert_error(response, 404, "model_not_found")
    assert "nope" in error["message"]
    assert response.headers["x-should-retry"] == "false"


def test_unknown_path_and_method_get_envelopes(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    assert_error(post(server, "/v1/nothing-here", json={}), 404, "not_found")
    assert_error(
        httpx.get(f"{server.url}/v1/chat/completions", timeout=5), 405, "method_not_allowed"
    )


def test_declared_oversized_body_is_413_before_reading_it(gateway: GatewayFactory) -> None:
    server = gateway(one_route(server={"max_body_bytes": 1000}))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: 1000000000\r\n\r\n"
    )
    answer = raw_http(server, head, [b"{"])  # 1 byte of a declared gigabyte
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"request_too_large"' in answer


def test_chunked_oversized_body_is_413_without_reading_it_all(gateway: GatewayFactory) -> None:
    server = gateway(one_route(server={"max_body_bytes": 1000}))
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"transfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"400\r\n" + b"x" * 1024 + b"\r\n"  # 1 KiB chunks; we send 2 and never finish
    answer = raw_http(server, head, [chunk, chunk])
    assert answer.startswith(b"HTTP/1.1 413")


# --- upstream failures ----------------------------------------------------------------------


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def test_refused_connection_is_502(gateway: GatewayFactory) -> None:
    data = one_route()
    data["upstreams"][0]["base_url"] = f"http://127.0.0.1:{closed_port()}/v1"
    server = gateway(data)
    response = post(server, "/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert_error(response, 502, "upstream_connect_error")
    assert response.headers["x-gateway-upstream"] == "sim"


@pytest.mark.parametrize(
    ("target", "stream"),
    [
        ("sim@malformed=json", False),  # a whole body (the route below does not stream upstream)
        ("sim@malformed=sse", False),  # streamed upstream, assembled
        ("sim@malformed=sse", True),
        ("sim@reset=after-headers", True),
        ("sim@reset=after-2", False),
    ],
)
def test_upstream_garbage_is_502(gateway: GatewayFactory, target: str, stream: bool) -> None:
    data = one_route(target_model=target)
    data["routes"][0]["upstream_stream"] = "json" not in target
    server = gateway(data)
    body = {"model": "m", "messages": CHAT, "stream": stream}
    assert_error(post(server, "/v1/chat/completions", json=body), 502, "upstream_protocol_error")


@pytest.mark.parametrize("status", [400, 401, 429, 500, 503])
def test_upstream_error_status_passes_through(gateway: GatewayFactory, status: int) -> None:
    server = gateway(one_route(target_model=f"sim@status={status},retry-after=7"))
    response = post(server, "/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert response.status_code == status
    assert response.headers["retry-after"] == "7"
    assert "error" in response.json()  # the upstream's own body
    expected_retry = "true" if status in (429, 503) else "false"
    assert response.headers["x-should-retry"] == expected_retry


async def test_sdk_sees_upstream_error_as_its_own_exception(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@status=400"))
    async with sdk(server, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError):
            await client.chat.completions.create(model="m", messages=CHAT)


def test_health_and_readiness(gateway: GatewayFactory) -> None:
    server = gateway(one_route())
    assert httpx.get(f"{server.url}/healthz", timeout=5).json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/readyz", timeout=5).json() == {"ready": True}
    debug = httpx.get(f"{server.url}/debug/inflight", timeout=5).json()
    assert debug["inflight"] == []
    assert debug["pools"]["sim"]["admitted"] == 0


def test_streams_report_every_phase_in_server_timing(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@tokens=2"))
    response = post(server, "/v1/chat/completions", json={"model": "m", "stream": True})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    timing = response.headers["server-timing"]
    for phase in ("queue", "upstream", "ttft", "total"):
        assert f"{phase};dur=" in timing
    assert response.text.rstrip().endswith("data: [DONE]")


def test_a_bug_is_a_500_envelope_with_an_access_line(
    gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No bug can be made real from outside, so one is planted: the client still gets the
    OpenAI envelope and the request is still logged."""
    server = gateway(one_route())

    async def broken(self: Relay) -> None:
        raise RuntimeError("planted")

    monkeypatch.setattr(Relay, "run", broken)
    with caplog.at_level(logging.INFO, logger="gateway.access"):
        response = post(server, "/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert_error(response, 500, "internal_error")
    assert "planted" not in response.text
    assert response.headers["x-request-id"]
    access = [r.getMessage() for r in caplog.records if r.name == "gateway.access"]
    assert any("status=500 outcome=internal_error" in line for line in access), access


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: %d\r\nTransfer-Encoding: chunked\r\n",
        b"Content-Length: %d\r\nContent-Length: 3\r\n",
    ],
)
def test_ambiguous_framing_is_refused_and_the_connection_closed(
    gateway: GatewayFactory, simulator: Simulator, framing: bytes
) -> None:
    """Request smuggling (RFC 9112 §6.1): the request hidden in the body is never served."""
    server = gateway(one_route())
    hidden = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
    body = b"0\r\n\r\n" + hidden
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n" + framing % len(body) + b"\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head + body)
        answer = b""
        while chunk := sock.recv(65536):  # the server closes: recv returns b""
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 400 ")
    assert answer.count(b"HTTP/1.1 ") == 1  # nothing served after it
    error = json.loads(answer.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "invalid_request"
    assert simulator.stats()["total"] == 0


@pytest.mark.parametrize("upstream_stream", [False, True])
def test_an_oversized_upstream_answer_is_a_502_with_its_reason(
    gateway: GatewayFactory, upstream_stream: bool
) -> None:
    data = one_route(target_model="sim@tokens=5000", upstream={"max_response_bytes": 20_000})
    data["routes"][0]["upstream_stream"] = upstream_stream  # read whole, or assembled
    server = gateway(data)
    response = post(server, "/v1/chat/completions", json={"model": "m", "messages": CHAT})
    error = assert_error(response, 502, "upstream_protocol_error")
    assert "max_response_bytes" in error["message"]


# --- headers: what goes upstream, what comes back -------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_clients_get_rate_limits_but_not_cookies_or_the_organization(
    gateway: GatewayFactory, stream: bool
) -> None:
    server = gateway(one_route())
    body = {"model": "m", "messages": CHAT, "stream": stream}
    response = post(server, "/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-ratelimit-remaining-requests"] == "9999"
    assert response.headers["openai-processing-ms"] == "7"
    assert "set-cookie" not in response.headers
    assert "openai-organization" not in response.headers


def test_an_error_answer_keeps_its_rate_limits_and_retry_after(gateway: GatewayFactory) -> None:
    server = gateway(one_route(target_model="sim@status=429,retry-after=3"))
    response = post(server, "/v1/chat/completions", json={"model": "m", "messages": CHAT})
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["x-ratelimit-limit-requests"] == "10000"
    assert "set-cookie" not in response.headers


def test_upstreams_get_config_headers_and_only_allowed_client_headers(
    gateway: GatewayFactory, simulator: Simulator
) -> None:
    data = one_route(
        upstream={
            "headers": {"OpenAI-Organization": "${ORG}", "OpenAI-Project": "proj-1"},
            "forward_headers": ["X-Team"],
        }
    )
    server = gateway(data, env={"ORG": "org-gateway"})
    response = post(
        server,
        "/v1/chat/completions",
        json={"model": "m", "messages": CHAT},
        headers={
            "OpenAI-Organization": "org-of-the-client",  # must not choose who is billed
            "OpenAI-Beta": "assistants=v2",
            "X-Team": "search",
            "X-Other": "dropped",
            "Cookie": "session=1",
        },
    )
    assert response.status_code == 200
    seen = simulator.stats()["last_headers"]
    assert seen["openai-organization"] == "org-gateway"
    assert seen["openai-project"] == "proj-1"
    assert seen["openai-beta"] == "assistants=v2"
    assert seen["x-team"] == "search"
    assert "x-other" not in seen
    assert "cookie" not in seen


def test_an_upstream_key_echoed_in_an_error_body_is_masked() -> None:
    config = UpstreamConfig(name="u", base_url="http://u", api_key="sk-live-0123456789")
    body = b'{"error": {"message": "Incorrect API key provided: sk-live-0123456789."}}'
    assert b"sk-live" not in mask_secrets(body, config)
    assert b"***" in mask_secrets(body, config)
