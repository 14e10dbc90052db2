"""JSON in and out (pure): fast where that is exact, the standard library where it is not.

orjson is several times faster than `json`, but it refuses what Python's `json` reads (`NaN`,
`Infinity`, `1e400`, lone surrogates) and reads integers past 64 bits as floats. So the gateway
never re-serialises a client's body: it forwards the bytes it received with only the value of
the top-level `model` swapped, and falls back to `json` (which keeps every value as sent) only
when the swap cannot be done on the bytes with certainty.
"""

from __future__ import annotations

import json
from typing import Any

import orjson

_MODEL_KEY = b'"model"'
_SPACE = b" \t\r\n"


def loads(data: bytes | str) -> Any:
    """Parse JSON as Python's `json` would; `ValueError` for anything that is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass  # NaN, Infinity, lone surrogates...: valid to `json`, which decides
    try:
        return json.loads(data)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc


def dumps(value: Any) -> bytes:
    return orjson.dumps(value)


def with_model(body: bytes, payload: dict[str, Any], model: str) -> bytes:
    """`body` (whose parse is `payload`) with the top-level `model` set to `model`."""
    if payload["model"] == model:
        return body
    swapped = _swap_model_bytes(body, payload["model"], model)
    if swapped is not None:
        return swapped
    # The stdlib parse keeps big integers exact and NaN as NaN; orjson's `payload` may not.
    exact = json.loads(body)
    return json.dumps({**exact, "model": model}).encode()


def with_fields(body: bytes, payload: dict[str, Any], model: str, fields: dict[str, Any]) -> bytes:
    """`with_model`, and top-level `fields` set too (for asking an upstream for a stream)."""
    body = with_model(body, payload, model)
    if not any(key in payload for key in fields):  # new keys: written in front, no re-parse
        start = body.index(b"{") + 1
        return body[:start] + orjson.dumps(fields)[1:-1] + b"," + body[start:]
    exact = json.loads(body)
    return json.dumps({**exact, **fields}).encode()


def _swap_model_bytes(body: bytes, old: str, new: str) -> bytes | None:
    """Replace the value of the one `"model"` key in the bytes, or None if unsure which."""
    # Without \u escapes the top-level key is spelled `"model"`; seen once, it is that key.
    if b"\\u" in body:
        return None
    start = body.find(_MODEL_KEY)
    if start < 0 or body.find(_MODEL_KEY, start + 1) >= 0:
        return None
    at = start + len(_MODEL_KEY)
    while at < len(body) and body[at] in _SPACE:
        at += 1
    if body[at : at + 1] != b":":
        return None
    at += 1
    while at < len(body) and body[at] in _SPACE:
        at += 1
    try:
        old_raw, new_raw = orjson.dumps(old), orjson.dumps(new)
    except orjson.JSONEncodeError:  # a lone surrogate: let `json` write it
        return None
    if not body.startswith(old_raw, at):
        return None  # written with escapes such as \/: let `json` decide
    return body[:at] + new_raw + body[at + len(old_raw) :]
