"""JSON in and out: the upstream receives what the client sent, apart from `model`."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import jsonbody

# JSON values as Python's json reads them, big integers and odd strings included.
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@given(
    rest=st.dictionaries(st.text().filter(lambda key: key != "model"), _values, max_size=5),
    old=st.text(min_size=1),
    new=st.text(min_size=1),
    ascii_only=st.booleans(),
    compact=st.booleans(),
)
def test_only_the_model_changes(
    rest: dict[str, Any], old: str, new: str, ascii_only: bool, compact: bool
) -> None:
    separators = (",", ":") if compact else (", ", ": ")
    body = json.dumps(
        {**rest, "model": old}, ensure_ascii=ascii_only, separators=separators
    ).encode("utf-8", "surrogatepass")
    payload = jsonbody.loads(body)
    forwarded = json.loads(jsonbody.with_model(body, payload, new))
    assert forwarded == {**json.loads(body), "model": new}


def test_bytes_are_forwarded_untouched_but_for_the_model() -> None:
    body = b'{ "model" : "a",\n "n": 123456789012345678901234567890, "x": 1.0000000000000001}'
    forwarded = jsonbody.with_model(body, jsonbody.loads(body), "b")
    assert forwarded == body.replace(b'"a"', b'"b"')


def test_nan_and_huge_numbers_survive() -> None:
    body = b'{"model": "a", "t": NaN, "big": 1e400, "n": -123456789012345678901234567890}'
    forwarded = json.loads(jsonbody.with_model(body, jsonbody.loads(body), "b"))
    assert math.isnan(forwarded["t"])
    assert forwarded["big"] == math.inf
    assert forwarded["n"] == -123456789012345678901234567890
    assert forwarded["model"] == "b"


def test_a_nested_model_key_is_left_alone() -> None:
    body = b'{"tools": [{"model": "a"}], "model": "a"}'
    forwarded = json.loads(jsonbody.with_model(body, jsonbody.loads(body), "b"))
    assert forwarded == {"tools": [{"model": "a"}], "model": "b"}


def test_an_escaped_top_level_key_is_found() -> None:
    body = b'{"mod\\u0065l": "a", "x": {"model": "a"}}'
    forwarded = json.loads(jsonbody.with_model(body, jsonbody.loads(body), "b"))
    assert forwarded == {"model": "b", "x": {"model": "a"}}


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"a": ' * 5000, b"{", b"\xff", b"nope"])
def test_anything_that_is_not_json_is_a_value_error(body: bytes) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - the one error the callers catch
        jsonbody.loads(body)
