"""A hostile upstream: an endless body, a compressed bomb, a giant SSE line, JSON nested
100,000 deep. Each is a 502 `upstream_protocol_error` with its reason, and the gateway's
memory does not grow with what the upstream sends."""

from __future__ import annotations

import asyncio
import resource
import zlib
from collections.abc import Iterator

import httpx2 as httpx
import pytest

from tests.conftest import CHAT, GatewayFactory, RawServer, one_route

LIMIT = 1024 * 1024  # max_response_bytes for these routes


def _gzip_bomb(size: int) -> bytes:
    """`size` bytes of JSON gzipped, built a chunk at a time (this process must stay small)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # 31: the gzip format
    parts = [compressor.compress(b"[")]
    chunk = b"0," * 512 * 1024
    parts += [compressor.compress(chunk) for _ in range(size // len(chunk))]
    parts.append(compressor.compress(b"0]") + compressor.flush())
    return b"".join(parts)


_BOMB = _gzip_bomb(100 * 1024 * 1024)  # about 100 KB that inflate to 100 MB


class HostileUpstream(RawServer):
    """A raw HTTP/1.1 upstream; the model named in the request picks the attack."""

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            if b"endless" in body:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n[")
                while True:  # until the gateway hangs up
                    writer.write(b"1," * 32768)
                    await writer.drain()
            elif b"bomb" in body:
                bomb = _BOMB
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-encoding: gzip\r\ncontent-length: %d\r\n\r\n" % len(bomb) + bomb
                )
            elif b"giant-line" in body:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\r\ndata: ")
                while True:
                    writer.write(b"x" * 65536)
                    await writer.drain()
            elif b"deep" in body:
                deep = b"[" * 100_000 + b"]" * 100_000
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: %d\r\n\r\n" % len(deep) + deep
                )
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture(scope="module")
def hostile() -> Iterator[HostileUpstream]:
    with HostileUpstream() as upstream:
        yield upstream


@pytest.mark.parametrize(
    ("attack", "stream"),
    [("endless", False), ("bomb", False), ("deep", False), ("giant-line", True)],
)
def test_a_hostile_upstream_is_a_502_and_memory_stays_flat(
    gateway: GatewayFactory, hostile: HostileUpstream, attack: str, stream: bool
) -> None:
    data = one_route(
        target_model=attack, upstream={"max_response_bytes": LIMIT}, budget={"total_s": 20}
    )
    data["upstreams"][0]["base_url"] = f"http://127.0.0.1:{hostile.port}/v1"
    data["routes"][0]["upstream_stream"] = False  # the whole body, as the attack sends it
    server = gateway(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    response = httpx.post(
        f"{server.url}/v1/chat/completions",
        json={"model": "m", "messages": CHAT, "stream": stream},
        timeout=30,
    )
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert response.status_code == 502, response.text[:200]
    error = response.json()["error"]
    assert error["code"] == "upstream_protocol_error"
    assert error["message"].rstrip(": ") != "The upstream broke the protocol"  # has a reason
    assert grown_mib < 64  # the bomb alone would be 100 MB
