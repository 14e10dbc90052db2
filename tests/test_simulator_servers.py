"""The simulator behaving as real OpenAI-compatible servers do where they differ from OpenAI:
llama.cpp's streams without usage and its empty stream for a refused prompt, the keys
llama.cpp and vLLM add, vLLM's flat errors, plain-text 5xx bodies; and `n`, `logprobs` and
`echo` as OpenAI answers them. Over real sockets, read raw and by the `openai` SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from gateway.simulator import create_simulator_app
from gateway.testing import LiveServer

CHAT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "one two three four"}
]  # 5 prompt tokens, "user" too


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def server() -> Iterator[LiveServer]:
    with LiveServer(create_simulator_app()) as live:
        yield live


@pytest.fixture
async def http(server: LiveServer) -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(base_url=f"{server.url}/v1", timeout=10) as client:
        yield client


@pytest.fixture
async def sdk(server: LiveServer) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=10
    ) as client:
        yield client


async def chunks(http: httpx2.AsyncClient, path: str, body: dict[str, Any]) -> list[Any]:
    """The parsed `data:` events of a stream, `[DONE]` as the string."""
    response = await http.post(path, json=body | {"stream": True})
    assert response.status_code == 200
    data = [line[6:] for line in response.text.split("\n") if line.startswith("data: ")]
    return [item if item == "[DONE]" else json.loads(item) for item in data]


@pytest.mark.anyio
async def test_include_usage_ignored_as_llama_cpp_does(http: httpx2.AsyncClient) -> None:
    body = {"messages": CHAT, "stream_options": {"include_usage": True}}
    honoured = await chunks(http, "/chat/completions", body | {"model": "sim@tokens=2"})
    ignored = await chunks(
        http, "/chat/completions", body | {"model": "sim@tokens=2,include-usage=ignore"}
    )
    assert [c for c in honoured if c != "[DONE]" and c.get("usage")]  # one usage chunk
    assert not [c for c in ignored if c != "[DONE]" and "usage" in c]
    assert ignored[-1] == "[DONE]"


@pytest.mark.anyio
async def test_a_prompt_past_the_context_is_a_400_or_an_empty_stream(
    http: httpx2.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    model = "sim@context-limit=4"
    with pytest.raises(openai.BadRequestError) as caught:
        await sdk.chat.completions.create(model=model, messages=CHAT)
    assert caught.value.code == "context_length_exceeded"
    assert "maximum context length is 4 tokens" in caught.value.message
    response = await http.post(
        "/chat/completions", json={"model": model, "messages": CHAT, "stream": True}
    )
    assert response.status_code == 200
    assert response.text.startswith('error: {"error": {"message": "This model')
    assert "data:" not in response.text
    stream = await sdk.chat.completions.create(model=model, messages=CHAT, stream=True)
    assert [chunk async for chunk in stream] == []  # SSE readers see nothing
    fits = await sdk.chat.completions.create(model="sim@context-limit=5", messages=CHAT)
    assert fits.choices[0].message.content


@pytest.mark.anyio
async def test_extra_keys_in_chunks_and_in_the_whole_answer(http: httpx2.AsyncClient) -> None:
    body = {"model": "sim@tokens=2,extra-keys=true", "messages": CHAT}
    whole = (await http.post("/chat/completions", json=body)).json()
    assert whole["timings"] == {"prompt_n": 5, "predicted_n": 2}
    (choice,) = whole["choices"]
    assert choice["stop_reason"] == 2
    assert choice["message"]["reasoning_content"] == "why why "
    events = await chunks(http, "/chat/completions", body)
    *content, finish, done = events
    assert done == "[DONE]"
    assert finish["timings"] == whole["timings"]
    assert finish["choices"][0]["stop_reason"] == 2
    assert all(c["choices"][0]["stop_reason"] is None for c in content)
    assert [c["choices"][0]["delta"].get("reasoning_content") for c in content[1:]] == [
        "why ",
        "why ",
    ]


@pytest.mark.anyio
async def test_chat_logprobs_carry_refusal_null_as_openai(sdk: openai.AsyncOpenAI) -> None:
    whole = await sdk.chat.completions.create(model="sim@tokens=2", messages=CHAT, logprobs=True)
    logprobs = whole.choices[0].logprobs
    assert logprobs is not None
    assert logprobs.content is not None
    assert [entry.token for entry in logprobs.content] == ["tok0 ", "tok1 "]
    assert "refusal" in logprobs.model_fields_set  # sent, as null
    assert logprobs.refusal is None
    stream = await sdk.chat.completions.create(
        model="sim@tokens=2",
        messages=CHAT,
        logprobs=True,
        stream=True,
    )
    tokens = [
        entry.token
        async for chunk in stream
        if chunk.choices and chunk.choices[0].logprobs
        for entry in chunk.choices[0].logprobs.content or []
    ]
    assert tokens == ["tok0 ", "tok1 "]


@pytest.mark.anyio
async def test_n_choices_alike(http: httpx2.AsyncClient) -> None:
    body = {"model": "sim@tokens=2", "messages": CHAT, "n": 3}
    whole = (await http.post("/chat/completions", json=body)).json()
    assert [c["index"] for c in whole["choices"]] == [0, 1, 2]
    assert {c["message"]["content"] for c in whole["choices"]} == {"tok0 tok1 "}
    events = await chunks(http, "/chat/completions", body)
    for index in range(3):
        pieces = [
            c["choices"][0]["delta"].get("content", "")
            for c in events[:-1]
            if c["choices"][0]["index"] == index
        ]
        assert "".join(pieces) == "tok0 tok1 "
    bad = await http.post("/chat/completions", json=body | {"n": 0})
    assert bad.status_code == 400
    assert bad.json()["error"]["param"] == "n"


@pytest.mark.anyio
async def test_completions_echo_and_logprobs(http: httpx2.AsyncClient) -> None:
    body = {"model": "sim@tokens=2", "prompt": "say it", "echo": True, "logprobs": 1}
    (choice,) = (await http.post("/completions", json=body)).json()["choices"]
    assert choice["text"] == "say ittok0 tok1 "
    assert choice["logprobs"] == {
        "tokens": ["tok0 ", "tok1 "],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": [{"tok0 ": -0.5}, {"tok1 ": -0.5}],
        "text_offset": [6, 11],
    }
    events = await chunks(http, "/completions", body)
    assert "".join(c["choices"][0]["text"] for c in events[:-1]) == "tok0 tok1 "  # not echoed


@pytest.mark.anyio
async def test_error_bodies_flat_and_text(http: httpx2.AsyncClient) -> None:
    flat = await http.post(
        "/chat/completions", json={"model": "sim@status=500,error-body=flat", "messages": CHAT}
    )
    assert flat.status_code == 500
    assert flat.json() == {
        "object": "error",
        "message": "simulated HTTP 500 (simulator knob status)",
        "type": "InternalServerError",
        "param": None,
        "code": 500,
    }
    text = await http.post(
        "/chat/completions", json={"model": "sim@status=502,error-body=text", "messages": CHAT}
    )
    assert text.status_code == 502
    assert text.headers["content-type"].startswith("text/plain")
    assert text.text == "Bad Gateway"
    events = await chunks(
        http, "/chat/completions", {"model": "sim@error-after=1,error-body=flat", "messages": CHAT}
    )
    assert events[-1]["object"] == "error"
    assert events[-1]["code"] == 500
