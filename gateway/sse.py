"""Server-sent event framing (pure): split an upstream byte stream into events.

Stream timers count content events (blocks with a `data:` line), never bytes: a block of
comments only (`: keep-alive`) proves the socket lives, not that tokens flow.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_EVENT_BYTES = 1024 * 1024  # an event this large without a terminator is not SSE


class SSEProtocolError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Event:
    raw: bytes  # the whole block with its blank-line terminator, forwarded as is
    data: bytes | None  # the joined `data:` lines; None for a comment-only block

    @property
    def is_content(self) -> bool:
        return self.data is not None

    @property
    def is_done(self) -> bool:
        return self.data == b"[DONE]"


DONE = Event(raw=b"data: [DONE]\n\n", data=b"[DONE]")  # how an OpenAI stream ends


class SSEDecoder:
    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[Event]:
        buffer = self._buffer + chunk
        if b"\r" in buffer:
            # Normalise line ends; keep a trailing CR back in case its LF is in the next chunk.
            held = buffer.endswith(b"\r")
            buffer = buffer[:-1] if held else buffer
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if held else b"")
        *blocks, self._buffer = buffer.split(b"\n\n")
        if len(self._buffer) > MAX_EVENT_BYTES:
            raise SSEProtocolError("upstream sent an over-long SSE event")
        return [_event(block) for block in blocks if block.strip(b"\n")]

    def flush(self) -> list[Event]:
        """Whatever is left at the end of the stream (a last event without a blank line)."""
        rest, self._buffer = self._buffer.strip(b"\r\n"), b""
        return [_event(rest)] if rest else []


def _event(block: bytes) -> Event:
    block = block.lstrip(b"\n")
    if b"\n" not in block and block.startswith(b"data: "):  # the common case: one data line
        return Event(raw=block + b"\n\n", data=block[6:])
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value.startswith(b" ") else value)
    return Event(raw=block + b"\n\n", data=b"\n".join(data) if data else None)
