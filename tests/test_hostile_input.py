"""Hostile input, generated (hypothesis, fixed seed, bounded): any body and any headers get an
answer with the endpoint's error shape (OpenAI's envelope, Anthropic's on /v1/messages) and a
2xx/4xx status (or the 504 a zero deadline earns), never a 500 or a traceback, whether the
request is passed through or translated for an Anthropic upstream."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx2 as httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from gateway.config import parse_config
from tests.conftest import LiveServer, Simulator, one_route

_HEADER_NAMES = [
    "x-request-timeout-ms",
    "grpc-timeout",
    "x-stainless-timeout",
    "x-stainless-read-timeout",
    "x-litellm-timeout",
    "authorization",
    "x-request-id",
    "traceparent",
    "tracestate",
    "content-type",
]
# Header values of visible ASCII and bytes past it (which the HTTP parser refuses: the answer
# is still an envelope, from the server's protocol); a client cannot send control bytes.
_values = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=300).filter(
    lambda value: value == value.strip() and "\x7f" not in value
)
_headers = st.dictionaries(st.sampled_from(_HEADER_NAMES), _values, max_size=4)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=15,
)
_content = st.text(max_size=10) | st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["text", "image_url", "refusal", "input_audio"]) | _json},
        optional={"text": _json, "image_url": st.just({"url": "data:image/png;base64,AA"}) | _json},
    ),
    max_size=3,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "tool", "developer"]) | _json},
    optional={
        "content": _content | _json,
        "tool_calls": st.just([{"id": "c", "type": "function",
                                "function": {"name": "f", "arguments": "{}"}}]) | _json,
        "tool_call_id": st.just("c") | _json,
        "name": _json,
    },
)  # fmt: skip
_payloads = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["m", "claude", "unknown", ""]) | _json,
        "messages": st.just([{"role": "user", "content": "hi"}])
        | st.lists(_message, max_size=4)
        | _json,
        "stream": st.booleans() | _json,
        "prompt": _json,
        "input": st.just("hi") | _json,
        "max_tokens": st.integers(-1, 5) | _json,
        "tools": st.just([{"type": "function", "function": {"name": "f"}}]) | _json,
        "tool_choice": st.sampled_from(["auto", "required", "none"]) | _json,
        "stop": _json,
        "temperature": _json,
        "n": _json,
    },
)
_bodies = (
    _payloads.map(lambda p: json.dumps(p).encode())
    | st.binary(max_size=500)
    | st.integers(1, 5000).map(lambda depth: b"[" * depth + b"]" * depth)
    | st.integers(1, 5000).map(lambda depth: b'{"a":' * depth + b"1" + b"}" * depth)
)


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    simulator = Simulator()
    with simulator:
        data = one_route(target_model="sim@tokens=2")
        data["upstreams"].append({"name": "claude", "base_url": "${SIM}", "kind": "anthropic"})
        data["routes"].append(
            {"model": "claude", "targets": [{"upstream": "claude", "model": "c@tokens=2"}]}
        )
        config = parse_config(data, {"SIM": simulator.base_url})
        with LiveServer(create_app(config)) as gateway:
            yield gateway


@settings(
    max_examples=500,
    derandomize=True,  # a fixed seed: CI runs the same examples every time
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    path=st.sampled_from(
        ["chat/completions", "completions", "embeddings", "messages", "responses"]
    ),
    body=_bodies,
    headers=_headers,
)
def test_any_body_and_headers_get_an_envelope(
    server: LiveServer, path: str, body: bytes, headers: dict[str, str]
) -> None:
    raw = {name.encode(): value.encode("latin-1") for name, value in headers.items()}  # as sent
    response = httpx.post(f"{server.url}/v1/{path}", content=body, headers=raw, timeout=10)
    status = response.status_code
    assert status < 500 or (status == 504 and _code(response) == "deadline_exceeded"), (
        status,
        response.text[:300],
    )
    if status >= 400:
        assert "Traceback" not in response.text
        if path == "messages":  # Anthropic's shape, ours or the upstream's
            assert response.json()["type"] == "error"
            assert {"type", "message"} <= set(response.json()["error"])
        else:
            assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        assert response.json()["error"]["message"]


def _code(response: httpx.Response) -> Any:
    return response.json()["error"]["code"]


_part = st.sampled_from(
    [
        {"type": "text", "text": "hi"},
        {"type": "text", "text": ""},
        {"type": "refusal", "refusal": "no"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "ftp://x"}},
        {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
        {"type": "text"},
        "text",
    ]
)
_call = st.fixed_dictionaries(
    {
        "id": st.sampled_from(["c1", "c2"]),
        "type": st.just("function"),
        "function": st.fixed_dictionaries(
            {
                "name": st.sampled_from(["f", ""]),
                "arguments": st.sampled_from(["{}", '{"a": 1}', "[1]", "{"]),
            }
        ),
    }
)
_words = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=5)
_chat_message = st.one_of(
    st.fixed_dictionaries(
        {"role": st.sampled_from(["system", "developer"]), "content": _words | st.just("")}
    ),
    st.fixed_dictionaries(
        {"role": st.just("user"), "content": _words | st.lists(_part, min_size=1, max_size=3)}
    ),
    st.fixed_dictionaries(
        {"role": st.just("assistant"), "content": st.none() | _words},
        optional={"tool_calls": st.lists(_call, min_size=1, max_size=2)},
    ),
    st.fixed_dictionaries(
        {"role": st.just("tool"), "content": _words},
        optional={"tool_call_id": st.sampled_from(["c1", "c2"])},
    ),
)
_chat_request = st.fixed_dictionaries(
    {"messages": st.lists(_chat_message, min_size=1, max_size=5).map(
        lambda messages: [{"role": "user", "content": "hi"}, *messages]
    )},
    optional={
        "tools": st.lists(
            st.sampled_from(
                [
                    {"type": "function", "function": {"name": "f", "parameters": {}}},
                    {"type": "function", "function": {"name": "g", "strict": True}},
                    {"type": "web_search"},
                ]
            ),
            max_size=2,
        ),
        "tool_choice": st.sampled_from(
            ["auto", "required", "none", "maybe", {"type": "function", "function": {"name": "f"}}]
        ),
        "parallel_tool_calls": st.booleans(),
        "stop": st.none() | st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=2),
        "temperature": st.floats(0, 2),
        "top_p": st.floats(0, 1),
        "max_tokens": st.integers(1, 10),
        "max_completion_tokens": st.integers(1, 10),
        "n": st.sampled_from([1, 1, 1, 2]),
        "user": st.text(max_size=5),
        "response_format": st.sampled_from([{"type": "text"}] * 3 + [{"type": "json_object"}]),
        "stream_options": st.just({"include_usage": True}),
    },
)  # fmt: skip


@settings(
    max_examples=300,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(payload=_chat_request, stream=st.booleans())
def test_any_chat_request_for_an_anthropic_upstream_is_translated_or_refused(
    server: LiveServer, payload: dict[str, Any], stream: bool
) -> None:
    """Translated, or a 400 that names what cannot be (or what the upstream refused), in the
    OpenAI envelope: never a 500, whatever the shape of the conversation."""
    body = {**payload, "model": "claude", "stream": stream}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=10)
    assert response.status_code in (200, 400), response.text[:300]
    if response.status_code == 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] in (
            "unsupported_parameter",
            "invalid_request",
            "invalid_request_error",
        )
    elif stream:
        assert response.text.endswith("data: [DONE]\n\n")
    else:
        assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
