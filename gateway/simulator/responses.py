"""OpenAI's Responses API, POST /v1/responses: Response objects and their `event:` streams."""

from __future__ import annotations

import itertools
import time
import uuid
from collections.abc import Mapping
from typing import Any

from gateway.simulator.answer import (
    ERROR_AFTER_MESSAGE,
    Answer,
    BadRequest,
    StreamedAnswer,
    request_faults,
    typed_event,
)
from gateway.simulator.content import Part, count_tokens, make_parts
from gateway.simulator.faults import Faults
from gateway.simulator.openai_api import OpenAIApi


class ResponsesApi(OpenAIApi):
    """The Responses API: OpenAI's error envelope and headers; `input` is all it checks."""

    def parse(self, headers: Mapping[str, str], body: object) -> Answer:
        body, model, faults = request_faults(headers, body)
        given = body.get("input")
        items = isinstance(given, list) and bool(given) and all(isinstance(i, dict) for i in given)
        if not isinstance(given, str) and not items:
            raise BadRequest(
                "'input' must be a string or a non-empty array of items", param="input"
            )
        instructions = body.get("instructions")
        return Response(
            model,
            faults,
            stream=body.get("stream") is True,
            echo={"instructions": instructions, "max_output_tokens": body.get("max_output_tokens")},
            prompt_tokens=count_tokens([given, instructions]),
        )


class Response(StreamedAnswer):
    """A message item of text, or function_call items; streamed as response.created and
    response.in_progress, then per item output_item.added, its deltas and done events, then
    response.completed. Every event has the next `sequence_number`, so events must be made in
    the order they are sent (the fault driver does)."""

    malformed = b"event: response.created\ndata: {not json}\n\n"

    def __init__(
        self,
        model: str,
        faults: Faults,
        *,
        stream: bool,
        echo: dict[str, Any],
        prompt_tokens: int,
    ) -> None:
        super().__init__(
            model, faults, stream=stream, parts=make_parts(faults.tokens, faults.tool_calls)
        )
        self._id = f"resp_{uuid.uuid4().hex[:24]}"
        self._message_id = f"msg_{uuid.uuid4().hex[:24]}"
        self._created = int(time.time())
        self._echo = echo
        self._usage = {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": self.tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + self.tokens,
        }
        self._sequence = itertools.count()

    def _response(self, status: str, output: list[Any], usage: object) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": "response",
            "created_at": self._created,
            "status": status,
            "error": None,
            "incomplete_details": None,
            **self._echo,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "reasoning": {"effort": None, "summary": None},
            "store": False,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
            "usage": usage,
            "user": None,
            "metadata": {},
        }

    def _item(self, part: Part, *, done: bool) -> dict[str, Any]:
        status = "completed" if done else "in_progress"
        if part.is_call:
            return {
                "type": "function_call",
                "id": f"fc_{part.index}",
                "call_id": f"call_{part.index}",
                "name": part.name,
                "arguments": part.text if done else "",
                "status": status,
            }
        content = [_text(part.text)] if done else []
        return {
            "type": "message",
            "id": self._message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def _item_id(self, part: Part) -> str:
        return f"fc_{part.index}" if part.is_call else self._message_id

    def _event(self, type_: str, **fields: object) -> bytes:
        return typed_event(type_, **fields, sequence_number=next(self._sequence))

    def _part_event(self, type_: str, part: Part, /, **fields: object) -> bytes:
        """An event about one output item (and for text, its one content part)."""
        where: dict[str, object] = {"item_id": self._item_id(part), "output_index": part.index}
        if not part.is_call:
            where["content_index"] = 0
        return self._event(type_, **where, **fields)

    def body(self) -> object:
        output = [self._item(part, done=True) for part in self.parts]
        return self._response("completed", output, self._usage)

    def head(self) -> list[bytes]:
        response = self._response("in_progress", [], None)
        return [
            self._event("response.created", response=response),
            self._event("response.in_progress", response=response),
        ]

    def open(self, part: Part) -> list[bytes]:
        item = self._item(part, done=False)
        added = self._event("response.output_item.added", output_index=part.index, item=item)
        if part.is_call:
            return [added]
        return [added, self._part_event("response.content_part.added", part, part=_text(""))]

    def delta(self, part: Part, n: int) -> bytes:
        if part.is_call:
            return self._part_event(
                "response.function_call_arguments.delta", part, delta=part.pieces[n]
            )
        return self._part_event(
            "response.output_text.delta", part, delta=part.pieces[n], logprobs=[]
        )

    def close(self, part: Part) -> list[bytes]:
        if part.is_call:
            done = [
                self._part_event("response.function_call_arguments.done", part, arguments=part.text)
            ]
        else:
            done = [
                self._part_event("response.output_text.done", part, text=part.text, logprobs=[]),
                self._part_event("response.content_part.done", part, part=_text(part.text)),
            ]
        item = self._item(part, done=True)
        return [*done, self._event("response.output_item.done", output_index=part.index, item=item)]

    def tail(self) -> list[bytes]:
        return [self._event("response.completed", response=self.body())]

    def error(self) -> bytes:
        return self._event("error", code="server_error", message=ERROR_AFTER_MESSAGE, param=None)


def _text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
