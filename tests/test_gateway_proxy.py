"""The gateway end to end: a real aiohttp gateway between real HTTP clients and the fake
OpenAI/Anthropic upstream (or a tiny purpose-built upstream where bytes must be controlled).

What is checked is what a user relies on: the upstream gets what the client sent, the client
gets what the upstream sent, streams flow chunk by chunk, failures look the way they should,
and every request ends up as exactly one correct record — without credentials.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import hashlib
import json
import os
import re
import struct
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from gateway_support import (
    DirBodyStore,
    MemoryQueue,
    fake_requests,
    published,
    running_gateway,
    settings_for,
    tiny_upstream,
    wait_for,
)
from llmtap.gateway.publisher import QueueSink
from llmtap.handlers import streams
from llmtap.queue.base import Message
from llmtap.record import LogRecord, body_bytes, decode, decompress, encode
from llmtap.testing.fake_upstream import expected_usage, reply_text

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(auto_decompress=False) as s:
        yield s


CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello from the test"}]}
MESSAGES = {
    "model": "claude-sonnet-4-5",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi there"}],
}
OPENAI_AUTH = {"Authorization": "Bearer sk-test-openai"}
ANTHROPIC_AUTH = {"x-api-key": "sk-ant-test", "anthropic-version": "2023-06-01"}


def normalize_ids(data: bytes) -> bytes:
    """The fake mints fresh ids and timestamps per call; blank them to compare two calls."""
    data = re.sub(rb'"(chatcmpl|msg|call|toolu|req)_?[-A-Za-z0-9]*"', rb'"ID"', data)
    return re.sub(rb'"created":\s*\d+', rb'"created":0', data)


async def raw_request(port: int, head: bytes, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    """Send exactly these bytes; read the whole response (the request says Connection: close)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head_part, _, rest = data.partition(b"\r\n\r\n")
    lines = head_part.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [(k, v.strip()) for k, v in (line.split(":", 1) for line in lines[1:])]
    if any(k.lower() == "transfer-encoding" for k, _ in headers):
        out = b""
        while True:
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                break
            out += rest[:size]
            rest = rest[size + 2 :]
        rest = out
    return status, headers, rest


# -- pass-through exactness -----------------------------------------------------------------------


async def test_request_reaches_upstream_unchanged(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    body = (
        b'{"model": "gpt-4o",   "messages": [{"role":"user",'
        b'"content":"h\\u00e9llo w\xc3\xb6rld"}], "temperature": 0.70}'
    )
    sent = [
        ("Content-Type", "application/json"),
        ("Authorization", "Bearer sk-test"),
        ("X-Custom-Thing", "a, b"),
        ("OpenAI-Organization", "org-1"),
        ("X-Dup", "1"),
        ("x-dup", "2"),
        ("Accept", "text/plain"),
    ]
    llmtap = [("Llmtap-User-Id", "u1"), ("LLMTAP-Property-Team", "Search"), ("Llmtap-Session-Id", "s1")]
    target = "/v1/chat/completions?api-version=2024-01-01&x=%2Fy%20z"
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, _):
        head = f"POST /openai{target} HTTP/1.1\r\nHost: gw.example\r\n"
        for k, v in sent[:3] + llmtap + sent[3:]:
            head += f"{k}: {v}\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        assert svc.port is not None
        status, headers, _ = await raw_request(svc.port, head.encode(), body)
        assert status == 200
        (rec,) = await published(svc, q, 1)

    (got,) = await fake_requests(http, f"http://127.0.0.1:{upstream}")
    assert got["method"] == "POST"
    assert got["raw_path"] == target
    assert got["body_b64"] and got["body_sha256"] == hashlib.sha256(body).hexdigest()
    forwarded = [(k, v) for k, v in got["headers"] if k.lower() not in ("host", "content-length")]
    # same names, case, order, duplicates (a repeat keeps its first spelling); no Llmtap-*; nothing added
    assert forwarded == [(k if k != "x-dup" else "X-Dup", v) for k, v in sent]
    assert dict(got["headers"])["Host"] == f"127.0.0.1:{upstream}"

    assert rec.user_id == "u1" and rec.session_id == "s1" and rec.properties == {"team": "Search"}
    assert rec.path == "/v1/chat/completions" and rec.method == "POST" and rec.provider == "openai"
    assert rec.target_url == f"http://127.0.0.1:{upstream}{target}"
    assert body_bytes(rec.request_body) == body  # type: ignore[arg-type]
    assert rec.model == "gpt-4o"
    assert "authorization" not in rec.request_headers
    assert rec.request_headers["x-dup"] == "1, 2"
    assert dict(headers)["Llmtap-Request-Id"] == rec.id


GZ_BODY = gzip.compress(
    json.dumps({"id": "x", "usage": {"prompt_tokens": 3, "completion_tokens": 4}}).encode()
)


async def gz_handler(request: web.Request) -> web.StreamResponse:
    await request.read()
    status = int(request.headers.get("x-status", "200"))
    resp = web.Response(status=status, body=GZ_BODY)
    resp.headers["Content-Type"] = "application/json"
    resp.headers["Content-Encoding"] = "gzip"
    resp.headers["X-Upstream-Thing"] = "Mixed Case Value"
    resp.headers.add("Set-Cookie", "session=SECRET-COOKIE-7; Path=/")
    resp.headers.add("Set-Cookie", "other=1")
    resp.headers["Retry-After"] = "3"
    resp.headers["Date"] = "Thu, 01 Jan 2026 00:00:00 GMT"
    return resp


async def test_response_bytes_and_headers_relayed_unchanged(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    runner, port = await tiny_upstream(gz_handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            for status in (200, 503):
                h = {"Accept-Encoding": "gzip", "x-status": str(status)}
                async with http.post(f"http://127.0.0.1:{port}/v1/x", data=b"{}", headers=h) as r:
                    direct = (r.status, list(r.raw_headers), await r.read())
                async with http.post(f"{gw}/openai/v1/x", data=b"{}", headers=h) as r:
                    via = (r.status, list(r.raw_headers), await r.read())
                assert via[0] == direct[0] == status
                assert via[2] == direct[2] == GZ_BODY  # compressed bytes, untouched
                rid = [v for k, v in via[1] if k == b"Llmtap-Request-Id"]
                assert len(rid) == 1 and uuid.UUID(rid[0].decode())
                assert [h for h in via[1] if h[0] != b"Llmtap-Request-Id"] == direct[1]
            recs = await published(svc, q, 2)
    finally:
        await runner.cleanup()
    # usage parsed from the gzip body off the latency path; cookies not recorded
    assert recs[0].usage.prompt_tokens == 3 and recs[0].usage.completion_tokens == 4
    assert recs[0].response_body is not None
    assert (body_bytes(recs[0].response_body) or b"").startswith(b'{"id"')
    assert "set-cookie" not in recs[0].response_headers
    assert recs[1].status == 503 and recs[1].response_headers["retry-after"] == "3"


# -- streaming --------------------------------------------------------------------------------------


async def test_stream_reaches_client_chunk_by_chunk(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The upstream sends one event, then holds the rest until the client has that event: a
    gateway that buffered would hand over nothing until the hold ran out (20 s)."""
    q = MemoryQueue()
    gap = 0.3  # between the first event and the rest: a floor however slow the machine, not a race
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        hold = uuid.uuid4().hex
        # held after the role chunk and the first text: the first token is before the hold
        h = {**OPENAI_AUTH, "x-fake-chunks": "8", "x-fake-hold": hold, "x-fake-hold-after": "2"}
        released: dict[str, object] = {}
        reads = 0
        data = b""
        async with http.post(
            f"{gw}/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=h
        ) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            async for chunk in r.content.iter_any():
                reads += 1
                data += chunk
                if not released and data.count(b"\n\n") >= 2:  # the events before the hold
                    await asyncio.sleep(gap)
                    async with http.post(f"http://127.0.0.1:{upstream}/_fake/release/{hold}") as rel:
                        released = await rel.json()
        (rec,) = await published(svc, q, 1)
    assert released == {"was_holding": True}
    assert reads >= 2 and data.endswith(b"data: [DONE]\n\n")
    assert rec.streamed and rec.outcome == "completed"
    assert rec.time_to_first_token_ms is not None
    ttft, latency = rec.time_to_first_token_ms, rec.latency_ms
    assert ttft < latency - gap * 1000, (ttft, latency)


async def test_openai_stream_usage_injected_and_stripped(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    up = f"http://127.0.0.1:{upstream}"
    req = {**CHAT, "stream": True}
    req_bytes = orjson.dumps(req)
    h = {**OPENAI_AUTH, "Content-Type": "application/json", "x-fake-chunks": "6"}
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(f"{up}/v1/chat/completions", data=req_bytes, headers=h) as r:
            direct = await r.read()
        async with http.post(f"{gw}/openai/v1/chat/completions", data=req_bytes, headers=h) as r:
            via = await r.read()
        (rec,) = await published(svc, q, 1)
    assert b'"usage"' not in direct  # the plain stream has no usage at all
    assert normalize_ids(via) == normalize_ids(direct)
    sent = (await fake_requests(http, up))[-1]
    upstream_body = json.loads(__import__("base64").b64decode(sent["body_b64"]))
    assert upstream_body["stream_options"] == {"include_usage": True}
    assert int(dict(sent["headers"])["Content-Length"]) == sent["body_len"]

    exp = expected_usage("openai", req, h)
    u = rec.usage
    assert u.source == "provider"
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        exp["prompt_tokens"],
        exp["completion_tokens"],
        exp["total_tokens"],
    )
    assert body_bytes(rec.request_body) == req_bytes  # type: ignore[arg-type]  # what the client sent
    # The gateway read the usage from the last chunk and left the message to the worker.
    assert rec.response_body is None and streams.deferred(rec)
    streams.finish(rec, svc.settings.inline_body_bytes)
    assert rec.usage == u
    msg = orjson.loads(body_bytes(rec.response_body))  # type: ignore[arg-type]
    assert msg["object"] == "chat.completion"
    assert msg["choices"][0]["message"]["content"] == reply_text("openai", req, h)
    events = body_bytes(rec.response_events)  # type: ignore[arg-type]
    assert events is not None and b'"choices":[]' in events  # the raw upstream stream, usage chunk included


async def test_client_asking_for_usage_gets_it_untouched(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    up = f"http://127.0.0.1:{upstream}"
    req_bytes = orjson.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    h = {**OPENAI_AUTH, "Content-Type": "application/json"}
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", data=req_bytes, headers=h) as r:
            via = await r.read()
        (rec,) = await published(svc, q, 1)
    assert b'"choices":[]' in via and b'"usage":null' in via
    sent = (await fake_requests(http, up))[-1]
    assert sent["body_sha256"] == hashlib.sha256(req_bytes).hexdigest()
    assert rec.usage.source == "provider"


async def test_stream_usage_rewrite_can_be_disabled(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    req_bytes = orjson.dumps({**CHAT, "stream": True})
    async with running_gateway(settings_for(upstream, tmp_path, openai_stream_usage=False), q) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", data=req_bytes, headers=OPENAI_AUTH) as r:
            await r.read()
        (rec,) = await published(svc, q, 1)
    sent = (await fake_requests(http, f"http://127.0.0.1:{upstream}"))[-1]
    assert sent["body_sha256"] == hashlib.sha256(req_bytes).hexdigest()
    assert rec.usage.source == "missing" and rec.usage.total_tokens is None


async def test_anthropic_stream_record(upstream: int, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    q = MemoryQueue()
    h = {**ANTHROPIC_AUTH, "x-fake-cached-tokens": "40", "x-fake-cache-creation-tokens": "7"}
    req = {**MESSAGES, "stream": True}
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(f"{gw}/anthropic/v1/messages", json=req, headers=h) as r:
            via = await r.read()
        tools = {
            **MESSAGES,
            "stream": True,
            "tools": [{"name": "lookup", "input_schema": {"type": "object"}}],
        }
        async with http.post(f"{gw}/anthropic/v1/messages", json=tools, headers=h) as r:
            await r.read()
        text_rec, tool_rec = await published(svc, q, 2)
    assert via.count(b"event: content_block_delta") >= 2
    exp = expected_usage("anthropic", req, h)
    prompt = exp["input_tokens"] + exp["cache_read_input_tokens"] + exp["cache_creation_input_tokens"]
    u = text_rec.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        prompt,
        exp["output_tokens"],
        prompt + exp["output_tokens"],
    )
    assert (u.cached_tokens, u.cache_write_tokens) == (40, 7)
    # Usage from message_start and message_delta; the worker rebuilds the message.
    for rec in (text_rec, tool_rec):
        assert rec.response_body is None and streams.deferred(rec)
        streams.finish(rec, svc.settings.inline_body_bytes)
    assert text_rec.usage == u
    msg = orjson.loads(body_bytes(text_rec.response_body))  # type: ignore[arg-type]
    assert msg["content"] == [{"type": "text", "text": reply_text("anthropic", req, h)}]
    assert msg["stop_reason"] == "end_turn"
    assert text_rec.model == "claude-sonnet-4-5" and text_rec.streamed
    tool_msg = orjson.loads(body_bytes(tool_rec.response_body))  # type: ignore[arg-type]
    (block,) = tool_msg["content"]
    assert block["type"] == "tool_use" and block["name"] == "lookup" and isinstance(block["input"], dict)


async def test_non_stream_usage_records(upstream: int, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    q = MemoryQueue()
    h = {**OPENAI_AUTH, "x-fake-cached-tokens": "5"}
    emb = {"model": "text-embedding-3-small", "input": ["one two three", "four"]}
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(
            f"{gw}/openai/v1/chat/completions", json={**CHAT, "model": "o3-mini"}, headers=h
        ) as r:
            assert r.status == 200
        async with http.post(f"{gw}/openai/v1/embeddings", json=emb, headers=OPENAI_AUTH) as r:
            assert r.status == 200
        async with http.post(f"{gw}/anthropic/v1/messages", json=MESSAGES, headers=ANTHROPIC_AUTH) as r:
            assert r.status == 200
        chat, emb_rec, anth = await published(svc, q, 3)
    exp = expected_usage("openai", {**CHAT, "model": "o3-mini"}, h)
    assert chat.usage.prompt_tokens == exp["prompt_tokens"]
    assert chat.usage.reasoning_tokens == exp["completion_tokens_details"]["reasoning_tokens"] > 0
    assert chat.usage.cached_tokens == 5
    assert chat.time_to_first_token_ms == chat.latency_ms and not chat.streamed
    assert emb_rec.usage.prompt_tokens == emb_rec.usage.total_tokens == 4
    assert emb_rec.usage.completion_tokens is None
    ea = expected_usage("anthropic", MESSAGES)
    assert anth.usage.total_tokens == ea["input_tokens"] + ea["output_tokens"]


# -- failures ----------------------------------------------------------------------------------------


async def test_upstream_errors_pass_through(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    h = {**OPENAI_AUTH, "x-fake-status": "429", "x-fake-retry-after": "11"}
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(f"http://127.0.0.1:{upstream}/v1/chat/completions", json=CHAT, headers=h) as r:
            direct = await r.read()
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=h) as r:
            assert r.status == 429
            assert r.headers["retry-after"] == "11"
            via = await r.read()
        (rec,) = await published(svc, q, 1)
    assert normalize_ids(via) == normalize_ids(direct)
    assert rec.status == 429 and rec.outcome == "completed"
    assert rec.error and "Rate limit" in rec.error
    assert rec.usage.source == "missing"


async def test_unreachable_upstream_is_502(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    q = MemoryQueue()
    async with running_gateway(settings_for(dead, tmp_path), q) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT) as r:
            assert r.status == 502
            body = await r.json()
            rid = r.headers["Llmtap-Request-Id"]
        (rec,) = await published(svc, q, 1)
    assert body["error"]["type"] == "llmtap_upstream_unreachable"
    assert rec.id == rid and rec.outcome == "upstream_unreachable" and rec.status == 502
    assert rec.error and "could not reach" in rec.error


async def test_a_body_too_large_for_the_memory_left_is_answered_and_logged(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory reading an upload (many huge bodies at once, a memory limit): aiohttp's bare
    500 with a traceback and no record. Now a 503 saying so, with its id, and its record."""
    read = web.BaseRequest.read

    async def short_of_memory(self: web.BaseRequest) -> bytes:
        if (self.content_length or 0) > 1_000_000:
            raise MemoryError
        return await read(self)

    monkeypatch.setattr(web.BaseRequest, "read", short_of_memory)
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2_000_000}]}
        async with http.post(f"{gw}/openai/v1/chat/completions", json=big, headers=OPENAI_AUTH) as r:
            assert r.status == 503
            body = await r.json()
            rid = r.headers["Llmtap-Request-Id"]
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
            assert r.status == 200  # the next one goes through
        recs = {x.id: x for x in await published(svc, q, 2)}
    assert body["error"]["type"] == "llmtap_out_of_memory"
    rec = recs[rid]
    assert rec.status == 503 and rec.outcome == "completed" and "out of memory" in (rec.error or "")


async def test_an_upstream_header_aiohttp_will_not_write_costs_neither_the_answer_nor_its_log(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A control character in an upstream header: aiohttp's client reads it, its server refuses
    to write it. The client got a bare 500 and no record was made. Now the header is left out
    of the client's answer (the record keeps it), and the answer and its record go through."""
    from rawhttp import RawUpstream

    raw = RawUpstream(
        b"HTTP/1.1 200 O\x01K\r\nContent-Type: application/json\r\nX-Ctl: a\x01b\r\nX-Fine: yes\r\n"
        b"Content-Length: 2\r\n\r\n{}"
    )  # the reason phrase too: aiohttp refuses to write it as well
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(raw.port, tmp_path), q) as (svc, gw):
            async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
                assert r.status == 200 and await r.read() == b"{}"
                assert "X-Ctl" not in r.headers and r.headers["X-Fine"] == "yes"
                rid = r.headers["Llmtap-Request-Id"]
            (rec,) = await published(svc, q, 1)
    finally:
        raw.close()
    assert rec.id == rid and rec.status == 200 and rec.outcome == "completed"
    assert ("x-ctl", "a\x01b") in [(k.lower(), v) for k, v in rec.response_headers.items()]


async def test_headers_a_connection_header_lists_are_not_forwarded_either_way(tmp_path: Path) -> None:
    """RFC 9110 7.6.1: a header named in `Connection` is hop-by-hop. Both were forwarded."""
    from rawhttp import RawUpstream, exchange, request_bytes

    raw = RawUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: X-Bar\r\nX-Bar: hop\r\n"
        b"X-Keep: yes\r\nContent-Length: 2\r\n\r\n{}"
    )
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(raw.port, tmp_path), q) as (svc, gw):
            port = int(gw.rsplit(":", 1)[1])
            head = [
                (b"Authorization", b"Bearer sk-test"),
                (b"Content-Type", b"application/json"),
                (b"Connection", b"keep-alive, X-Hop"),
                (b"X-Hop", b"hop-only"),
                (b"X-Stay", b"yes"),
            ]
            ans = await asyncio.to_thread(
                exchange, port, request_bytes(b"POST", b"/openai/v1/chat/completions", head, b"{}")
            )
            await published(svc, q, 1)
    finally:
        raw.close()
    assert ans is not None and ans.status == 200 and ans.body == b"{}"
    assert ans.header("x-bar") is None and ans.header("x-keep") == "yes"
    (sent,) = raw.heads
    assert b"x-hop:" not in sent.lower() and b"x-stay: yes" in sent.lower()


@pytest.mark.parametrize("whole", [True, False, "error"])
async def test_a_close_delimited_stream_that_stops_before_its_end_is_a_cut(
    tmp_path: Path, http: aiohttp.ClientSession, whole: bool | str
) -> None:
    """Without a length or chunks the body ends where the connection does: an upstream that
    dropped it mid-event looked complete, and the record said `completed`."""
    from rawhttp import RawUpstream

    event = b'data: {"id":"c1","object":"chat.completion.chunk","choices":[{"delta":{"content":"Hi"}}]}\n\n'
    body = {
        True: event + b"data: [DONE]\n\n",
        False: event + event[:30],
        "error": event + b'data: {"error":{"message":"backend overloaded","type":"server_error"}}\n\n',
    }[whole]
    raw = RawUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body, close=True
    )
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(raw.port, tmp_path), q) as (svc, gw):
            async with http.post(
                f"{gw}/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=OPENAI_AUTH
            ) as r:
                assert r.status == 200 and await r.read() == body
            (rec,) = await published(svc, q, 1)
    finally:
        raw.close()
    assert rec.streamed
    if whole is True:
        assert rec.outcome == "completed" and rec.error is None
    elif whole == "error":  # ended by the upstream's error event: not a cut (the worker says upstream_error)
        assert rec.outcome == "completed" and rec.error == "backend overloaded"
    else:
        assert rec.outcome == "upstream_cut" and "before the stream's end marker" in (rec.error or "")


@pytest.mark.parametrize(("whole", "big"), [(True, False), (False, False), (True, True), (False, True)])
async def test_a_chunked_responses_stream_without_its_end_event_is_a_cut(
    tmp_path: Path, http: aiohttp.ClientSession, whole: bool, big: bool
) -> None:
    """Every Responses API stream ends with `response.completed` (or another end): one whose
    chunks a proxy before the provider closed before it was recorded `completed` (stop 56),
    since only a close-delimited body was checked for its end marker. Past the size limit
    (`big`) only the stream's end is kept, and `response.completed`, as long as the output it
    repeats, began before it: a whole stream was taken for a cut (rev32), and then a cut one
    for a whole (rev33)."""
    from rawhttp import RawUpstream

    pending = {"id": "r1", "object": "response", "model": "gpt-4.1", "status": "in_progress", "output": []}
    text = "word " * 40_000 if big else "Hi"  # 200 KB
    usage = {"input_tokens": 11, "output_tokens": 40_000, "total_tokens": 40_011}
    part = {"type": "output_text", "text": text, "annotations": []}
    done = {
        **pending,
        "status": "completed",
        "output": [{"type": "message", "content": [part]}],
        "usage": usage,
    }
    events = [{"type": "response.created", "response": pending}]
    events.append({"type": "response.output_text.delta", "output_index": 0, "delta": text})
    if whole:
        events.append({"type": "response.completed", "response": done})
    elif big:
        events.append({"type": "response.output_text.delta", "output_index": 0, "delta": text})
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    raw = RawUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n" + chunked
    )
    q = MemoryQueue()
    try:
        settings = settings_for(raw.port, tmp_path, max_body_bytes=300_000)
        async with running_gateway(settings, q) as (svc, gw):
            req = {"model": "gpt-4.1", "input": "hi", "stream": True}
            async with http.post(f"{gw}/openai/v1/responses", json=req, headers=OPENAI_AUTH) as r:
                assert r.status == 200 and await r.read() == body
            (rec,) = await published(svc, q, 1)
    finally:
        raw.close()
    assert rec.streamed and (len(body) > 300_000) == big
    if whole:
        assert rec.outcome == "completed" and rec.error is None
        assert (rec.usage.source, rec.usage.completion_tokens) == ("provider", 40_000)
    else:
        assert rec.outcome == "upstream_cut" and "before the stream's end marker" in (rec.error or "")


async def test_a_relay_that_fails_for_any_reason_still_logs_the_request(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a client leaving was caught while relaying: any other error (a bug, a write aiohttp
    refuses) lost the record. It is recorded as a cut answer, with what went wrong."""
    write = web.StreamResponse.write
    calls = 0

    async def failing(self: web.StreamResponse, data: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("boom")
        await write(self, data)

    monkeypatch.setattr(web.StreamResponse, "write", failing)
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        h = {**OPENAI_AUTH, "x-fake-chunks": "8"}
        with contextlib.suppress(aiohttp.ClientError):
            async with http.post(
                f"{gw}/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=h
            ) as r:
                await r.read()
        (rec,) = await published(svc, q, 1)
    assert rec.outcome == "upstream_cut" and rec.status == 200
    assert rec.error is not None and "llmtap could not relay" in rec.error and "boom" in rec.error


async def test_an_answer_that_fails_before_its_headers_went_out_is_a_502_with_its_id(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nothing sent yet when relaying failed: the client is told, with the request's id."""
    prepare = web.StreamResponse.prepare
    calls = 0

    async def failing(self: web.StreamResponse, request: web.BaseRequest) -> Any:
        nonlocal calls
        if request.path.startswith("/openai/") and not calls:  # the gateway's, not the upstream's
            calls += 1
            raise RuntimeError("boom")
        return await prepare(self, request)

    monkeypatch.setattr(web.StreamResponse, "prepare", failing)
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
            assert r.status == 502
            body = await r.json()
            rid = r.headers["Llmtap-Request-Id"]
        (rec,) = await published(svc, q, 1)
    assert body["error"]["type"] == "llmtap_upstream_cut" and "boom" in body["error"]["message"]
    assert rec.id == rid and rec.status == 502 and rec.outcome == "upstream_cut"


async def test_slow_upstream_is_504(upstream: int, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, upstream_read_timeout=0.3)
    async with running_gateway(s, q) as (svc, gw):
        h = {**OPENAI_AUTH, "x-fake-delay-ms": "60000"}
        t0 = time.monotonic()
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=h) as r:
            assert r.status == 504
            body = await r.json()
            assert "Llmtap-Request-Id" in r.headers
        assert time.monotonic() - t0 < 30  # the upstream's answer is a minute away
        (rec,) = await published(svc, q, 1)
    assert body["error"]["type"] == "llmtap_upstream_timeout"
    assert rec.outcome == "upstream_timeout" and rec.status == 504


async def test_client_disconnect_mid_stream_stops_upstream_read(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        h = {**OPENAI_AUTH, "x-fake-chunk-delay-ms": "100", "x-fake-chunks": "600"}
        t0 = time.monotonic()
        r = await http.post(f"{gw}/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=h)
        first = await r.content.readany()
        assert first.startswith(b"data: ")
        r.close()  # drop the connection mid-stream
        (rec,) = await published(svc, q, 1)
        noticed = time.monotonic() - t0
    assert rec.outcome == "client_disconnected"
    assert noticed < 30  # the full stream would take 60 s: the gateway stopped at once
    assert rec.latency_ms < 30_000
    assert rec.streamed


async def test_upstream_cut_mid_stream(upstream: int, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        h = {**ANTHROPIC_AUTH, "x-fake-cut-after": "4", "x-fake-chunk-delay-ms": "20"}
        got = b""
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(
                f"{gw}/anthropic/v1/messages", json={**MESSAGES, "stream": True}, headers=h
            ) as r:
                async for chunk in r.content.iter_any():
                    got += chunk
        h2 = {**OPENAI_AUTH, "x-fake-cut-after": "100"}
        with pytest.raises(aiohttp.ClientPayloadError):
            async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=h2) as r:
                await r.read()
        stream_rec, json_rec = await published(svc, q, 2)
    assert got.count(b"event: ") == 4  # the client got what arrived
    assert stream_rec.outcome == "upstream_cut" and stream_rec.error
    assert body_bytes(stream_rec.response_events) == got  # type: ignore[arg-type]
    assert stream_rec.usage.prompt_tokens is not None  # message_start arrived before the cut
    # ... with its placeholder output count: the record says these are not the final counts.
    assert stream_rec.usage.source == "partial"
    assert json_rec.outcome == "upstream_cut"
    assert json_rec.response_body is not None and json_rec.response_body.size == 100
    # aiohttp's parser repr ("<ContentLengthError: 400, message=...>") named a 400 on a 200.
    for r in (stream_rec, json_rec):
        assert r.error is not None and "Not enough data" in r.error and "400" not in r.error, r.error


async def test_malformed_json_is_proxied_and_logged(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    bad = b'{"model": "gpt-4o", "stream": true, "messages": [oops'
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        h = {**OPENAI_AUTH, "Content-Type": "application/json"}
        async with http.post(f"{gw}/openai/v1/chat/completions", data=bad, headers=h) as r:
            assert r.status == 400  # the upstream's verdict, relayed
            assert (await r.json())["error"]["type"] == "invalid_request_error"
        (rec,) = await published(svc, q, 1)
    sent = (await fake_requests(http, f"http://127.0.0.1:{upstream}"))[-1]
    assert sent["body_sha256"] == hashlib.sha256(bad).hexdigest()
    assert rec.model is None
    assert body_bytes(rec.request_body) == bad  # type: ignore[arg-type]
    assert rec.status == 400


# -- what the record holds (and does not) ------------------------------------------------------------


JWT = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbm4iLCJlbWFpbCI6ImFubkBjb3JwIn0.c2lnbmF0dXJlLWJ5dGVz"


async def test_what_a_front_proxy_says_about_the_network_is_recorded_not_sent_to_the_provider(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Found by the reverse-proxy check: behind nginx, X-Forwarded-For (users' internal
    addresses), X-Forwarded-Host and Via went on to OpenAI; and a default nginx buffered every
    stream whole, as nothing told it not to."""
    q = MemoryQueue()
    trail = {
        "X-Forwarded-For": "10.9.8.7, 127.0.0.1", "X-Real-IP": "10.9.8.7", "Forwarded": "for=10.9.8.7",
        "X-Forwarded-Host": "llm.internal.example", "X-Forwarded-Proto": "https", "Via": "1.1 nginx",
        "X-Original-Forwarded-For": "10.9.8.7", "Fastly-Client-IP": "10.9.8.7", "X-Original-URI": "/llm/x",
        # an authenticating front door's token and signed assertion (oauth2-proxy, AWS ALB OIDC)
        "X-Forwarded-Access-Token": "ya29.front-door-token", "X-Amzn-Oidc-Data": JWT,
        "X-Forwarded-Email": "ann@corp.example",
    }  # fmt: skip
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        url = f"{gw}/openai/v1/chat/completions"
        async with http.post(url, json={**CHAT, "stream": True}, headers={**OPENAI_AUTH, **trail}) as r:
            assert r.status == 200 and r.headers["X-Accel-Buffering"] == "no"
            await r.read()
        async with http.post(url, json=CHAT, headers={**OPENAI_AUTH, **trail}) as r:
            assert r.status == 200 and "X-Accel-Buffering" not in r.headers  # a stream's only
        recs = await published(svc, q, 2)
    sent = (await fake_requests(http, f"http://127.0.0.1:{upstream}"))[-2:]
    for got in sent:
        names = {k.lower() for k, _ in got["headers"]}
        assert not names & {k.lower() for k in trail}, names
    for rec in recs:
        assert rec.request_headers["x-forwarded-for"] == "10.9.8.7, 127.0.0.1"
        assert rec.request_headers["via"] == "1.1 nginx"
        assert rec.request_headers["x-forwarded-email"] == "ann@corp.example"  # who asked: kept
        assert "x-amzn-oidc-data" not in rec.request_headers and JWT.encode() not in encode(rec)
        assert "x-forwarded-access-token" not in rec.request_headers


async def test_credentials_never_reach_the_record(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    secrets = [f"SECRET{i}-{uuid.uuid4().hex}" for i in range(8)]
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        await request.read()
        resp = web.Response(body=b'{"ok":true}', content_type="application/json")
        resp.headers.add("Set-Cookie", f"sid={secrets[6]}")
        resp.headers["X-Session-Token"] = secrets[7]
        return resp

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    bodies = DirBodyStore(tmp_path / "bodies")
    try:
        async with running_gateway(settings_for(port, tmp_path, inline_body_bytes=0), q, bodies) as (svc, gw):
            h = {
                "Authorization": f"Bearer {secrets[0]}",
                "x-api-key": secrets[1],
                "api-key": secrets[2],
                "X-Custom-Token": secrets[3],
                "Llmtap-Auth": f"Bearer {secrets[4]}",
                "Cookie": f"c={secrets[5]}",
                "X-Goog-Api-Key": secrets[5],
            }
            async with http.post(
                f"{gw}/openai/v1/chat/completions?api-key={secrets[2]}", json=CHAT, headers=h
            ) as r:
                assert r.status == 200
                assert r.headers["X-Session-Token"] == secrets[7]  # the client still gets it
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    (up_headers,) = seen
    assert up_headers["Authorization"] == f"Bearer {secrets[0]}" and up_headers["x-api-key"] == secrets[1]
    assert "Llmtap-Auth" not in up_headers
    everything = b"".join(m.value for m in q.messages) + encode(rec)
    everything += b"".join(p.read_bytes() for p in (tmp_path / "bodies").rglob("*") if p.is_file())
    everything += b"".join(decompress(p.read_bytes()) for p in (tmp_path / "bodies").rglob("*.zst"))
    for s in secrets:
        assert s.encode() not in everything, s
    assert "api-key=***" in rec.target_url


@pytest.mark.parametrize("coding", ["identity", "gzip"])
async def test_an_error_answer_quoting_the_key_is_stored_with_it_masked(
    coding: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Found by the failed-requests check: an upstream that quotes the caller's key in its 401
    ("Incorrect API key provided: Bearer ...") had the key stored in the response body, shown
    by the dashboard and found by body search. The client still gets the answer as sent."""
    key, other, param = (f"tenant{i}{uuid.uuid4().hex}" for i in range(3))  # no known key shape
    sent: list[bytes] = []
    plain: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        h = request.headers
        quoted = f"{h['Authorization']} / {h['x-api-key']} / {request.query['key']}"
        body = json.dumps({"error": {"message": f"Incorrect API key provided: {quoted}"}}).encode()
        plain.append(body)
        headers = {"Content-Type": "application/json"}
        if coding == "gzip":
            body, headers["Content-Encoding"] = gzip.compress(body), "gzip"
        sent.append(body)
        return web.Response(status=401, body=body, headers=headers)

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            h = {"Authorization": f"Bearer {key}", "x-api-key": other}
            async with http.post(f"{gw}/openai/v1/chat/completions?key={param}", json=CHAT, headers=h) as r:
                assert r.status == 401
                assert await r.read() == sent[0]  # the client's answer is the upstream's
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    stored = body_bytes(rec.response_body)  # type: ignore[arg-type]
    for secret in (key, other, param):
        assert secret.encode() not in encode(rec), secret
    assert json.loads(stored)["error"]["message"] == "Incorrect API key provided: Bearer *** / *** / ***"
    # `size` stays the body's as it travelled (decoded), not the masked text's.
    assert rec.response_body is not None and rec.response_body.size == len(plain[0])
    assert rec.error is not None and key not in rec.error and "Incorrect API key provided" in rec.error


async def test_every_error_answer_quoting_a_key_has_it_masked(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Found by the review of that fix: a streamed error event, a 2xx error object, a Basic
    password, a key JSON writes with `\\/`, and a key cut in half at LLMTAP_MAX_BODY_BYTES were
    still stored; and OpenAI's fine-tuning jobs (`"error": {}` while all is well) read as errors."""
    slash_key = "tenant/" + uuid.uuid4().hex
    password = "pw-" + uuid.uuid4().hex
    long_key = "tenant" + uuid.uuid4().hex * 4

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        mode, h = request.headers["x-mode"], request.headers
        if mode == "sse":  # an error event in a stream (Anthropic's form), status 401
            event = {
                "type": "error",
                "error": {"type": "authentication_error", "message": f"bad key {h['x-api-key']}"},
            }
            return web.Response(
                status=401, body=b"event: error\ndata: " + json.dumps(event).encode() + b"\n\n",
                content_type="text/event-stream",
            )  # fmt: skip
        if mode == "basic":  # a 200 whose body is an error, quoting the decoded password
            return web.json_response({"error": {"message": f"user u rejected with password {password}"}})
        if mode == "slash":
            escaped = slash_key.replace("/", "\\/").encode()  # as PHP's json_encode writes it
            return web.Response(status=403, body=b'{"error": {"message": "key ' + escaped + b'"}}')
        if mode == "cut":  # the key straddles the kept bytes' end
            pad = b'{"error": {"message": "' + b"x" * (4096 - 23 - 20)
            return web.Response(status=401, body=pad + long_key.encode() + b'"}}')
        if mode == "flag":  # `"error": true` beside the message, and a debug header quoting the key
            key = h["Authorization"][7:]
            headers = {"X-Debug": f"rejected {key}"}
            return web.json_response({"error": True, "message": f"key {key} revoked"}, headers=headers)
        if mode == "placeholder":  # LiteLLM's docs' `Bearer anything`: no key to hunt down in words
            return web.json_response(
                {"error": {"message": "model `anything-llm` does not exist"}}, status=404
            )
        return web.json_response({"object": "fine_tuning.job", "status": "running", "error": {}})

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    auth = {
        "sse": {"x-api-key": uuid.uuid4().hex + "k"},
        "basic": {"Authorization": "Basic " + base64.b64encode(f"u:{password}".encode()).decode()},
        "slash": {"Authorization": f"Bearer {slash_key}"},
        "cut": {"Authorization": f"Bearer {long_key}"},
        "job": {"Authorization": "Bearer " + uuid.uuid4().hex},
        "flag": {"Authorization": "Bearer sk-live-" + uuid.uuid4().hex},
        "placeholder": {"Authorization": "Bearer anything"},
    }
    try:
        async with running_gateway(settings_for(port, tmp_path, max_body_bytes=4096), q) as (svc, gw):
            for mode, h in auth.items():
                async with http.post(
                    f"{gw}/openai/v1/chat/completions", json=CHAT, headers={**h, "x-mode": mode}
                ) as r:
                    await r.read()
            recs = dict(zip(auth, await published(svc, q, len(auth)), strict=True))
    finally:
        await runner.cleanup()
    flag_key = auth["flag"]["Authorization"][7:]
    secrets = [
        auth["sse"]["x-api-key"],
        password,
        slash_key,
        slash_key.replace("/", "\\/"),
        long_key[:12],
        flag_key,
    ]
    for mode, rec in recs.items():
        for secret in secrets:
            assert secret.encode() not in encode(rec), (mode, secret)
    assert recs["basic"].error == "user u rejected with password ***"
    # a header quoting a key's shape anywhere is a credential whole since rev23: not recorded
    assert recs["flag"].error == "key *** revoked" and "x-debug" not in recs["flag"].response_headers
    assert recs["placeholder"].error == "model `anything-llm` does not exist"
    assert recs["job"].error is None and recs["job"].outcome == "completed"


async def test_an_answer_that_is_an_error_says_so_in_the_record(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Found by the failed-requests check: a 502 page from a load balancer had no error text (the
    dashboard explained nothing), and a 200 whose JSON is an error object (OpenRouter) none either."""

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.headers.get("x-mode") == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1></body></html>"
            return web.Response(status=502, body=page, content_type="text/html")
        if request.headers.get("x-mode") == "empty":
            return web.Response(status=503)
        return web.json_response({"error": {"message": "No endpoints found for x/y.", "code": 404}})

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            for mode in ("html", "empty", "json"):
                h = {**OPENAI_AUTH, "x-mode": mode}
                async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=h) as r:
                    await r.read()
            html, empty, json_ = await published(svc, q, 3)
    finally:
        await runner.cleanup()
    assert html.error == "upstream answered 502 (text/html, 50 bytes)", html.error
    assert empty.error == "upstream answered 503 (no content type, 0 bytes)", empty.error
    assert (json_.status, json_.outcome, json_.error) == (200, "completed", "No endpoints found for x/y.")


async def test_large_body_goes_to_the_body_store(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    bodies = DirBodyStore(tmp_path / "bodies")
    # incompressible words, so the zstd form stays large too
    words = " ".join(os.urandom(6).hex() for _ in range(12000))
    req = {"model": "gpt-4o", "messages": [{"role": "user", "content": words}]}
    s = settings_for(upstream, tmp_path, inline_body_bytes=16 * 1024)
    async with running_gateway(s, q, bodies) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", json=req, headers=OPENAI_AUTH) as r:
            client_got = await r.read()
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
            await r.read()
        big, small = await published(svc, q, 2)
    assert big.request_body is not None and big.request_body.ref is not None and big.request_body.data is None
    assert big.request_body.ref.startswith(f"default/{big.started_at:%Y/%m/%d}/{big.id}.request")
    stored = await bodies.get(big.request_body.ref)
    assert stored is not None and orjson.loads(decompress(stored)) == req
    assert big.response_body is not None and big.response_body.ref is not None
    resp_stored = await bodies.get(big.response_body.ref)
    assert resp_stored is not None and decompress(resp_stored) == client_got
    assert small.request_body is not None and small.request_body.data is not None  # small stays inline
    assert len(q.messages[0].value) < 64 * 1024


async def test_body_store_outage_keeps_big_bodies_in_the_spool_never_in_a_message(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Body store down: a record whose body is above the inline limit waits in the spool, body inline;
    the small one goes to the queue at once; once the body store is back the big one follows,
    its body in the body store, byte for byte, and no message ever held a body above it."""
    q = MemoryQueue()
    bodies = DirBodyStore(tmp_path / "bodies")
    bodies.down = True
    limit = 4 * 1024
    words = " ".join(os.urandom(6).hex() for _ in range(4000))  # ~52 KB, incompressible enough
    big_req = orjson.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": words}]})
    s = settings_for(upstream, tmp_path, inline_body_bytes=limit)
    async with running_gateway(s, q, bodies) as (svc, gw):
        h = {**OPENAI_AUTH, "content-type": "application/json"}
        async with http.post(f"{gw}/openai/v1/chat/completions", data=big_req, headers=h) as r:
            assert r.status == 200
            await r.read()
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
            assert r.status == 200
        await wait_for(lambda: len(q.messages) >= 1 and svc.publisher.bodies_spooled >= 1)
        (small,) = q.records()
        assert small.request_body is not None and small.request_body.data is not None
        assert list((tmp_path / "spool").glob("*.spool")), "the big record waits in the spool"
        assert bodies.puts == 0
        bodies.down = False
        await wait_for(lambda: len(q.messages) >= 2, timeout=30)
        big = q.records()[1]
    assert big.route == "spool" and big.request_body is not None
    assert big.request_body.data is None and big.request_body.ref is not None
    stored = await bodies.get(big.request_body.ref)
    assert stored is not None and decompress(stored) == big_req
    assert max(len(m.value) for m in q.messages) < 4 * limit + 16 * 1024
    assert svc.publisher.dropped == 0 and svc.replayer is not None and svc.replayer.dropped == 0


async def test_omit_flags(upstream: int, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        h = {**OPENAI_AUTH, "Llmtap-Omit-Request": "true", "Llmtap-Omit-Response": "true"}
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=h) as r:
            answer = await r.read()
        h = {**OPENAI_AUTH, "Llmtap-Omit-Response": "true"}
        async with http.post(
            f"{gw}/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=h
        ) as r:
            await r.read()
        both, resp_only = await published(svc, q, 2)
    assert b"echo: hello from the test" in answer  # the client is unaffected
    assert both.request_body is None and both.response_body is None and both.response_events is None
    assert both.omit_request and both.omit_response
    assert both.model == "gpt-4o-mini" and both.usage.source == "provider"  # metadata still logged
    assert b"hello from the test" not in encode(both)
    assert resp_only.request_body is not None and resp_only.response_body is None
    assert resp_only.response_events is None and resp_only.usage.source == "provider"


async def test_request_ids(upstream: int, tmp_path: Path, http: aiohttp.ClientSession) -> None:
    q = MemoryQueue()
    chosen = str(uuid.uuid4())
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(
            f"{gw}/openai/v1/chat/completions", json=CHAT, headers={"Llmtap-Request-Id": chosen.upper()}
        ) as r:
            assert r.headers["Llmtap-Request-Id"] == chosen
        async with http.post(
            f"{gw}/openai/v1/chat/completions", json=CHAT, headers={"Llmtap-Request-Id": "not-a-uuid"}
        ) as r:
            other = r.headers["Llmtap-Request-Id"]
        a, b = await published(svc, q, 2)
    assert a.id == chosen
    assert b.id == other != "not-a-uuid" and uuid.UUID(other)


async def test_multi_tenant_without_key_is_401_before_upstream(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path, multi_tenant=True), q) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT) as r:
            assert r.status == 401
            assert (await r.json())["error"]["type"] == "llmtap_unauthorized"
            assert "Llmtap-Request-Id" not in r.headers  # not logged: an id would point at nothing
        svc.proxy.resolve_tenant = lambda auth: "acme" if auth == "Bearer k1" else None
        async with http.post(
            f"{gw}/openai/v1/chat/completions", json=CHAT, headers={"Llmtap-Auth": "Bearer k1"}
        ) as r:
            assert r.status in (200, 401)  # the fake's own auth check: no Authorization header

        async def lookup(auth: str | None) -> str | None:
            await asyncio.sleep(0.01)  # a key-store round trip
            return "globex" if auth == "Bearer k2" else None

        svc.proxy.resolve_tenant = lookup
        for key in ("Bearer k2", "Bearer k1"):
            async with http.post(
                f"{gw}/openai/v1/chat/completions", json=CHAT, headers={**OPENAI_AUTH, "Llmtap-Auth": key}
            ) as r:
                assert (r.status == 401) == (key == "Bearer k1")
        recs = await published(svc, q, 2)
    assert len(await fake_requests(http, f"http://127.0.0.1:{upstream}")) == 2
    assert [r.tenant for r in recs] == ["acme", "globex"]


async def test_healthz_metrics_and_unknown_paths(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.get(f"{gw}/healthz") as r:
            assert r.status == 200 and (await r.json())["status"] == "ok"
        async with http.get(f"{gw}/nope") as r:
            assert r.status == 404 and "Llmtap-Request-Id" not in r.headers  # not logged: no id
        for _ in range(3):
            async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
                await r.read()
        await published(svc, q, 3)
        # rev20: one entry of the spool's listing that cannot be read (a link loop, NFS's
        # ESTALE) made every scrape a 500
        from llmtap.gateway.spool import spool_dir

        spool = spool_dir(svc.settings)
        spool.mkdir(parents=True, exist_ok=True)
        (spool / "loop.spool").symlink_to("loop.spool")
        async with http.get(f"{gw}/metrics") as r:
            assert r.status == 200
            text = await r.text()
    assert 'llmtap_gateway_records_published_total{route="queue"} 3.0' in text
    assert 'llmtap_gateway_requests_total{outcome="completed",provider="openai"} 3.0' in text
    assert "llmtap_gateway_captures_total 3.0" in text
    assert "llmtap_gateway_publish_buffer_bytes 0.0" in text
    # rev18a: a spool that makes no progress said nothing but its size in `llmtap status`
    assert "llmtap_gateway_spool_bytes 0.0" in text and "llmtap_gateway_spool_oldest_seconds 0.0" in text
    assert "llmtap_gateway_spool_held_bytes 0.0" in text


# -- shutdown and outages --------------------------------------------------------------------------


async def test_stop_finishes_in_flight_requests_and_publishes_everything(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, publish_linger_ms=600_000.0)  # records would wait 10 min
    from llmtap.gateway.app import GatewayService

    svc = GatewayService(s, queue=q)
    await svc.start()
    gw = f"http://127.0.0.1:{svc.port}"
    h = {**OPENAI_AUTH, "x-fake-delay-ms": "400"}
    # The first record after a quiet spell is published at once (nothing to batch it with);
    # those that follow within the linger of that batch wait in memory.
    async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
        await r.read()
    await wait_for(lambda: len(q.messages) == 1, timeout=60)
    done_before = 5
    for _ in range(done_before):  # finished before the stop, still waiting for the linger
        async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
            await r.read()

    async def call(i: int) -> tuple[int, str]:
        body = {**CHAT, "stream": i % 2 == 0}
        async with http.post(f"{gw}/openai/v1/chat/completions", json=body, headers=h) as r:
            await r.read()
            return r.status, r.headers.get("Connection", "").lower()

    calls = [asyncio.create_task(call(i)) for i in range(20)]
    await wait_for(lambda: len(svc.publisher._dq) >= done_before, timeout=60)
    up = f"http://127.0.0.1:{upstream}"
    deadline = time.monotonic() + 20
    while len(await fake_requests(http, up)) < 1 + done_before + 20:  # the fake records before waiting
        assert time.monotonic() < deadline, "the 20 slow requests never reached the upstream"
        await asyncio.sleep(0.01)
    assert len(q.messages) == 1
    await svc.stop()
    answers = await asyncio.gather(*calls)
    assert answers == [(200, "close")] * 20  # and each told its client the connection ends
    recs = q.records()
    assert len(recs) == 26 and len({r.id for r in recs}) == 26
    assert all(r.outcome == "completed" for r in recs)
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(f"{gw}/healthz") as r:
            pass


class HangingQueue(MemoryQueue):
    """A broker that takes the batch and never answers: `publish` never returns."""

    async def publish(self, messages: Sequence[Message]) -> None:
        self.publish_calls += 1
        await asyncio.Event().wait()


@contextlib.asynccontextmanager
async def silent_endpoint() -> AsyncIterator[tuple[int, list[bytes]]]:
    """A TCP server that accepts connections and reads what comes, but never answers (a hung
    ingest endpoint or load balancer). Yields its port and the bytes each connection sent."""
    received: list[bytes] = []
    writers: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        received.append(b"")
        n = len(received) - 1
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(65536):
                received[n] += data

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1]), received
    finally:
        for w in writers:
            w.close()
        server.close()


def _spooled(spool: Path) -> list[LogRecord]:
    """The records in a spool directory, read off its files (frames of key length, key, record)."""
    from llmtap.gateway.spool import DiskSpool

    d = DiskSpool(spool, max_bytes=1 << 30)
    out = []
    for seg in d.segments_for_replay():
        for batch in d.replay(seg):
            for frame in batch:
                (klen,) = struct.unpack_from(">H", frame)
                out.append(decode(frame[2 + klen :]))
    return out


@pytest.mark.parametrize("broken", ["queue-hangs", "queue-refuses-ingest-hangs"])
async def test_hanging_sinks_never_delay_a_response(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession, broken: str
) -> None:
    """Logging is off the request path: with a queue whose publish never returns (or a queue
    that refuses and an ingest endpoint that accepts and never answers), clients get their
    answers as fast as through a gateway whose queue is healthy, and about as fast as straight
    from the upstream. Timed in rounds that take turns (direct, healthy, broken), so whatever
    else slows the machine slows all three; the bounds are generous ratios, while a publish on
    the request path would hold every response until a timeout (seconds) or forever."""
    q: MemoryQueue = HangingQueue() if broken == "queue-hangs" else MemoryQueue()
    q.down = broken != "queue-hangs"
    async with silent_endpoint() as (ingest_port, received):
        settings = settings_for(
            upstream, tmp_path / "broken", ingest_url=f"http://127.0.0.1:{ingest_port}", shutdown_timeout=2.0
        )
        async with (
            running_gateway(settings, q) as (svc, gw),
            running_gateway(settings_for(upstream, tmp_path / "healthy")) as (_, ok_gw),
        ):
            targets = {
                "direct": (f"http://127.0.0.1:{upstream}", "/v1/chat/completions", "/v1/messages"),
                "healthy": (ok_gw, "/openai/v1/chat/completions", "/anthropic/v1/messages"),
                "broken": (gw, "/openai/v1/chat/completions", "/anthropic/v1/messages"),
            }
            times: dict[str, list[float]] = {k: [] for k in targets}
            timeout = aiohttp.ClientTimeout(total=20)
            for i in range(60):
                for name, (base, chat, messages) in targets.items():
                    if i % 3 == 2:
                        url, body, headers = base + messages, MESSAGES, ANTHROPIC_AUTH
                    else:
                        url, body, headers = base + chat, {**CHAT, "stream": i % 3 == 0}, OPENAI_AUTH
                    t0 = time.monotonic()
                    async with http.post(url, json=body, headers=headers, timeout=timeout) as r:
                        data = await r.read()
                    times[name].append(time.monotonic() - t0)
                    assert r.status == 200, (name, r.status, data[:200])
                    assert data.endswith(b"data: [DONE]\n\n") if i % 3 == 0 else b"usage" in data, name
            # the broken ways really were tried, and hung
            if broken == "queue-hangs":
                assert q.publish_calls >= 1 and not q.messages
            else:
                await wait_for(lambda: bool(received) and b"/api/v1/ingest" in received[0], 10)
            # Nothing reached a store through them (the spool may have taken some already: a
            # batch a sink has not taken in `publish_spool_after_ms` is spooled too).
            assert not svc.publisher.routes["queue"] and not svc.publisher.routes["ingest"]

        def pct(name: str, p: float) -> float:
            v = sorted(times[name])
            return v[min(len(v) - 1, int(p * len(v)))]

        summary = {k: (round(pct(k, 0.5) * 1000, 1), round(pct(k, 0.9) * 1000, 1)) for k in times}
        print(f"[{broken}] p50/p90 ms: {summary}")
        assert pct("broken", 0.5) <= 2 * pct("healthy", 0.5) + 0.020, summary
        assert pct("broken", 0.9) <= 2 * pct("healthy", 0.9) + 0.050, summary
        assert pct("broken", 0.5) <= 5 * pct("direct", 0.5) + 0.030, summary
        assert max(times["broken"]) < 8.0, summary  # none waited for the ingest sink's 10 s timeout

    # and nothing was lost: at the shutdown deadline the records went to the disk spool
    spooled = _spooled(tmp_path / "broken" / "spool")
    assert len(spooled) == 60 and len({r.id for r in spooled}) == 60
    assert svc.publisher.dropped == 0


async def test_queue_outage_holds_records_and_clients_are_unaffected(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Chain = the queue alone: the records wait in memory, in order, until it is back."""
    q = MemoryQueue()
    q.down = True
    q.gate = asyncio.Event()  # the queue's first answer is held until every client has its own
    async with running_gateway(settings_for(upstream, tmp_path), q, sinks=[QueueSink(q)]) as (svc, gw):
        ids = []
        for _ in range(10):
            async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
                assert r.status == 200
                ids.append(r.headers["Llmtap-Request-Id"])
        await wait_for(lambda: q.holding >= 1)
        assert q.refused == 0  # all ten answered while the queue had not answered once
        q.gate.set()
        await wait_for(lambda: q.refused >= 2)
        assert q.messages == [] and svc.publisher.pending == 10 and svc.publisher.failed >= 2
        q.down = False
        recs = await published(svc, q, 10)
    assert [r.id for r in recs] == ids  # nothing lost, order kept
    assert svc.publisher.dropped == 0


async def test_queue_outage_goes_to_the_spool_and_comes_back(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The default chain: queue down, ingest endpoint down → the disk spool; once the queue is
    back the replayer moves the records into it, in order, marked as having gone that way."""
    q = MemoryQueue()
    q.down = True
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        ids = []
        for _ in range(10):
            async with http.post(f"{gw}/openai/v1/chat/completions", json=CHAT, headers=OPENAI_AUTH) as r:
                assert r.status == 200
                ids.append(r.headers["Llmtap-Request-Id"])
        await wait_for(lambda: svc.publisher.routes["spool"] == 10)
        assert svc.publisher.pending == 0 and list((tmp_path / "spool").glob("*.spool"))
        q.down = False
        recs = await published(svc, q, 10)
    assert [r.id for r in recs] == ids
    assert {r.route for r in recs} == {"spool"}
    assert svc.publisher.dropped == 0


async def test_expect_100_continue(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    body = orjson.dumps(CHAT)
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, _):
        reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
        writer.write(
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer sk-x\r\n"
            b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
            + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 0.5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(body)
        await writer.drain()
        final = await reader.read()
        writer.close()
        assert final.startswith(b"HTTP/1.1 200 ")
        (rec,) = await published(svc, q, 1)
    sent = (await fake_requests_raw(upstream))[-1]
    assert "expect" not in {k.lower() for k, _ in sent["headers"]}
    assert rec.status == 200


async def fake_requests_raw(port: int) -> list[dict[str, Any]]:
    async with aiohttp.ClientSession() as s:
        return await fake_requests(s, f"http://127.0.0.1:{port}")


async def test_in_stream_errors_are_recorded(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        h = {**ANTHROPIC_AUTH, "x-fake-stream-error": "3"}
        async with http.post(
            f"{gw}/anthropic/v1/messages", json={**MESSAGES, "stream": True}, headers=h
        ) as r:
            assert b"overloaded_error" in await r.read()
        h = {**OPENAI_AUTH, "x-fake-stream-error": "2"}
        async with http.post(
            f"{gw}/openai/v1/chat/completions", json={**CHAT, "stream": True}, headers=h
        ) as r:
            via = await r.read()
        anth, oai = await published(svc, q, 2)
    assert anth.error == "Overloaded" and anth.outcome == "completed" and anth.status == 200
    assert oai.error and "error while processing" in oai.error
    assert b'"usage":null' not in via  # stripped even on a stream that ends in an error


async def lingering_stream(request: web.Request) -> web.StreamResponse:
    """An upstream that sends the whole stream, end marker included, then keeps the response
    open a while before its final chunk (as a busy server or proxy may)."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    if request.path.endswith("/messages"):
        events = [
            {
                "type": "message_start",
                "message": {"id": "m", "model": "claude-x", "usage": {"input_tokens": 3}},
            },
            {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
            {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 2}},
            {"type": "message_stop"},
        ]
        for e in events:
            await resp.write(b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n")
    else:
        base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "gpt-x"}
        for e in [
            {**base, "choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]},
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
            {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        ]:
            await resp.write(b"data: " + orjson.dumps(e) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
    await asyncio.sleep(4.0)
    await resp.write_eof()
    return resp


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_client_leaving_right_after_the_end_marker_is_completed(tmp_path: Path, provider: str) -> None:
    """SDKs stop reading at `data: [DONE]` / `message_stop` and may drop the connection before
    the response's last chunk: the client had the whole stream, so the record says completed."""
    runner, port = await tiny_upstream(lingering_stream)
    q = MemoryQueue()
    if provider == "openai":
        path, marker = "/openai/v1/chat/completions", b"data: [DONE]\n\n"
        body = orjson.dumps({**CHAT, "stream": True, "stream_options": {"include_usage": True}})
    else:
        path, marker = "/anthropic/v1/messages", b"event: message_stop"
        body = orjson.dumps({**MESSAGES, "stream": True})
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(
                f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
            )
            got = b""
            while marker not in got:
                got += await reader.read(65536)
            writer.transport.abort()  # gone at once, like a client that stops at the marker
            (rec,) = await published(svc, q, 1)
            assert rec.latency_ms < 3000  # the gateway did not wait for the upstream's last chunk (4 s)
    finally:
        await runner.cleanup()
    assert rec.outcome == "completed" and rec.error is None
    assert rec.usage.source == "provider" and rec.usage.completion_tokens == 2
