"""A request body that turns malformed after its head was handled (rev26: the handler waited
for the rest of the body with no answer until the client gave up, recorded as gone).

The real gateway in-process, a real socket, records caught by `MemoryQueue`.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from aiohttp import web

from gateway_support import MemoryQueue, published, running_gateway, settings_for, tiny_upstream

pytestmark = pytest.mark.timeout(120)

IDS = ["00000000-0000-4000-8000-000000000000"]


def head(rid: str, *extra: bytes) -> bytes:
    return (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-test-openai\r\nLlmtap-Request-Id: " + rid.encode() + b"\r\n"
        + b"".join(extra) + b"\r\n"
    )  # fmt: skip


async def answering_upstream() -> tuple[web.AppRunner, int, list[bytes]]:
    reached: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        reached.append(await request.read())
        return web.json_response({"id": "x", "object": "chat.completion", "choices": []})

    runner, port = await tiny_upstream(handler)
    return runner, port, reached


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.read(), timeout=30)  # EOF: the gateway closed


async def test_a_chunked_body_malformed_in_the_read_of_its_head_is_answered_400_and_recorded(
    tmp_path: Path,
) -> None:
    """rev27: the same bytes in one read got aiohttp's own 400 and no record (the parser failed
    before the head was handed over): parsed again, the request is handled and fails its read."""
    runner, port, reached = await answering_upstream()
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(
                head(IDS[0], b"Transfer-Encoding: chunked\r\n") + b'5\r\n{"mod\r\nzz\r\nabc\r\n0\r\n\r\n'
            )
            await writer.drain()
            raw = await read_to_eof(reader)
            writer.close()
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert raw.startswith(b"HTTP/1.1 400") and b"llmtap_bad_request" in raw, raw[:300]
    assert raw.count(b"HTTP/1.") == 1
    assert not reached
    assert (rec.id, rec.status, rec.outcome) == (IDS[0], 400, "completed")
    assert rec.error is not None and rec.error.startswith("malformed request body: Invalid character")


async def test_a_chunked_body_that_turns_malformed_is_answered_400_and_recorded(tmp_path: Path) -> None:
    runner, port, reached = await answering_upstream()
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, _):
            sock = socket.create_connection(("127.0.0.1", svc.port))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader, writer = await asyncio.open_connection(sock=sock)
            expect = b"Transfer-Encoding: chunked\r\nExpect: 100-continue\r\n"
            writer.write(head(IDS[0], expect) + b'5\r\n{"mod\r\n')
            await writer.drain()
            # The gateway's handler has the head (it says so before reading the body): the
            # bad chunk comes in a read of its own, whatever the machine's load.
            cont = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=30)
            assert cont.startswith(b"HTTP/1.1 100 Continue"), cont
            writer.write(b"zz\r\nabc\r\n0\r\n\r\n")
            await writer.drain()
            raw = await read_to_eof(reader)  # answered and closed, not left waiting
            writer.close()
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert raw.startswith(b"HTTP/1.1 400"), raw[:300]
    assert b"llmtap_bad_request" in raw and raw.count(b"HTTP/1.") == 1  # one answer, not two
    assert not reached  # nothing went upstream
    assert (rec.id, rec.status, rec.outcome) == (IDS[0], 400, "completed")
    assert rec.error is not None
    assert rec.error.startswith("malformed request body: Invalid character in chunk")
    assert "zz" not in rec.error  # the reason, not the client's bytes
