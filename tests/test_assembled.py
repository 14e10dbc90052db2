"""A non-streaming call the gateway serves from an upstream stream reads as the upstream's own
non-streaming answer: each case asked of the simulator directly (not streaming) and through
the gateway (streamed upstream and assembled, the default) gives the same status and body, ids
and timestamps aside. The simulator behaves as the servers that differ from OpenAI do
(llama.cpp's streams without usage and empty stream for a refused prompt, vLLM's extra keys
and flat errors, plain-text 5xx bodies)."""

from __future__ import annotations

import logging
from typing import Any

import httpx2 as httpx
import openai
import pytest
from langchain_core.messages import AIMessage
from langchain_openai import ChatOpenAI

from gateway.testing import LiveServer
from tests.conftest import GatewayFactory, Simulator, one_route

CHAT: dict[str, Any] = {"messages": [{"role": "user", "content": "hello there"}]}  # 3 tokens
TEXT: dict[str, Any] = {"prompt": "say it"}  # 2 tokens
PATHS = {"chat": "chat/completions", "text": "completions"}
STREAMED, PLAIN, BOTH = "streamed", "plain", "streamed, then plain"

CASES: list[tuple[str, str, dict[str, Any], int, str]] = [
    # kind, the simulator's model, request fields, status, how the gateway asked the upstream
    ("chat", "sim@tokens=3", {}, 200, STREAMED),
    ("chat", "sim@tokens=3,include-usage=ignore", {}, 200, STREAMED),
    ("chat", "sim@tokens=3,extra-keys=true", {}, 200, STREAMED),
    ("chat", "sim@tokens=3", {"logprobs": True, "top_logprobs": 0}, 200, STREAMED),
    ("chat", "sim@tokens=3,tool-calls=2", {}, 200, STREAMED),
    ("chat", "sim@tokens=2", {"n": 2}, 200, STREAMED),
    ("chat", "sim@tokens=2", {"prompt_logprobs": 1}, 200, PLAIN),
    ("text", "sim@tokens=3", {"logprobs": 1}, 200, STREAMED),
    ("text", "sim@tokens=3,extra-keys=true,include-usage=ignore", {}, 200, STREAMED),
    ("text", "sim@tokens=3", {"echo": True}, 200, PLAIN),
    ("text", "sim@tokens=3", {"echo": True, "logprobs": 1}, 200, PLAIN),
    ("text", "sim@tokens=3", {"best_of": 2}, 200, PLAIN),
    ("chat", "sim@context-limit=2", {}, 400, BOTH),
    ("text", "sim@context-limit=1", {}, 400, BOTH),
    ("chat", "sim@error-after=0", {}, 500, STREAMED),
    ("chat", "sim@error-after=2", {}, 500, STREAMED),
    ("chat", "sim@error-after=2,error-body=flat", {}, 500, STREAMED),
    ("text", "sim@error-after=1", {}, 500, STREAMED),
    ("chat", "sim@status=500", {}, 500, STREAMED),
    ("chat", "sim@status=500,error-body=flat", {}, 500, STREAMED),
    ("chat", "sim@status=500,error-body=text", {}, 500, STREAMED),
    ("chat", "sim@status=400", {}, 400, STREAMED),
]


def comparable(response: httpx.Response) -> tuple[int, str, object]:
    """Status, media type and body, without what differs between any two answers."""
    media = response.headers["content-type"].split(";")[0]
    if media != "application/json":
        return response.status_code, media, response.text
    body = response.json()
    for key in ("id", "created"):
        body.pop(key, None)
    return response.status_code, media, body


@pytest.mark.parametrize(("kind", "model", "fields", "status", "asked"), CASES)
def test_assembled_answer_is_the_upstreams_own(
    simulator: Simulator,
    gateway: GatewayFactory,
    kind: str,
    model: str,
    fields: dict[str, Any],
    status: int,
    asked: str,
) -> None:
    server = gateway(one_route(target_model=model))
    body = (CHAT if kind == "chat" else TEXT) | fields
    path = PATHS[kind]
    direct = httpx.post(f"{simulator.base_url}/{path}", json=body | {"model": model}, timeout=10)
    assert direct.status_code == status  # the case is what it says
    httpx.post(f"{simulator.url}/sim/reset", timeout=5)
    through = httpx.post(f"{server.url}/v1/{path}", json=body | {"model": "m"}, timeout=10)
    expected = comparable(direct)
    if "include-usage=ignore" in model:  # the one thing a stream without usage cannot tell
        assert "usage" not in through.json()  # absent, not null
        assert isinstance(expected[2], dict)
        del expected[2]["usage"]
    assert comparable(through) == expected
    stats = simulator.stats()
    assert stats["total"] == (2 if asked == BOTH else 1)
    assert ("stream" in stats["last_body"]) is (asked == STREAMED)


def test_no_usage_is_logged_once_per_upstream_with_the_opt_out(
    simulator: Simulator, gateway: GatewayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    route = {"targets": [{"upstream": "a", "model": "sim@include-usage=ignore"}]}
    server = gateway(
        {
            "upstreams": [
                {"name": "a", "base_url": "${SIM}"},
                {"name": "b", "base_url": "${SIM}"},
            ],
            "routes": [
                {"model": "no-usage-a", **route},
                {"model": "no-usage-b", "targets": [{**route["targets"][0], "upstream": "b"}]},
                {"model": "usage-a", "targets": [{"upstream": "a", "model": "sim"}]},
            ],
        }
    )
    with caplog.at_level(logging.WARNING, logger="gateway"):
        for model in ["no-usage-a", "usage-a", "no-usage-a", "no-usage-b", "no-usage-a"]:
            answer = httpx.post(
                f"{server.url}/v1/chat/completions", json=CHAT | {"model": model}, timeout=10
            ).json()
            assert ("usage" in answer) is (model == "usage-a")  # absent, never null
    lines = [r.getMessage() for r in caplog.records if "no usage" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith("upstream=a ")
    assert lines[1].startswith("upstream=b ")
    assert all("upstream_stream: false" in line for line in lines)


@pytest.mark.anyio
async def test_sdk_and_langchain_see_the_usage_the_upstream_reports(
    simulator: Simulator, gateway: GatewayFactory
) -> None:
    """Reported: the `openai` SDK's `usage` and LangChain's `usage_metadata` are there; not
    reported by the stream: `upstream_stream: false` gets the upstream's own."""
    ignoring = "sim@tokens=3,include-usage=ignore"
    server = gateway(
        {
            "upstreams": [{"name": "sim", "base_url": "${SIM}"}],
            "routes": [
                {"model": "reported", "targets": [{"upstream": "sim", "model": "sim@tokens=3"}]},
                {"model": "unreported", "targets": [{"upstream": "sim", "model": ignoring}]},
                {
                    "model": "opted-out",
                    "upstream_stream": False,
                    "targets": [{"upstream": "sim", "model": ignoring}],
                },
            ],
        }
    )
    async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="k") as client:
        reply = await client.chat.completions.create(model="reported", messages=CHAT["messages"])
        assert reply.usage is not None
        assert reply.usage.completion_tokens == 3
        unreported = await client.chat.completions.create(
            model="unreported", messages=CHAT["messages"]
        )
        assert unreported.usage is None
        assert unreported.choices[0].message.content == "tok0 tok1 tok2 "
    for model, usage in [
        ("reported", {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6}),
        ("unreported", None),
        ("opted-out", {"input_tokens": 3, "output_tokens": 3, "total_tokens": 6}),
    ]:
        message = await langchain(server, model).ainvoke("hello there")
        assert isinstance(message, AIMessage)
        metadata = message.usage_metadata
        if usage is None:
            assert metadata is None
        else:
            assert metadata is not None
            assert metadata["input_tokens"] == usage["input_tokens"]
            assert metadata["output_tokens"] == usage["output_tokens"]
            assert metadata["total_tokens"] == usage["total_tokens"]


def langchain(server: LiveServer, model: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{server.url}/v1", api_key="k", model=model, max_retries=0)  # type: ignore[arg-type]
