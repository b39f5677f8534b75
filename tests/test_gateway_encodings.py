"""Usage is read from brotli- and zstd-compressed responses, which the client gets byte-exact.

The upstream here is a small aiohttp app answering with fixed OpenAI bodies, compressed the
way a server or CDN in front of a provider does (brotli; zstd with a frame per flush).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import brotli
import pytest
import zstandard
from aiohttp import web

from gateway_support import MemoryQueue, running_gateway, settings_for, wait_for

pytestmark = pytest.mark.timeout(60)

USAGE = {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26}
BODY = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
).encode()
HEAD = '{"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
EVENTS = [
    ("data: " + HEAD + '"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}\n\n').encode(),
    ("data: " + HEAD + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n').encode(),
    ("data: " + HEAD + '"choices":[],"usage":' + json.dumps(USAGE) + "}\n\n").encode(),
    b"data: [DONE]\n\n",
]


async def answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    if request.headers.get("x-want") == "br-json":
        return web.Response(
            body=brotli.compress(BODY), headers={"Content-Type": "application/json", "Content-Encoding": "br"}
        )
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Content-Encoding": "zstd"})
    await resp.prepare(request)
    for event in EVENTS:  # one zstd frame per event, as a server flushing per event sends
        await resp.write(zstandard.ZstdCompressor().compress(event))
    await resp.write_eof()
    return resp


@pytest.fixture
async def upstream() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


async def test_brotli_and_multi_frame_zstd(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    req = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]}
    async with (
        running_gateway(settings_for(upstream, tmp_path, openai_stream_usage=False), q) as (_, gw),
        aiohttp.ClientSession(auto_decompress=False) as http,
    ):
        url = f"{gw}/openai/v1/chat/completions"
        async with http.post(url, json=req, headers={"x-want": "br-json"}) as r:
            raw_json = await r.read()
        async with http.post(url, json={**req, "stream": True}, headers={"x-want": "zstd-sse"}) as r:
            raw_sse = await r.read()
        await wait_for(lambda: len(q.messages) >= 2, timeout=20)
        await asyncio.sleep(0.05)
        br_rec, zstd_rec = q.records()
    assert brotli.decompress(raw_json) == BODY  # relayed compressed, byte-exact
    assert zstandard.ZstdDecompressor().decompressobj(read_across_frames=True).decompress(
        raw_sse
    ) == b"".join(EVENTS)
    for rec in (br_rec, zstd_rec):
        u = rec.usage
        assert (u.source, u.prompt_tokens, u.completion_tokens, u.total_tokens) == ("provider", 21, 5, 26)
        assert rec.model == "gpt-4o-mini"
    assert zstd_rec.streamed and zstd_rec.outcome == "completed"
