"""OpenAI streams: what counts as a token, and the non-streaming answer rebuilt from events."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.protocols.openai import Assembler, carries_token, streamable


def chunk(delta: dict[str, Any] | None = None, **choice: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"index": 0, "finish_reason": None, **choice}
    if delta is not None:
        body["delta"] = delta
    return {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m-1",
            "choices": [body]}  # fmt: skip


@pytest.mark.parametrize(
    ("event", "token"),
    [
        (chunk({"role": "assistant", "content": ""}), False),  # OpenAI's first chunk
        (chunk({"role": "assistant"}), False),
        (chunk({"content": "hi"}), True),
        (chunk({"tool_calls": [{"index": 0, "function": {"arguments": ""}}]}), True),
        (chunk({"function_call": {"name": "f"}}), True),
        (chunk({"refusal": "no"}), True),
        (chunk({}, finish_reason="stop"), True),
        ({"choices": [], "usage": {"total_tokens": 3}}, False),
        ({"choices": [{"index": 0, "text": "x"}]}, True),  # completions
        ({"choices": [{"index": 0, "text": ""}]}, False),
        ({"error": {"message": "boom"}}, False),
        ([1, 2], False),
    ],
)
def test_what_carries_a_token(event: object, token: bool) -> None:
    assert carries_token(event) is token


def test_completions_with_best_of_cannot_be_streamed() -> None:
    assert not streamable("text", {"best_of": 2})
    assert streamable("text", {"best_of": 1})
    assert streamable("chat", {"n": 3})


def test_chat_text_usage_and_finish() -> None:
    assembler = Assembler("chat")
    for event in [
        chunk({"role": "assistant", "content": "", "refusal": None}),  # as OpenAI sends it
        chunk({"content": "Hel"}, logprobs={"content": [{"token": "Hel"}]}),
        chunk({"content": "lo"}, logprobs={"content": [{"token": "lo"}]}),
        chunk({}, finish_reason="stop"),
        {"id": "c1", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2}},
    ]:
        assembler.feed(event)
    assert assembler.finished
    assert assembler.result() == {
        "id": "c1",
        "object": "chat.completion",
        "created": 5,
        "model": "m-1",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello", "refusal": None},
                "logprobs": {"content": [{"token": "Hel"}, {"token": "lo"}]},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 2},
    }


def test_usage_is_absent_not_null_when_the_stream_had_none() -> None:
    assembler = Assembler("chat")
    assembler.feed(chunk({"role": "assistant", "content": "hi"}, usage=None))
    assembler.feed(chunk({}, finish_reason="stop"))
    answer = assembler.result()
    assert "usage" not in answer
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "hi"}  # as carried


def test_every_key_the_chunks_carry_is_kept() -> None:
    """llama.cpp's `timings`, vLLM's `stop_reason`, `reasoning_content` and `logprobs.refusal`:
    kept generically, strings of a delta joined, other values as last carried (not null)."""
    assembler = Assembler("chat")
    token = {"content": [{"token": "a", "logprob": -0.1}], "refusal": None}
    for event in [
        chunk({"role": "assistant", "content": "", "reasoning_content": None}, stop_reason=None),
        chunk({"content": "a", "reasoning_content": "why ", "x_meta": {"k": 1}}, logprobs=token),
        chunk({"reasoning_content": "so"}, stop_reason=None),
        chunk({}, finish_reason="stop", stop_reason=7) | {"timings": {"ms": 3}, "obfuscation": "x"},
    ]:
        assembler.feed(event)
    answer = assembler.result()
    assert answer["timings"] == {"ms": 3}
    assert "obfuscation" not in answer
    assert "usage" not in answer
    (choice,) = answer["choices"]
    assert choice == {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": "a",
            "reasoning_content": "why so",
            "x_meta": {"k": 1},
        },
        "logprobs": {"content": [{"token": "a", "logprob": -0.1}], "refusal": None},
        "finish_reason": "stop",
        "stop_reason": 7,
    }


def test_tool_calls_assembled_by_index_with_arguments_concatenated() -> None:
    assembler = Assembler("chat")
    first = {"index": 0, "id": "a", "type": "function", "function": {"name": "f", "arguments": ""}}
    second = {
        "index": 1,
        "id": "b",
        "type": "function",
        "function": {"name": "g", "arguments": "{"},
    }
    deltas: list[dict[str, Any]] = [
        {"role": "assistant", "content": None, "tool_calls": [first]},
        {"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}, second]},
        {"tool_calls": [{"index": 1, "function": {"arguments": "}"}}]},
        {"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]},
    ]
    for delta in deltas:
        assembler.feed(chunk(delta))
    assembler.feed(chunk({}, finish_reason="tool_calls"))
    message = assembler.result()["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}},
        {"id": "b", "type": "function", "function": {"name": "g", "arguments": "{}"}},
    ]


def test_legacy_function_call_refusal_and_several_choices() -> None:
    assembler = Assembler("chat")
    assembler.feed(chunk({"function_call": {"name": "f", "arguments": "{"}}))
    assembler.feed(chunk({"function_call": {"arguments": "}"}}))
    assembler.feed(chunk({"refusal": "I can"}, index=1))
    assembler.feed(chunk({"refusal": "not."}, index=1, finish_reason="stop"))
    first, second = assembler.result()["choices"]
    assert first["message"]["function_call"] == {"name": "f", "arguments": "{}"}
    assert first["finish_reason"] is None
    assert second["message"] == {"role": "assistant", "content": None, "refusal": "I cannot."}


def test_completions_text_and_logprobs() -> None:
    assembler = Assembler("text")
    for text, finish in [("a", None), ("b", "length")]:
        assembler.feed(
            {"id": "t", "object": "text_completion", "created": 1, "model": "m",
             "choices": [{"index": 0, "text": text, "finish_reason": finish,
                          "logprobs": {"tokens": [text], "token_logprobs": [-0.5]}}]}
        )  # fmt: skip
    (choice,) = assembler.result()["choices"]
    assert choice == {
        "index": 0,
        "text": "ab",
        "logprobs": {"tokens": ["a", "b"], "token_logprobs": [-0.5, -0.5]},
        "finish_reason": "length",
    }
    assert assembler.result()["object"] == "text_completion"


def test_an_unfinished_stream_is_not_an_answer() -> None:
    assembler = Assembler("chat")
    assembler.feed(chunk({"content": "half"}))
    assert not assembler.finished
