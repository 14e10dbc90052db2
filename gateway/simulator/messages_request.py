"""The checks Anthropic's Messages API makes on a request, so that a translation into it is
checked too; each failure is a `BadRequest` whose message starts with the field's path."""

from __future__ import annotations

from typing import Any

from gateway.simulator.answer import BadRequest

_FIELDS = frozenset(
    {"model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature"}
    | {"top_p", "top_k", "tools", "tool_choice", "metadata", "thinking", "service_tier"}
)
_BLOCK_TYPES = ("text", "image", "tool_use", "tool_result", "document", "thinking")
_TOOL_CHOICES = ("auto", "any", "tool", "none")


def check_request(body: dict[str, Any]) -> None:
    extra = sorted(body.keys() - _FIELDS)
    if extra:
        raise _bad(extra[0], "Extra inputs are not permitted")
    _check_max_tokens(body.get("max_tokens"))
    _check_messages(body.get("messages"))
    _check_system(body.get("system"))
    _check_tools(body.get("tools"))
    _check_tool_choice(body.get("tool_choice"))
    _check_stop_sequences(body.get("stop_sequences"))
    _check_number(body, "temperature", high=1)
    _check_number(body, "top_p")


def _bad(path: str, problem: str) -> BadRequest:
    return BadRequest(f"{path}: {problem}", param=path)


def _check_max_tokens(value: object) -> None:
    if value is None:
        raise _bad("max_tokens", "Field required")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad("max_tokens", "Input should be an integer greater than or equal to 1")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "Input should be a non-empty list of messages")
    tool_use_ids: set[object] = set()  # of the assistant's earlier tool_use blocks
    for index, message in enumerate(messages):
        path = f"messages.{index}"
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise _bad(f"{path}.role", "Input should be 'user' or 'assistant'")
        blocks = _content_blocks(message.get("content"), f"{path}.content")
        for block_index, block in enumerate(blocks):
            if block["type"] == "tool_result" and block.get("tool_use_id") not in tool_use_ids:
                raise _bad(
                    f"{path}.content.{block_index}",
                    f"unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                    "corresponding `tool_use` block in an earlier assistant message",
                )
        if message["role"] == "assistant":
            tool_use_ids |= {block.get("id") for block in blocks if block["type"] == "tool_use"}


def _content_blocks(content: object, path: str) -> list[dict[str, Any]]:
    """The blocks of a message's content (none for a string)."""
    if isinstance(content, str):
        return []
    if not isinstance(content, list):
        raise _bad(path, "Input should be a valid string or a list of content blocks")
    for index, block in enumerate(content):
        tag = block.get("type") if isinstance(block, dict) else None
        if tag not in _BLOCK_TYPES:
            expected = ", ".join(f"'{name}'" for name in _BLOCK_TYPES)
            raise _bad(f"{path}.{index}.type", f"Input tag {tag!r} does not match {expected}")
    return content


def _check_system(system: object) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list) or not all(
        isinstance(block, dict)
        and block.get("type") == "text"
        and isinstance(block.get("text"), str)
        for block in system
    ):
        raise _bad("system", "Input should be a valid string or a list of text blocks")


def _check_tools(tools: object) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise _bad("tools", "Input should be a valid list")
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise _bad(f"tools.{index}.name", "Field required")
        if not isinstance(tool.get("input_schema"), dict):
            raise _bad(f"tools.{index}.input_schema", "Field required")


def _check_tool_choice(choice: object) -> None:
    if choice is None:
        return
    if not isinstance(choice, dict) or choice.get("type") not in _TOOL_CHOICES:
        raise _bad("tool_choice.type", "Input should be 'auto', 'any', 'tool' or 'none'")
    if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
        raise _bad("tool_choice.name", "Field required")


def _check_stop_sequences(value: object) -> None:
    if value is not None and not (
        isinstance(value, list) and all(isinstance(item, str) for item in value)
    ):
        raise _bad("stop_sequences", "Input should be a valid list of strings")


def _check_number(body: dict[str, Any], field: str, *, high: float | None = None) -> None:
    value = body.get(field)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _bad(field, "Input should be a valid number")
    if high is not None and not 0 <= value <= high:
        raise _bad(field, f"Input should be from 0 to {high}")
