"""What every protocol answers, before framing: the same tokens and tool calls for all of them."""

from __future__ import annotations

import json
from dataclasses import dataclass


@dataclass(frozen=True)
class Part:
    """One block of output, the text or tool call `index`, and the pieces it is streamed in."""

    index: int
    is_call: bool
    pieces: tuple[str, ...]

    @property
    def text(self) -> str:
        """The text, or the tool call's arguments as a JSON string."""
        return "".join(self.pieces)

    @property
    def name(self) -> str:
        return f"tool_{self.index}"


def make_parts(tokens: int, tool_calls: int, *, limit: int | None = None) -> list[Part]:
    """Text of `tokens` tokens (at most `limit`), or `tool_calls` calls whose JSON arguments
    are streamed in `tokens` pieces; never empty, and only a text part can have no pieces."""
    if tool_calls:
        count = max(1, tokens)
        return [
            Part(call, True, _split(arguments(call, tokens), count)) for call in range(tool_calls)
        ]
    count = tokens if limit is None else min(tokens, limit)
    return [Part(0, False, tuple(token(index) for index in range(count)))]


def token(index: int) -> str:
    return f"tok{index} "


def arguments(call: int, tokens: int) -> str:
    words = "".join(token(index) for index in range(tokens))
    return json.dumps({"call": call, "words": words})


def _split(text: str, count: int) -> tuple[str, ...]:
    size = len(text)
    return tuple(text[n * size // count : (n + 1) * size // count] for n in range(count))


def count_tokens(value: object) -> int:
    """A stand-in for tokenising: words of every string, one per integer (token arrays)."""
    if isinstance(value, str):
        return len(value.split())
    if isinstance(value, int):
        return 1
    if isinstance(value, dict):
        value = list(value.values())
    return sum(map(count_tokens, value)) if isinstance(value, list) else 0
