"""SSE framing (pure)."""

from __future__ import annotations

import pytest

from gateway.sse import MAX_EVENT_BYTES, SSEDecoder, SSEProtocolError


def test_splits_events_and_marks_comments() -> None:
    events = SSEDecoder().feed(b': keep-alive\n\ndata: {"a": 1}\n\ndata: [DONE]\n\n')
    assert [event.data for event in events] == [None, b'{"a": 1}', b"[DONE]"]
    assert [event.is_content for event in events] == [False, True, True]
    assert events[2].is_done
    assert events[1].raw == b'data: {"a": 1}\n\n'


def test_events_split_across_chunks_in_any_place() -> None:
    stream = b'data: {"a": 1}\n\nevent: x\ndata: {"b"\ndata: : 2}\n\n'
    for cut in range(1, len(stream)):
        decoder = SSEDecoder()
        events = decoder.feed(stream[:cut]) + decoder.feed(stream[cut:]) + decoder.flush()
        assert [event.data for event in events] == [b'{"a": 1}', b'{"b"\n: 2}'], cut


def test_crlf_line_ends_even_when_split() -> None:
    decoder = SSEDecoder()
    events = decoder.feed(b"data: x\r") + decoder.feed(b"\n\r\ndata: y\r\n\r\n")
    assert [event.data for event in events] == [b"x", b"y"]


def test_flush_returns_an_unterminated_last_event() -> None:
    decoder = SSEDecoder()
    assert decoder.feed(b"data: tail") == []
    assert [event.data for event in decoder.flush()] == [b"tail"]
    assert decoder.flush() == []


def test_data_without_space_and_multiple_fields() -> None:
    (event,) = SSEDecoder().feed(b"id: 7\ndata:x\nretry: 10\n\n")
    assert event.data == b"x"


def test_over_long_event_is_a_protocol_error() -> None:
    with pytest.raises(SSEProtocolError):
        SSEDecoder().feed(b"data: " + b"x" * (MAX_EVENT_BYTES + 1))
