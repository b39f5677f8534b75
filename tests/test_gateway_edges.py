"""Input at the edges, from clients and from upstreams, that the gateway once refused, altered or
logged wrong (an outside fuzzing and credential audit, 2026-12-05). Each request here is still
proxied unchanged and logged once, and no credential reaches its record.

The real gateway in-process (`running_gateway`, records caught by `MemoryQueue`), against the
fake provider or a small aiohttp upstream that sends exactly what the case needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
import tracemalloc
import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from aiohttp import web

from gateway_support import (
    MemoryQueue,
    dead_port,
    listing_upstream,
    published,
    running_gateway,
    settings_for,
    tiny_upstream,
)
from llmtap.gateway.capture import _decode
from llmtap.providers.gemini import model_from_path
from llmtap.record import LogRecord, body_bytes

pytestmark = pytest.mark.timeout(120)

CHAT = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}'
STREAM = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
#: What the fake provider wants to see (any key).
JSON_AUTH = {"Content-Type": "application/json", "Authorization": "Bearer sk-test-openai"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # The client side takes what the gateway relays, however large its headers.
    big = 65536
    async with aiohttp.ClientSession(
        auto_decompress=False, max_line_size=big, max_field_size=big, max_headers=1024
    ) as s:
        yield s


def sse(events: list[bytes], sep: bytes) -> bytes:
    return b"".join(b"data: " + e + sep for e in events)


CONTENT = (
    b'{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini",'
    b'"choices":[{"index":0,"delta":{"content":"Hello"}}]}'
)
USAGE = (
    b'{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-mini","choices":[],'
    b'"usage":{"prompt_tokens":11,"completion_tokens":1,"total_tokens":12}}'
)


def stream_upstream(sep: bytes, content_type: str = "text/event-stream") -> tuple[Any, list[bytes]]:
    """An upstream streaming one content chunk, the usage chunk and `[DONE]`, events ending in
    `sep`, written a few bytes at a time; it keeps the request bodies it got."""
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        bodies.append(await request.read())
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        await resp.prepare(request)
        data = sse([CONTENT, USAGE, b"[DONE]"], sep)
        for i in range(0, len(data), 7):
            await resp.write(data[i : i + 7])
        await resp.write_eof()
        return resp

    return handler, bodies


@dataclass
class Exchange:
    """One request through the gateway: what the client got and the one record published."""

    status: int
    headers: Any
    body: bytes
    record: LogRecord
    queue: MemoryQueue


async def exchange(
    handler: Any,
    tmp_path: Path,
    http: aiohttp.ClientSession,
    path: str = "/openai/v1/chat/completions",
    data: bytes = CHAT,
    headers: dict[str, str] | None = None,
    **settings: Any,
) -> Exchange:
    """POST `data` to `path` through a gateway in front of an upstream answering with
    `handler`; `settings`: the gateway's (`upstream_url` in a value stands for the upstream)."""
    runner, port = await tiny_upstream(handler)
    up = f"http://127.0.0.1:{port}"
    over = {k: (up if v == "upstream_url" else v) for k, v in settings.items()}
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path, **over), q) as (svc, gw):
            sent = {"Content-Type": "application/json"} if headers is None else headers
            async with http.post(f"{gw}{path}", data=data, headers=sent) as r:
                got = await r.read()
                status, got_headers = r.status, r.headers
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    return Exchange(status, got_headers, got, rec, q)


# -- client input ---------------------------------------------------------------------------------


async def test_a_stream_request_nested_deeper_than_json_writers_go_is_proxied_and_logged(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """orjson reads 1024 levels but writes 254: the usage rewrite used to raise, and the client
    got a 500 with no id and no record. Now the body goes upstream as sent."""
    deep = b'{"model":"gpt-4o-mini","stream":true,"x":' + b"[" * 300 + b"]" * 300
    deep += b',"messages":[{"role":"user","content":"deep"}]}'
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", data=deep, headers=JSON_AUTH) as r:
            assert r.status == 200
            rid = r.headers["Llmtap-Request-Id"]
            assert b"data: [DONE]" in await r.read()
        (rec,) = await published(svc, q, 1)
    assert rec.id == rid and rec.status == 200 and rec.outcome == "completed"
    assert rec.request_body is not None and body_bytes(rec.request_body) == deep


async def test_hundreds_of_property_headers_are_proxied_and_the_record_keeps_64(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """aiohttp refuses more than 128 headers by default: a request with 124 properties got a
    400 from the gateway although the upstream takes it."""
    headers = {f"Llmtap-Property-P{i:03d}": f"v{i}" for i in range(300)}
    headers.update(JSON_AUTH)
    q = MemoryQueue()
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        async with http.post(f"{gw}/openai/v1/chat/completions", data=CHAT, headers=headers) as r:
            assert r.status == 200
            await r.read()
        (rec,) = await published(svc, q, 1)
    assert len(rec.properties) == 64 and "properties" in rec.truncated


async def test_a_compressed_request_is_decoded_for_parsing_only_up_to_the_body_limit(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """64 MiB of JSON in 64 KiB of gzip: decoded whole, it took the gateway's event loop and
    memory with it. Now at most `max_body_bytes` come out; the request is relayed as sent."""
    got: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        got.append(await request.read())
        return web.json_response({"id": "x", "usage": {"prompt_tokens": 1, "completion_tokens": 1}})

    bomb = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    head = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"'
    payload = bomb.compress(head) + bomb.compress(b"a" * (64 << 20)) + bomb.compress(b'"}]}') + bomb.flush()
    runner, port = await tiny_upstream(handler, auto_decompress=False)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path, max_body_bytes=1 << 20), q) as (svc, gw):
            tracemalloc.start()
            try:
                async with http.post(
                    f"{gw}/openai/v1/chat/completions",
                    data=payload,
                    headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
                ) as r:
                    assert r.status == 200
                    await r.read()
                (rec,) = await published(svc, q, 1)
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    finally:
        await runner.cleanup()
    assert got == [payload]  # relayed byte for byte, still compressed
    assert peak < 16 << 20, f"peak {peak >> 20} MiB while logging a 64 MiB bomb"
    assert rec.status == 200 and rec.model is None  # cut at 1 MiB: not parsed, as a big body


async def test_a_request_id_is_keyed_canonical_and_only_ascii_digits_make_one(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """`uuid.UUID` reads any Unicode digit: 32 Arabic-Indic ones were the id 1111...; two
    spellings that look different to people must not name one record."""
    q = MemoryQueue()
    chosen = "01A24633-B8F1-4C9A-9D3E-5F6A7B8C9D0E"
    arabic = "\u0661" * 32
    async with running_gateway(settings_for(upstream, tmp_path), q) as (svc, gw):
        ids = []
        for rid in (chosen, arabic):
            async with http.post(
                f"{gw}/openai/v1/chat/completions",
                data=CHAT,
                headers={**JSON_AUTH, "Llmtap-Request-Id": rid},
            ) as r:
                assert r.status == 200
                ids.append(r.headers["Llmtap-Request-Id"])
                await r.read()
        recs = await published(svc, q, 2)
    assert ids[0] == chosen.lower()
    assert ids[1] != "11111111-1111-1111-1111-111111111111"
    assert sorted(r.id for r in recs) == sorted(ids)


async def test_credentials_are_known_by_their_name_or_their_value(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Headers other gateways and platforms use for keys (`cf-aig-authorization`,
    `Helicone-Auth`, `X-Hub-Signature-256` ...) and any header whose value reads
    `Bearer <token>` or `sk-...` go upstream but never into the record; so does a key in a path
    parameter. Rate-limit headers counting `tokens` are not credentials and stay."""
    seen: list[dict[str, str]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await request.read()
        return web.json_response({"id": "x"}, headers={"x-ratelimit-remaining-tokens": "99"})

    names = [
        "cf-aig-authorization",
        "Helicone-Auth",
        "x-ms-authorization-auxiliary",
        "X-Forwarded-Authorization",
        "X-Apikey",
        "X-Api-Keys",
        "Token",
        "X-Auth",
        "Authentication",
        "X-Password",
        "X-Hub-Signature-256",
        "X-Credential",
        "x-api-key2",
    ]
    secrets = {n: f"SECRET-{i}-{n}" for i, n in enumerate(names)}
    headers = dict(secrets)
    headers["X-Debug"] = "Bearer SECRET-bearer-in-x-debug"
    headers["X-Trace-Key-Shape"] = "sk-proj-SECRETabcdefgh"
    headers["Content-Type"] = "application/json"
    x = await exchange(
        handler, tmp_path, http, "/openai/v1/chat/completions;key=SECRET-path", headers=headers
    )
    assert x.status == 200
    rec = x.record
    (up,) = seen
    # Every one reached the upstream but the front door's hand-off to llmtap (API Gateway's
    # X-Forwarded-Authorization: addressed to the app behind it, not to the provider).
    assert all(up[n] == v for n, v in secrets.items() if n != "X-Forwarded-Authorization")
    assert "X-Forwarded-Authorization" not in up
    stored = b"".join(m.value for m in x.queue.messages).decode()
    assert "SECRET" not in stored, [h for h in rec.request_headers if "SECRET" in rec.request_headers[h]]
    assert rec.request_headers.get("content-type") == "application/json"
    assert rec.response_headers.get("x-ratelimit-remaining-tokens") == "99"
    assert rec.path.endswith(";key=***") and rec.target_url.endswith(";key=***")


# -- upstream answers -----------------------------------------------------------------------------


async def test_an_answer_with_big_or_many_headers_is_relayed_not_a_502(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The upstream client kept aiohttp's 8190-byte and 128-header limits: such an answer
    reached the client as `502 llmtap_upstream_unreachable`."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        resp = web.json_response({"id": "x"})
        resp.headers["X-Big"] = "b" * 20000
        for i in range(300):
            resp.headers[f"X-H{i}"] = str(i)
        return resp

    x = await exchange(handler, tmp_path, http)
    assert x.status == 200 and x.headers["X-Big"] == "b" * 20000 and x.headers["X-H299"] == "299"
    rec = x.record
    assert rec.status == 200 and rec.outcome == "completed"


@pytest.mark.parametrize("sep", [b"\n\n", b"\r\r", b"\r\n\r\n", b"\n\r\n", b"\r\n\n"], ids=repr)
async def test_every_sse_line_ending_reaches_the_client_whole(
    sep: bytes, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """SSE lines may end in CR alone. The usage-chunk filter only knew LF and CRLF blank lines,
    held the whole stream as one event and dropped it: the client got nothing."""
    handler, bodies = stream_upstream(sep)
    x = await exchange(handler, tmp_path, http, data=STREAM)
    got, rec = x.body, x.record
    assert x.status == 200
    assert json.loads(bodies[0])["stream_options"] == {"include_usage": True}  # we asked for it
    assert b"Hello" in got and b"[DONE]" in got and b'"usage"' not in got  # ... and hid it
    assert got.replace(b"\r", b"").replace(b"\n", b"") == sse([CONTENT, b"[DONE]"], b"")
    assert rec.streamed and rec.usage.prompt_tokens == 11 and rec.usage.completion_tokens == 1


async def test_a_stream_content_type_in_any_case_is_a_stream(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Media types are case-insensitive: `Text/Event-Stream` was taken for a plain body, so the
    injected usage chunk reached the client and the record had no tokens."""
    handler, _ = stream_upstream(b"\n\n", "Text/Event-Stream; charset=utf-8")
    x = await exchange(handler, tmp_path, http, data=STREAM)
    got, rec = x.body, x.record
    assert got == sse([CONTENT, b"[DONE]"], b"\n\n")
    assert rec.streamed and rec.usage.total_tokens == 12


async def test_a_compressed_answer_is_kept_only_up_to_the_body_limit(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A 100 KB gzip answer holding 100 MB was stored whole, `truncated: false`, past
    `max_body_bytes`. The client still gets the upstream's bytes unchanged."""
    big = gzip.compress(b'{"id":"x","data":"' + b"a" * (100 << 20) + b'"}', compresslevel=1)

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=big, headers={"Content-Type": "application/json", "Content-Encoding": "gzip"}
        )

    x = await exchange(handler, tmp_path, http, max_body_bytes=1 << 20)
    assert x.body == big
    rec = x.record
    assert rec.response_body is not None and rec.response_body.truncated
    kept = body_bytes(rec.response_body)
    assert kept is not None and len(kept) == 1 << 20 and kept.startswith(b'{"id":"x","data":"aaa')


async def test_token_counts_that_are_not_counts_are_unknown_not_a_dead_letter(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """2**63 tokens overflowed the store's 64-bit integer: the record was dead-lettered although
    the client got its 200. A count outside 0..10**12 is now unknown (None); the others stay."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        usage = {
            "prompt_tokens": 2**63,
            "completion_tokens": 3,
            "total_tokens": 2**64,
            "prompt_tokens_details": {"cached_tokens": 7, "audio_tokens": -5},
            "completion_tokens_details": {"reasoning_tokens": 10**13},
        }
        return web.json_response({"id": "x", "model": "gpt-4o-mini", "usage": usage})

    x = await exchange(handler, tmp_path, http)
    assert x.status == 200
    u = x.record.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens) == (None, 3, None, 7)
    assert u.input_audio_tokens is None and u.reasoning_tokens is None


@pytest.mark.parametrize("request_cut", [False, True])
async def test_an_answer_past_the_body_limit_keeps_its_usage(
    tmp_path: Path, http: aiohttp.ClientSession, request_cut: bool
) -> None:
    """A 6 MB embeddings answer is kept to `max_body_bytes` (4 MiB), so it no longer parses:
    its tokens and cost were lost. The usage is its last member, in the tail the capture keeps.
    With the request cut too (the SDK names the model after 2048 inputs) the model comes from
    that tail as well: it was None, so the call was unpriced."""
    vectors = [{"object": "embedding", "index": i, "embedding": [0.0123456789] * 1536} for i in range(300)]
    answer = {
        "object": "list",
        "data": vectors,
        "model": "text-embedding-3-small",
        "usage": {"prompt_tokens": 400, "total_tokens": 400},
    }
    body = json.dumps(answer).encode()
    assert len(body) > 4 << 20

    async def handler(request: web.Request) -> web.Response:
        async for _ in request.content.iter_chunked(1 << 16):  # past aiohttp's 1 MiB `read`
            pass
        return web.Response(body=body, content_type="application/json")

    req = b'{"model":"text-embedding-3-small","input":["a","b"]}'
    if request_cut:
        req = json.dumps({"input": ["x" * 2100] * 2048, "model": "text-embedding-3-small"}).encode()
        assert len(req) > 4 << 20
    x = await exchange(handler, tmp_path, http, "/openai/v1/embeddings", req)
    assert x.body == body
    rec = x.record
    assert rec.response_body is not None and rec.response_body.truncated
    assert (rec.usage.source, rec.usage.prompt_tokens, rec.usage.total_tokens) == ("provider", 400, 400)
    assert rec.model == "text-embedding-3-small"  # so the worker prices it


@pytest.mark.parametrize(
    ("query", "asked"),
    [
        ("?api-version=2023-05-15", False),
        ("?API-VERSION=2023-05-15", False),
        ("?api-version=2024-06-01", False),
        ("?api-version=2024-08-01-preview", True),
        ("?api-version=2024-10-21", True),
        ("?api-version=preview", True),
        ("", True),
    ],
)
async def test_azure_is_asked_for_stream_usage_only_where_its_api_version_takes_it(
    query: str, asked: bool, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """API versions before 2024-08-01 answer 400 to `stream_options`: the client's stream must
    not fail because we log it."""
    handler, bodies = stream_upstream(b"\n\n")
    path = (
        "/azure/openai/deployments/d1/chat/completions"
        if query.lower().startswith("?api-version=2")
        else "/azure/openai/v1/chat/completions"
    )
    x = await exchange(
        handler, tmp_path, http, path + query, STREAM, {"api-key": "k"}, azure_base_url="upstream_url"
    )
    assert x.status == 200
    got = x.body
    assert (bodies[0] != STREAM) is asked
    assert ("stream_options" in json.loads(bodies[0])) is asked
    assert (b'"usage"' in got) is not asked  # not asked: the upstream's chunk is the client's own


def usage_stream(usage_null: bool = True) -> list[bytes]:
    """OpenAI's stream events when `include_usage` was asked for (`usage_null`: as OpenAI sends
    them, `"usage":null` on every content chunk), `[DONE]` last."""
    null = b',"usage":null' if usage_null else b""
    return [CONTENT[:-1] + null + b"}", CONTENT[:-1] + null + b"}", USAGE, b"[DONE]"]


def held_stream_upstream(compress: str) -> tuple[Any, dict[str, Any]]:
    """An upstream streaming `usage_stream()` events, gzipped when `compress` is "asked" and the
    request allows gzip, or "always". After the first event it waits until the test says the
    client got it (`seen["client_got_first"]`, up to 30 s), so a gateway that buffers the stream
    shows as a client that got nothing until the end."""
    seen: dict[str, Any] = {"client_got_first": asyncio.Event(), "waited_out": False}

    async def handler(request: web.Request) -> web.StreamResponse:
        seen["accept_encoding"] = request.headers.get("Accept-Encoding")
        seen["body"] = await request.read()
        gz = compress == "always" or (compress == "asked" and "gzip" in (seen["accept_encoding"] or ""))
        headers = {"Content-Type": "text/event-stream"}
        if gz:
            headers["Content-Encoding"] = "gzip"
        resp = web.StreamResponse(headers=headers)
        await resp.prepare(request)
        z = zlib.compressobj(wbits=31) if gz else None
        sent = b""
        for i, event in enumerate(usage_stream()):
            data = b"data: " + event + b"\n\n"
            out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH) if z is not None else data
            sent += out
            await resp.write(out)
            if i == 0:
                try:
                    await asyncio.wait_for(seen["client_got_first"].wait(), 30)
                except TimeoutError:
                    seen["waited_out"] = True
        if z is not None:
            tail = z.flush()
            sent += tail
            await resp.write(tail)
        seen["sent"] = sent
        await resp.write_eof()
        return resp

    return handler, seen


async def read_stream(resp: aiohttp.ClientResponse, seen: dict[str, Any]) -> bytes:
    got = b""
    async for chunk in resp.content.iter_any():
        got += chunk
        seen["client_got_first"].set()
    return got


async def test_a_stream_we_ask_usage_for_comes_uncompressed_and_event_by_event(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The usage filter reads the stream's bytes: compressed, it found no event ends, held the
    whole stream to its end and let the added usage chunk through (an outside check, 2026-12-05:
    the OpenAI SDK always sends `Accept-Encoding: gzip`)."""
    handler, seen = held_stream_upstream("asked")
    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            h = {**JSON_AUTH, "Accept-Encoding": "gzip, deflate, br"}
            async with http.post(f"{gw}/openai/v1/chat/completions", data=STREAM, headers=h) as r:
                assert r.status == 200 and "Content-Encoding" not in r.headers
                got = await read_stream(r, seen)
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert seen["accept_encoding"] == "identity" and "stream_options" in json.loads(seen["body"])
    assert not seen["waited_out"], "the client got nothing until the stream ended"
    assert got == sse([*usage_stream(usage_null=False)[:2], b"[DONE]"], b"\n\n")  # as if never asked
    assert rec.usage.source == "provider" and rec.usage.total_tokens == 12


async def test_a_stream_compressed_anyway_is_relayed_as_sent_event_by_event(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """An upstream that compresses although asked not to: the filter cannot read the bytes, so
    they pass as they came, never held back."""
    handler, seen = held_stream_upstream("always")
    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            async with http.post(f"{gw}/openai/v1/chat/completions", data=STREAM, headers=JSON_AUTH) as r:
                assert r.status == 200 and r.headers["Content-Encoding"] == "gzip"
                got = await read_stream(r, seen)
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert not seen["waited_out"], "the client got nothing until the stream ended"
    assert got == seen["sent"]
    assert rec.usage.source == "provider" and rec.usage.total_tokens == 12


MISTRAL_422 = (
    b'{"object":"error","message":{"detail":[{"type":"extra_forbidden","loc":["body","stream_options"],'
    b'"msg":"Extra inputs are not permitted","input":{"include_usage":true}}]},'
    b'"type":"invalid_request_message_error","param":null,"code":null}'
)


@pytest.mark.parametrize("chunked", [False, True])
async def test_an_upstream_that_refuses_the_stream_options_we_add_gets_the_clients_request(
    tmp_path: Path, http: aiohttp.ClientSession, chunked: bool
) -> None:
    """Mistral answers 422 to any field it does not know: every stream through a named route
    failed because we asked for usage. Now the client's own request is sent instead, and this
    upstream is not asked again. A refusal sent chunked (no length) was passed on as it came."""
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        bodies.append(body)
        if "stream_options" in json.loads(body):
            if chunked:
                refusal = web.StreamResponse(status=422, headers={"Content-Type": "application/json"})
                refusal.enable_chunked_encoding()
                await refusal.prepare(request)
                await refusal.write(MISTRAL_422[:40])
                await refusal.write(MISTRAL_422[40:])
                await refusal.write_eof()
                return refusal
            return web.Response(status=422, body=MISTRAL_422, content_type="application/json")
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(sse([CONTENT, USAGE, b"[DONE]"], b"\n\n"))  # Mistral sends usage unasked
        await resp.write_eof()
        return resp

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        settings = settings_for(port, tmp_path, upstreams=f"mistral=http://127.0.0.1:{port}")
        async with running_gateway(settings, q) as (svc, gw):
            got = []
            for _ in range(2):
                async with http.post(
                    f"{gw}/mistral/v1/chat/completions", data=STREAM, headers=JSON_AUTH
                ) as r:
                    assert r.status == 200, await r.read()
                    got.append(await r.read())
            recs = await published(svc, q, 2)
    finally:
        await runner.cleanup()
    assert [("stream_options" in json.loads(b)) for b in bodies] == [True, False, False]
    assert bodies[1] == bodies[2] == STREAM
    assert got[0] == got[1] == sse([CONTENT, USAGE, b"[DONE]"], b"\n\n")
    for rec in recs:
        assert rec.status == 200 and rec.outcome == "completed" and rec.usage.total_tokens == 12
        assert rec.error is None


async def test_a_validation_error_that_quotes_the_request_is_no_refusal_of_stream_options(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """vLLM and other FastAPI servers echo the whole request under `input` with any 422 (an
    outside review): a client's own mistake was sent twice and turned usage off for good."""
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        body = await request.read()
        bodies.append(body)
        err = {"detail": [{"type": "missing", "loc": ["body", "max_tokens"], "msg": "Field required",
                           "input": json.loads(body)}]}  # fmt: skip
        return web.Response(status=422, body=json.dumps(err).encode(), content_type="application/json")

    runner, port = await tiny_upstream(handler)
    try:
        settings = settings_for(port, tmp_path, upstreams=f"vllm=http://127.0.0.1:{port}")
        async with running_gateway(settings, MemoryQueue()) as (svc, gw):
            for _ in range(2):
                async with http.post(f"{gw}/vllm/v1/chat/completions", data=STREAM, headers=JSON_AUTH) as r:
                    assert r.status == 422 and json.loads(await r.read())["detail"][0]["type"] == "missing"
            assert svc.proxy.refuse_rewrite == set()
    finally:
        await runner.cleanup()
    assert ["stream_options" in json.loads(b) for b in bodies] == [True, True]  # each sent once, as asked


async def test_an_error_body_cut_short_is_relayed_as_far_as_it_came(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """An error answer is read ahead to see whether it refuses our field: when the upstream broke
    mid-body, what came was dropped and the client got nothing (an outside review)."""
    part = b'{"error":{"message":"partial'

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(
            status=400, headers={"Content-Type": "application/json", "Content-Length": "1000"}
        )
        await resp.prepare(request)
        await resp.write(part)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            got = b""
            with contextlib.suppress(aiohttp.ClientPayloadError):
                async with http.post(f"{gw}/openai/v1/chat/completions", data=STREAM, headers=JSON_AUTH) as r:
                    async for chunk in r.content.iter_any():
                        got += chunk
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert got == part
    assert (
        rec.outcome == "upstream_cut"
        and rec.response_body is not None
        and body_bytes(rec.response_body) == part
    )


async def test_another_refusal_of_a_stream_request_reaches_the_client_as_sent(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A 400 that is not about our field was read to find out: the client still gets it whole."""
    refusal = b'{"error":{"message":"model not found","type":"invalid_request_error"}}'
    bodies: list[bytes] = []

    async def handler(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.Response(status=400, body=refusal, content_type="application/json")

    x = await exchange(handler, tmp_path, http, "/openai/v1/chat/completions", STREAM, JSON_AUTH)
    assert x.status == 400 and x.body == refusal and int(x.headers["Content-Length"]) == len(refusal)
    assert len(bodies) == 1 and "stream_options" in json.loads(bodies[0])  # sent once, not again
    assert x.record.status == 400 and x.record.error == "model not found"
    assert x.record.response_body is not None and body_bytes(x.record.response_body) == refusal


async def test_a_request_cut_by_the_gateway_stopping_says_so(tmp_path: Path) -> None:
    """A stream still running when `shutdown_timeout` ran out was recorded as the client's
    doing ("client closed the connection"); it was llmtap's."""
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + CONTENT + b"\n\n")
        await release.wait()  # never, in this test: the gateway stops first
        return resp

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    got_first = asyncio.Event()

    async def client(gw: str) -> None:
        async with aiohttp.ClientSession() as s, s.post(f"{gw}/openai/v1/chat/completions", data=CHAT) as r:
            await r.content.readuntil(b"\n\n")
            got_first.set()
            await r.read()

    task: asyncio.Task[None] | None = None
    try:
        async with running_gateway(settings_for(port, tmp_path, shutdown_timeout=0.5), q) as (svc, gw):
            task = asyncio.create_task(client(gw))
            await asyncio.wait_for(got_first.wait(), 30)
        (rec,) = await published(svc, q, 1)
    finally:
        release.set()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await runner.cleanup()
    assert rec.outcome == "client_disconnected"
    assert rec.error is not None and rec.error.startswith("llmtap stopped mid-response"), rec.error


async def test_a_request_waiting_on_its_upstream_is_cut_at_the_shutdown_timeout_not_twice_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Found by the failed-requests check: with LLMTAP_SHUTDOWN_TIMEOUT=4, requests waiting on
    their upstream (for its headers, or mid-stream) were cut 8 s after SIGTERM: aiohttp waits the
    timeout, then cancels only the request's body and waits the timeout again."""
    release, held = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if request.headers.get("x-mode") == "head":
            held.set()
            await release.wait()  # no answer at all
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: " + CONTENT + b"\n\n")
        await release.wait()  # then silence
        return resp

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    ended: list[float] = []
    timeout = 3.0

    async def client(gw: str, mode: str, started: asyncio.Event) -> None:
        async with aiohttp.ClientSession() as s:
            with contextlib.suppress(aiohttp.ClientError):
                async with s.post(
                    f"{gw}/openai/v1/chat/completions", data=CHAT, headers={"x-mode": mode}
                ) as r:
                    await r.content.readuntil(b"\n\n")
                    started.set()
                    await r.read()
        ended.append(time.monotonic())

    tasks: list[asyncio.Task[None]] = []
    try:
        async with running_gateway(settings_for(port, tmp_path, shutdown_timeout=timeout), q) as (svc, gw):
            first = asyncio.Event()
            tasks.append(asyncio.create_task(client(gw, "stream", first)))
            tasks.append(asyncio.create_task(client(gw, "head", asyncio.Event())))
            await asyncio.wait_for(asyncio.gather(first.wait(), held.wait()), 30)
            stopping = time.monotonic()
        recs = await published(svc, q, 2)
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        # (before the upstream is released: its own handlers then log their closed connections)
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    finally:
        release.set()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await runner.cleanup()
    took = max(ended) - stopping
    assert timeout - 0.5 < took < 2 * timeout - 0.5, f"cut {took:.1f} s after the stop began"
    # aiohttp's own wait and ours end together at <= 5 s: it once logged InvalidStateError.
    assert not errors, caplog.text
    for r in recs:  # and their records say whose doing it was
        assert r.outcome == "client_disconnected" and r.error is not None, r.error
        assert r.error.startswith("llmtap stopped") and "LLMTAP_SHUTDOWN_TIMEOUT" in r.error, r.error


async def test_a_big_responses_stream_keeps_its_usage(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Past `max_body_bytes` a stream keeps its last 64 KiB. A Responses API stream ends with
    `response.completed`, which repeats the whole output: when that is larger than the tail,
    the event could not be parsed and the record lost its tokens. Its usage member is its end."""
    text = "word " * 20000  # 100 KB of output, repeated by the final event
    deltas = [
        b"event: response.output_text.delta\ndata: "
        + json.dumps({"type": "response.output_text.delta", "delta": "word " * 2000}).encode()
        for _ in range(500)  # ~5 MB of deltas, past the 4 MiB kept
    ]
    done = {
        "type": "response.completed",
        "response": {
            "id": "resp_1",
            "model": "gpt-4o-mini",
            "status": "completed",
            "output": [
                {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}
            ],
            "usage": {"input_tokens": 5, "output_tokens": 20000, "total_tokens": 20005},
        },
    }
    body = b"\n\n".join([*deltas, b"event: response.completed\ndata: " + json.dumps(done).encode()]) + b"\n\n"

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(0, len(body), 65536):
            await resp.write(body[i : i + 65536])
        await resp.write_eof()
        return resp

    req = b'{"model":"gpt-4o-mini","input":"hi","stream":true}'
    x = await exchange(handler, tmp_path, http, "/openai/v1/responses", req)
    assert x.body == body
    u = x.record.usage
    assert (u.source, u.prompt_tokens, u.completion_tokens) == ("provider", 5, 20000), u


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/openai/v1/responses/resp_1"),
        ("GET", "/openai/v1/chat/completions/chatcmpl-2"),
        ("POST", "/openai/v1/responses/resp_1/cancel"),
    ],
)
async def test_looking_up_an_answer_is_not_billed_again(
    method: str, path: str, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A background response polled with `GET /v1/responses/{id}` echoes the usage it was
    billed for when it was made: counted per poll, it was billed once per poll."""

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        usage = {"input_tokens": 30, "output_tokens": 12, "total_tokens": 42}
        return web.json_response(
            {"id": "resp_1", "model": "gpt-4o-mini", "status": "completed", "usage": usage}
        )

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            async with http.request(method, f"{gw}{path}", headers={"Authorization": "Bearer k"}) as r:
                assert r.status == 200 and json.loads(await r.read())["usage"]["input_tokens"] == 30
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert rec.usage.source == "missing" and rec.usage.total_tokens is None and rec.status == 200


@pytest.mark.parametrize("who", ["client", "llmtap"])
async def test_a_request_whose_body_never_arrives_is_still_recorded(who: str, tmp_path: Path) -> None:
    """Half a body, then the client hangs up or llmtap stops (aiohttp then drops what still
    arrives): the request never reached the upstream, and it left no trace at all."""
    runner, port, reached = await listing_upstream()
    q = MemoryQueue()
    head = (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100000\r\nExpect: 100-continue\r\n\r\n"
    )
    try:
        async with running_gateway(settings_for(port, tmp_path, shutdown_timeout=0.5), q) as (svc, _):
            reader, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(head)
            # The gateway says 100 Continue right before it reads the body: it is reading now.
            assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"HTTP/1.1 100")
            writer.write(b'{"model":"gpt-4o-mini","messages":[')
            await writer.drain()
            if who == "client":
                writer.close()
                (rec,) = await published(svc, q, 1)
        if who == "llmtap":
            (rec,) = await published(svc, q, 1)
            writer.close()
    finally:
        await runner.cleanup()
    assert reached == [] and rec.status is None and rec.outcome == "client_disconnected"
    want = "client went away" if who == "client" else "llmtap stopped"
    assert rec.error == (
        f"{want} before its body arrived"
        + (": the request outlasted LLMTAP_SHUTDOWN_TIMEOUT" if who == "llmtap" else "")
    )


async def test_a_client_gone_before_its_100_continue_is_still_recorded(tmp_path: Path) -> None:
    """The concurrency review: `Expect: 100-continue` and the client gone at once: writing the
    100 raised before the request's capture existed: 22 of 30 left no record (and a traceback)."""
    q = MemoryQueue()
    head = (
        b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\nExpect: 100-continue\r\n\r\n"
    )
    n = 30
    async with running_gateway(settings_for(dead_port(), tmp_path), q) as (svc, _):
        for _ in range(n):
            _, writer = await asyncio.open_connection("127.0.0.1", svc.port)
            writer.write(head)
            await writer.drain()
            writer.close()
        recs = await published(svc, q, n)
    assert {(r.status, r.outcome) for r in recs} == {(None, "client_disconnected")}


# -- units ----------------------------------------------------------------------------------------


def test_decoding_stops_one_byte_past_the_limit_for_every_coding() -> None:
    import brotli
    import zstandard

    raw = b"x" * (8 << 20)
    coded = {
        "gzip": gzip.compress(raw),
        "deflate": zlib.compress(raw),
        "br": brotli.compress(raw),
        "zstd": zstandard.ZstdCompressor().compress(raw),
    }
    for enc, data in coded.items():
        out = _decode(data, enc, 1000)
        assert out is not None and len(out) == 1001 and out == raw[:1001], enc
        assert _decode(data, enc, 16 << 20) == raw, enc  # under the limit: all of it
        assert _decode(data[: len(data) // 2], enc, 16 << 20) is not None, enc  # truncated input


def test_a_gemini_model_with_an_encoded_colon_is_the_model() -> None:
    assert model_from_path("/v1beta/models/gemini-2.5-flash%3AgenerateContent") == "gemini-2.5-flash"
    assert model_from_path("/v1beta/models/gemini-2.5-flash:streamGenerateContent") == "gemini-2.5-flash"


def test_usage_from_the_tail_of_each_providers_answer() -> None:
    from llmtap.providers import provider_for

    tail = b'0.1, 0.2]}], "model": "m", "usage" :  {"prompt_tokens": 9, "total_tokens": 9}}'
    assert provider_for("openai").usage_from_tail(tail).prompt_tokens == 9
    tail = b'"stop_reason":"end_turn","usage":{"input_tokens":5,"output_tokens":2}}'
    assert provider_for("anthropic").usage_from_tail(tail).completion_tokens == 2
    tail = b'}]}],"usageMetadata":{"promptTokenCount":3,"candidatesTokenCount":4,"totalTokenCount":7}}'
    assert provider_for("gemini").usage_from_tail(tail).total_tokens == 7
    for cut in (b'"usage":{"prompt_tok', b"no usage here", b'"usage" 5'):
        assert provider_for("openai").usage_from_tail(cut).source == "missing"


def test_a_gemini_stream_without_alt_sse_is_one_json_array_with_the_usage_last() -> None:
    from llmtap.providers import provider_for

    chunks = [
        {"candidates": [{"content": {"parts": [{"text": "He"}]}}]},
        {"candidates": [{"content": {"parts": [{"text": "llo"}]}, "finishReason": "STOP"}],
         "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5}},
    ]  # fmt: skip
    assert provider_for("gemini").usage_from_body(chunks).total_tokens == 5


def event(kind: str, **data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + json.dumps({"type": kind, **data}).encode() + b"\n\n"


def chat_chunk(delta: dict[str, Any]) -> bytes:
    """An OpenAI chat stream's chunk, as OpenAI writes it (no spaces)."""
    body = {"id": "c1", "object": "chat.completion.chunk", "model": "o3", "choices": [
        {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}  # fmt: skip
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@pytest.mark.parametrize(
    ("path", "opening", "output"),
    [
        (
            "/openai/v1/responses",
            [event("response.created", response={"id": "r1"}),
             event("response.in_progress", response={"id": "r1"})],
            [event("response.output_text.delta", delta="Hi")],
        ),
        (
            "/anthropic/v1/messages",
            [event("message_start", message={"id": "m1", "model": "claude-sonnet-4-6"}),
             event("content_block_start", index=0, content_block={"type": "text", "text": ""})],
            [event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"})],
        ),
        (  # the README check: the role chunk (sent at once) was taken for the first token
            "/openai/v1/chat/completions",
            [chat_chunk({"role": "assistant", "content": "", "refusal": None})],
            [chat_chunk({"content": "Hi"}), b"data: [DONE]\n\n"],
        ),
        (
            "/openai/v1/chat/completions",
            [chat_chunk({"role": "assistant", "content": None})],
            [chat_chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                                         "function": {"name": "f", "arguments": ""}}]}),
             b"data: [DONE]\n\n"],
        ),
        (  # a compatible server's reasoning stream (vLLM, DeepSeek)
            "/openai/v1/chat/completions",
            [chat_chunk({"role": "assistant", "content": ""})],
            [chat_chunk({"reasoning_content": "Let me"}), chat_chunk({"content": "Hi"}),
             b"data: [DONE]\n\n"],
        ),
    ],
)  # fmt: skip
async def test_time_to_first_token_is_the_first_generated_output_not_the_opening_events(
    tmp_path: Path, http: aiohttp.ClientSession, path: str, opening: list[bytes], output: list[bytes]
) -> None:
    """An outside check: a Responses stream whose `response.created` came at once and its first
    text 2 s later (a reasoning model) was recorded with a time to first token of 6 ms."""
    pause = 0.5

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for event in opening:
            await resp.write(event)
        await asyncio.sleep(pause)  # the model thinks
        for event in output:
            await resp.write(event)
        await resp.write_eof()
        return resp

    body = b'{"model":"m","stream":true,"input":"hi","max_tokens":5,"messages":[]}'
    x = await exchange(handler, tmp_path, http, path, body, JSON_AUTH)
    assert x.status == 200 and x.record.streamed
    ttft = x.record.time_to_first_token_ms
    assert ttft is not None and ttft >= pause * 1000 * 0.9, ttft


async def test_a_token_marker_split_across_two_reads_still_marks_the_first_token(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """`content_block_delta` cut in two by the network: the first token was taken from the next
    read holding the whole marker. Each part is written once the client has the one before it
    (so the gateway surely reads them apart, however slow the machine), and the last event
    `later` seconds after that: the first token must be marked at least `later` before the end."""
    later = 1.0
    first = event("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"})
    cut = first.index(b'"content_block_delta"') + 5  # inside the marker itself
    start = event("message_start", message={"id": "m1", "model": "claude-sonnet-4-6"})
    got = bytearray()
    has_half, has_first = asyncio.Event(), asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(start + first[:cut])
        await asyncio.wait_for(has_half.wait(), 60)
        await resp.write(first[cut:])
        await asyncio.wait_for(has_first.wait(), 60)
        await asyncio.sleep(later)
        await resp.write(event("content_block_delta", index=0, delta={"type": "text_delta", "text": "!"}))
        await resp.write_eof()
        return resp

    body = b'{"model":"m","stream":true,"max_tokens":5,"messages":[]}'
    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            async with http.post(f"{gw}/anthropic/v1/messages", data=body, headers=JSON_AUTH) as r:
                async for part in r.content.iter_any():
                    got += part
                    if got.endswith(start + first[:cut]):
                        has_half.set()
                    if got.endswith(first):
                        has_first.set()
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert has_first.is_set() and got.count(b"content_block_delta") == 4  # both deltas, whole
    ttft = rec.time_to_first_token_ms
    assert ttft is not None and ttft <= rec.latency_ms - (later * 1000 - 50), (ttft, rec.latency_ms)


async def test_a_transcription_upload_names_its_model_and_prices_its_audio(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """An outside check: `audio/transcriptions` (a multipart upload) was recorded without a model,
    so unpriced, and its `input_token_details.audio_tokens` (spelled without the s) were lost."""
    from llmtap import pricing

    answer = {
        "text": "Hello there.",
        "usage": {"type": "tokens", "input_tokens": 14, "output_tokens": 45, "total_tokens": 59,
                  "input_token_details": {"text_tokens": 0, "audio_tokens": 14}},
    }  # fmt: skip

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response(answer)

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            form = aiohttp.FormData()
            form.add_field(
                "file", b"RIFF\x00\x01\x02fake wav bytes", filename="a.wav", content_type="audio/wav"
            )
            form.add_field("model", "gpt-4o-transcribe")
            form.add_field("response_format", "json")
            headers = {"Authorization": "Bearer sk-test"}
            async with http.post(f"{gw}/openai/v1/audio/transcriptions", data=form, headers=headers) as r:
                assert r.status == 200 and (await r.json()) == answer
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert rec.model == "gpt-4o-transcribe"
    u = rec.usage
    assert (u.prompt_tokens, u.completion_tokens, u.input_audio_tokens) == (14, 45, 14)
    pricing.apply_cost(rec)
    text_only = msgspec.structs.replace(u, input_audio_tokens=None)
    as_text = pricing.price_usage("openai", "gpt-4o-transcribe", text_only, rec.started_at)
    assert rec.cost_usd is not None and as_text is not None and rec.cost_usd > as_text.usd  # audio costs more


async def test_media_calls_keep_their_model_and_are_priced_by_their_own_units(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The media audit: a form's `model` after a file larger than LLMTAP_MAX_BODY_BYTES was lost
    (the model field comes last in OpenAI's own curl examples); whisper-1's `seconds` and
    tts-1's characters were unpriced though the table prices them; an upload's parts and its
    completion were counted as billed, unpriced."""
    from llmtap import pricing

    async def handler(request: web.Request) -> web.StreamResponse:
        form = await request.post() if request.content_type.startswith("multipart/") else {}
        if request.path.endswith("/audio/speech"):
            return web.Response(body=b"ID3" + bytes(range(256)) * 20, content_type="audio/mpeg")
        if request.path.endswith("/transcriptions"):
            return web.json_response({"text": "hi", "usage": {"type": "duration", "seconds": 9.2}})
        if request.path.endswith("/translations") and form.get("response_format") == "text":
            return web.Response(text="He typed --> 23:59:59,999 into the chat", content_type="text/plain")
        if request.path.endswith("/translations"):  # response_format=srt: no usage at all; past
            # the body limit (4096 here), so its end is read from the capture's tail (rev18b)
            cues = [f"{i}\n00:00:{i // 10:02d},000 --> 00:00:{i // 10:02d},500\nw {i}\n" for i in range(300)]
            srt = "\n".join([*cues, "301\n00:00:05,000 --> 00:00:12,340\nworld\n"])
            return web.Response(text=srt, content_type="text/plain")
        return web.json_response({"id": "part_1", "object": "upload.part"})

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path, max_body_bytes=4096), q) as (svc, gw):
            headers = {"Authorization": "Bearer sk-test"}
            form = aiohttp.FormData()
            form.add_field("file", b"\xff\xfb" * 10_000, filename="a.mp3", content_type="audio/mpeg")
            form.add_field("model", "whisper-1")
            async with http.post(f"{gw}/openai/v1/audio/transcriptions", data=form, headers=headers) as r:
                assert r.status == 200
            form = aiohttp.FormData()
            # rev19: a file's bytes that look like a field are not the form's field
            fake_field = b'\r\nContent-Disposition: form-data; name="response_format"\r\n\r\ntext\r\n'
            audio = b"\xff\xfb" * 100 + fake_field
            form.add_field("file", audio, filename="a.mp3", content_type="audio/mpeg")
            form.add_field("model", "whisper-1")
            form.add_field("response_format", "srt")
            async with http.post(f"{gw}/openai/v1/audio/translations", data=form, headers=headers) as r:
                assert r.status == 200
            form = aiohttp.FormData()
            form.add_field("file", b"\xff\xfb" * 100, filename="a.mp3", content_type="audio/mpeg")
            form.add_field("model", "whisper-1")
            form.add_field("response_format", "text")
            text_url = f"{gw}/openai/v1/audio/translations?as=text"
            async with http.post(text_url, data=form, headers=headers) as r:
                assert r.status == 200
            speech = {"model": "tts-1", "input": "Hello, world!", "voice": "alloy"}
            async with http.post(f"{gw}/openai/v1/audio/speech", json=speech, headers=headers) as r:
                assert r.status == 200 and (await r.read()).startswith(b"ID3")
            for tail in ("parts", "complete"):
                async with http.post(
                    f"{gw}/openai/v1/uploads/upload_1/{tail}", json={}, headers=headers
                ) as r:
                    assert r.status == 200
            got = await published(svc, q, 6)
            recs = {r.path.rsplit("/", 1)[-1] + ("-text" if "as=text" in r.target_url else ""): r
                    for r in got}  # fmt: skip
    finally:
        await runner.cleanup()
    heard = recs["transcriptions"]
    assert heard.model == "whisper-1" and heard.request_body is not None and heard.request_body.truncated
    assert heard.usage.audio_seconds == 10
    pricing.apply_cost(heard)
    assert heard.cost_nanos == 1_000_000  # whisper-1: $0.006 a minute, 10 s
    # rev17: subtitles (`response_format=srt|vtt`) carry no usage: the last cue's end, rounded up
    subtitled = recs["translations"]
    assert subtitled.response_body is not None and subtitled.response_body.truncated  # cut: the tail
    assert subtitled.usage.source == "estimated" and subtitled.usage.audio_seconds == 13
    pricing.apply_cost(subtitled)
    assert subtitled.cost_nanos == 1_300_000
    # rev18b: a text answer with an arrow in it is no subtitle: unpriced, not a day of audio
    assert recs["translations-text"].usage.source == "missing"
    said = recs["speech"]
    assert said.model == "tts-1" and said.usage.source == "estimated" and said.usage.input_characters == 13
    pricing.apply_cost(said)
    assert said.cost_nanos == 13 * 15_000  # tts-1: $15 per million characters
    for tail in ("parts", "complete"):
        pricing.apply_cost(recs[tail])
        assert recs[tail].cost_usd == 0, tail  # generates nothing: $0, not "unpriced"


async def test_an_upstream_url_handed_to_the_client_points_at_the_gateway(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A redirect's `Location` at the upstream took the client's next call round the gateway;
    it names the route as the client reached it (a proxy in front: `X-Forwarded-*`). A host that
    only begins like the upstream's is left alone."""

    async def handler(request: web.Request) -> web.Response:
        where = request.query.get("to", "")
        return web.Response(status=307, headers={"Location": where.replace("UP", f"http://127.0.0.1:{port}")})

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (_, gw):
            cases = [
                ("UP/v1/files/f1?x=1", {}, f"{gw}/openai/v1/files/f1?x=1"),
                ("UP/v1/x", {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "llm.example.com"},
                 "https://llm.example.com/openai/v1/x"),
                ("UP.evil.example/v1/x", {}, f"http://127.0.0.1:{port}.evil.example/v1/x"),
                ("https://elsewhere.example/v1/x", {}, "https://elsewhere.example/v1/x"),
                # rev15: no host name is taken from a header; a path at the upstream is the route's
                ("UP/v1/x", {"X-Forwarded-Host": "a b.example, c"}, f"{gw}/openai/v1/x"),
                ("UP/v1/x", {"X-Forwarded-Host": "ex.com/../../evil?x="}, f"{gw}/openai/v1/x"),
                ("UP/v1/x", {"X-Forwarded-Host": "my_gw.internal:8080"}, "http://my_gw.internal:8080/openai/v1/x"),
                ("/v1/models?x=1", {}, "/openai/v1/models?x=1"),
                ("//elsewhere.example/v1/x", {}, "//elsewhere.example/v1/x"),
                # rev17: a proxy that strips a prefix (nginx `location /v1proxy/`) says it, and
                # its port apart; RFC 7239's `Forwarded`; an upstream's URL in capitals
                ("UP/v1/x", {"X-Forwarded-Host": "llm.example.com", "X-Forwarded-Proto": "https",
                             "X-Forwarded-Prefix": "/v1proxy/"}, "https://llm.example.com/v1proxy/openai/v1/x"),
                ("/v1/models", {"X-Forwarded-Prefix": "/v1proxy"}, "/v1proxy/openai/v1/models"),
                ("UP/v1/x", {"X-Forwarded-Host": "llm.example.com", "X-Forwarded-Port": "8443",
                             "X-Forwarded-Proto": "https"}, "https://llm.example.com:8443/openai/v1/x"),
                ("UP/v1/x", {"X-Forwarded-Host": "llm.example.com", "X-Forwarded-Port": "443",
                             "X-Forwarded-Proto": "https"}, "https://llm.example.com/openai/v1/x"),
                ("UP/v1/x", {"X-Forwarded-Host": "[2001:db8::1]", "X-Forwarded-Port": "99999"},
                 "http://[2001:db8::1]/openai/v1/x"),
                ("UP/v1/x", {"X-Forwarded-Host": "llm.example.com:99999"}, f"{gw}/openai/v1/x"),
                ("UP/v1/x", {"X-Forwarded-Prefix": "/a/../../evil"}, f"{gw}/openai/v1/x"),
                ("UP/v1/x", {"X-Forwarded-Prefix": "/p?q=1"}, f"{gw}/openai/v1/x"),
                ("UP/v1/x", {"Forwarded": 'for=1.2.3.4;proto=https;host="gw.example:444", for=5.6.7.8'},
                 "https://gw.example:444/openai/v1/x"),
                (f"HTTP://127.0.0.1:{port}/v1/x", {}, f"{gw}/openai/v1/x"),

            ]  # fmt: skip
            for to, headers, want in cases:
                url = f"{gw}/openai/v1/go"
                async with http.get(url, params={"to": to}, headers=headers, allow_redirects=False) as r:
                    assert r.status == 307 and r.headers["Location"] == want, (to, r.headers["Location"])
        # LLMTAP_PUBLIC_URL: where clients reach the gateway, whatever a request's headers say
        public = settings_for(port, tmp_path).model_copy(
            update={"public_url": "https://llm.example.com/v1proxy"}
        )
        async with running_gateway(public, q) as (_, gw):
            for to, want in [("UP/v1/x?u=1", "https://llm.example.com/v1proxy/openai/v1/x?u=1"),
                             ("/v1/models", "/v1proxy/openai/v1/models")]:  # fmt: skip
                headers = {"X-Forwarded-Host": "other.example", "X-Forwarded-Prefix": "/elsewhere"}
                async with http.get(f"{gw}/openai/v1/go", params={"to": to}, headers=headers,
                                    allow_redirects=False) as r:  # fmt: skip
                    assert r.status == 307 and r.headers["Location"] == want, (to, r.headers["Location"])
    finally:
        await runner.cleanup()


async def test_a_capture_finished_twice_is_one_record_with_its_first_outcome(tmp_path: Path) -> None:
    """The concurrency review: an upstream cut whose last write to the client was cancelled
    (the client left that moment) finished its capture again from the handler's `except`: two
    records of one id, the second calling it `client_disconnected`."""
    import time

    from llmtap.gateway.capture import Capture

    q = MemoryQueue()
    async with running_gateway(settings_for(dead_port(), tmp_path), q) as (svc, _):
        now = time.perf_counter()
        cap = Capture("r-1", "default", "openai", "POST", "/v1/chat/completions", "http://x", [], None,
                      b"{}", 2, time.time(), now, 1 << 20)  # fmt: skip
        svc.proxy._finish(cap, "upstream_cut", "upstream broke mid-response")
        svc.proxy._finish(cap, "client_disconnected", "client went away")
        (rec,) = await published(svc, q, 1)
    assert (rec.id, rec.outcome) == ("r-1", "upstream_cut")


async def test_a_client_that_stops_reading_is_cut_off_and_frees_its_upstream_connection(
    upstream: int, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """The concurrency review: three clients asking for a large answer and reading none of it
    held the gateway's three upstream connections for ever; a fourth request waited without
    end while /healthz said ok. A client that reads nothing for `client_stall_timeout` is
    cut off (recorded), and the pool serves the next request."""
    import socket

    q = MemoryQueue()
    settings = settings_for(upstream, tmp_path, client_stall_timeout=1.0, upstream_max_connections=1)
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
    async with running_gateway(settings, q) as (svc, gw):
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.settimeout(60)
        head = (
            b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer sk-test\r\nx-fake-response-bytes: 30000000\r\n"
            + b"Content-Length: %d\r\n\r\n"
            % len(body)
        )
        try:  # (blocking calls off the loop the gateway runs on)
            await asyncio.to_thread(stalled.connect, ("127.0.0.1", svc.port))
            await asyncio.to_thread(stalled.sendall, head + body)
            assert (await asyncio.to_thread(stalled.recv, 100)).startswith(b"HTTP/1.1 200")  # no more
            async with http.post(
                f"{gw}/openai/v1/chat/completions",
                data=body,
                headers={**JSON_AUTH, "Authorization": "Bearer k"},
                timeout=aiohttp.ClientTimeout(total=120),
            ) as r:  # waits for the one upstream connection, freed by the cut
                assert r.status == 200 and b"usage" in await r.read()
            recs = await published(svc, q, 2)
        finally:
            stalled.close()
    cut = next(r for r in recs if r.error and "LLMTAP_CLIENT_STALL_TIMEOUT" in r.error)
    assert cut.outcome == "client_disconnected" and cut.status == 200, cut


@pytest.mark.parametrize(
    ("chunk", "output"),
    [
        (b'{"delta":{"role":"assistant","content":"","refusal":null}}', False),  # OpenAI's opening
        (b'{"delta":{"role":"assistant","content":null,"tool_calls":[]}}', False),
        (b'{"delta":{"content":[]}}', False),
        (b'{"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2}}', False),
        (b'{"delta":{"content":"Hi"}}', True),
        (b'{"delta": {"content": "Hi"}}', True),  # spaced, as some servers write
        (b'{"delta":{"content":"\\"quoted\\""}}', True),
        (b'{"delta":{"tool_calls":[{"index":0,"function":{"name":"f"}}]}}', True),
        (b'{"delta":{"content":[{"type":"thinking","thinking":[]}]}}', True),  # Mistral's parts
        (b'{"delta":{"reasoning_content":"Let me"}}', True),  # vLLM, DeepSeek
    ],
)
def test_what_an_openai_chat_chunk_counts_as_output_for_the_first_token(chunk: bytes, output: bool) -> None:
    """Today's diff review: a role chunk with `"tool_calls":[]` was taken for output, and
    content sent as a list of parts never was."""
    from llmtap.providers import provider_for

    marker = provider_for("openai").token_marker("/v1/chat/completions")
    assert marker is not None and bool(marker.search(b"data: " + chunk + b"\n\n")) is output


@pytest.mark.parametrize("reading", [True, False])
async def test_a_slow_reader_is_never_cut_a_stalled_one_is(tmp_path: Path, reading: bool) -> None:
    """Today's diff review: the stall timer covered one write, and one write of a large read
    takes a slow link longer than the timeout while its bytes flow: a client reading steadily at
    150 KB/s was cut. Progress (what is left unsent shrinking) is timed now. Driven by hand:
    each look at the client's connection finds less unsent (reading) or the same (stalled)."""
    from llmtap.gateway.proxy import ClientStalled

    taken = asyncio.Event()

    class Client:
        unsent, looks = 10_000_000, 0

        def get_write_buffer_size(self) -> int:
            self.looks += 1
            if reading:
                self.unsent -= 100_000
            if self.looks >= 5:
                taken.set()  # the client took the whole write in the end
            return self.unsent

    class Answer:
        async def write(self, chunk: bytes) -> None:
            await taken.wait()

    async with running_gateway(settings_for(dead_port(), tmp_path, client_stall_timeout=0.05)) as (svc, _):
        client = Client()
        if reading:
            await svc.proxy._write_or_stall(Answer(), client, b"x" * 768_000)  # type: ignore[arg-type]
            assert client.looks == 5
        else:
            with pytest.raises(ClientStalled, match=r"read nothing for 0\.05 s"):
                await svc.proxy._write_or_stall(Answer(), client, b"x" * 768_000)  # type: ignore[arg-type]
            assert client.looks == 2 and not taken.is_set()


async def test_the_upstream_is_sent_no_fragment_no_dot_segment_and_one_request_id(tmp_path: Path) -> None:
    """An outside check of the HTTP edge:
    - a `#x` in the target hid a stream's usage (the provider's checks saw `completions#x`, the
      upstream was sent `completions`), and the record named a path never requested;
    - `/openai/../../x` left the route's base path on upstreams that resolve dot segments;
    - an absolute-form target (`POST http://host/openai/...`) was a 404;
    - `CONNECT` went upstream as `CONNECT host:port`, recorded under another path;
    - an upstream's own `Llmtap-Request-Id` (another llmtap) reached the client beside ours;
    - `Llmtap-Omit-Request: true` then `false`: the body was stored (the last one won)."""
    from rawhttp import RawUpstream, exchange, request_bytes

    events = sse([CONTENT, USAGE, b"[DONE]"], b"\n\n")
    upstream = RawUpstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nLlmtap-Request-Id: 00000000-0000-7000-8000-"
        b"000000000001\r\nContent-Length: " + str(len(events)).encode() + b"\r\n\r\n" + events
    )
    q = MemoryQueue()
    settings = settings_for(dead_port(), tmp_path, openai_base_url=upstream.url + "/base")
    auth = [(b"Authorization", b"Bearer sk-test"), (b"Content-Type", b"application/json")]
    try:
        async with running_gateway(settings, q) as (svc, _):
            port = svc.port

            def send(method: bytes, target: bytes, *extra: tuple[bytes, bytes]) -> Any:
                return exchange(port, request_bytes(method, target, [*auth, *extra], STREAM))

            cases = [
                (b"/openai/v1/chat/completions#x", b"/base/v1/chat/completions"),
                (b"/openai/../../x", b"/base/x"),
                (b"/openai/%2e%2e/%2E%2E/v1/./chat/completions?a=1#f", b"/base/v1/chat/completions?a=1"),
                (
                    f"http://127.0.0.1:{port}/openai/v1/chat/completions".encode(),
                    b"/base/v1/chat/completions",
                ),
                (b"HTTP://127.0.0.1/openai/v1/chat/completions", b"/base/v1/chat/completions"),
            ]
            answers = []
            for target, _ in cases:
                answers.append(await asyncio.to_thread(send, b"POST", target))
            connect = await asyncio.to_thread(send, b"CONNECT", b"/openai/v1/x")
            tunnel = await asyncio.to_thread(send, b"CONNECT", b"api.openai.com:443")
            queried = await asyncio.to_thread(send, b"POST", b"http://x?y=/openai/v1/chat/completions")
            omit = await asyncio.to_thread(
                send, b"POST", b"/openai/v1/chat/completions",
                (b"Llmtap-Omit-Request", b"true"), (b"Llmtap-Omit-Request", b"false"),
            )  # fmt: skip
            underscore = await asyncio.to_thread(
                send, b"POST", b"/openai/v1/chat/completions", (b"Llmtap_Omit_Response", b"true")
            )
            mixed = await asyncio.to_thread(
                send, b"POST", b"/openai/v1/chat/completions", (b"Llmtap-Omit_Request", b"true")
            )
            records = {r.id: r for r in await published(svc, q, len(cases) + 3)}
    finally:
        upstream.close()
    assert connect is not None and connect.status == 405, connect
    assert tunnel is not None and tunnel.status == 405, tunnel
    assert queried is not None and queried.status == 404, queried  # its path is `/`: no route
    sent = [head.split(b"\r\n", 1)[0] for head in upstream.heads]
    assert (
        sent
        == [b"POST " + want + b" HTTP/1.1" for _, want in cases]
        + [b"POST /base/v1/chat/completions HTTP/1.1"] * 3
    )  # CONNECT never went upstream
    for (target, want), got in zip(cases, answers, strict=True):
        assert got is not None and got.status == 200, (target, got)
        ids = [v for k, v in got.headers if k.lower() == b"llmtap-request-id"]
        assert len(ids) == 1 and ids[0] != b"00000000-0000-7000-8000-000000000001", ids  # ours alone
        rec = records[ids[0].decode()]
        path = want.removeprefix(b"/base").decode().partition("?")[0]
        assert rec.path == path and rec.target_url == upstream.url + want.decode(), (rec.path, rec.target_url)
        assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (11, 1), (target, rec.usage)
    assert omit is not None and omit.status == 200
    omitted = [r for r in records.values() if r.omit_request]  # `Llmtap-Omit_Request` too
    assert len(omitted) == 2 and all(r.request_body is None for r in omitted)
    assert mixed is not None and mixed.status == 200
    assert underscore is not None and underscore.status == 200
    (kept_out,) = [r for r in records.values() if r.omit_response]  # `Llmtap_Omit_*` honoured
    assert kept_out.response_body is None and kept_out.response_events is None


def test_dot_segments_never_climb_above_the_routes_base() -> None:
    from llmtap.gateway.proxy import _tidy

    assert _tidy("/v1/chat/completions") == "/v1/chat/completions"
    assert _tidy("/../../../etc/passwd") == "/etc/passwd"
    assert _tidy("/v1/a/..") == "/v1/"
    assert _tidy("/v1/./a/%2e%2E/b?x=/../#frag") == "/v1/b?x=/../"
    assert _tidy("/a.b/.well-known/c.json") == "/a.b/.well-known/c.json"
    assert _tidy("/v1/%2Fx") == "/v1/%2Fx"


async def test_an_http_1_0_client_asking_keep_alive_gets_the_end_of_a_stream(tmp_path: Path) -> None:
    """An outside check: an HTTP/1.0 client with `Connection: keep-alive` asking for a stream
    got an answer with no length, no chunks and no close: it never saw its end."""
    import socket

    handler, _ = stream_upstream(b"\n\n")
    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, _):

            def ask() -> bytes:
                with socket.create_connection(("127.0.0.1", svc.port), timeout=30) as s:
                    s.sendall(
                        b"POST /openai/v1/chat/completions HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n"
                        b"Authorization: Bearer sk-test\r\nContent-Length: " + str(len(STREAM)).encode()
                        + b"\r\n\r\n" + STREAM
                    )  # fmt: skip
                    got = b""
                    while chunk := s.recv(65536):  # to the end: a socket timeout fails the test
                        got += chunk
                    return got

            got = await asyncio.to_thread(ask)
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert got.startswith(b"HTTP/1.0 200") and got.endswith(b"data: [DONE]\n\n"), got[-300:]
    assert rec.outcome == "completed" and rec.usage.prompt_tokens == 11


async def test_a_request_aiohttp_cannot_parse_is_told_why_without_its_credentials(tmp_path: Path) -> None:
    """An outside check: aiohttp's 400 quoted the offending request line back to the client,
    `Authorization: Bearer sk-...` or `?key=AIza...` with it (SDKs put error bodies into their
    exceptions, and those into logs and error trackers)."""
    from rawhttp import exchange

    bad = [
        b"POST /openai/v1/chat/completions HTTP/1.1\nHost: x\nAuthorization: Bearer sk-secret123\n"
        b"Content-Length: 2\nConnection: close\n\n{}",
        b"POST /openai/v1/x?key=AIzaSECRET4567890&q=\x7f HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        b"POST /openai/v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: sk-secret456\x01\r\nConnection: close\r\n"
        b"Content-Length: 2\r\n\r\n{}",
        # a line too long: aiohttp quotes its start on the reason's own line
        b"POST /openai/v1/x HTTP/1.1\r\nHost: x\r\nX-Api-Key: sk-secret789" + b"A" * 70_000 + b"\r\n\r\n",
    ]
    async with running_gateway(settings_for(dead_port(), tmp_path), MemoryQueue()) as (svc, _):
        for data in bad:
            got = await asyncio.to_thread(exchange, svc.port, data)
            assert got is not None and got.status == 400, (data, got)
            assert b":" in got.body and b"b'" not in got.body, got.body  # aiohttp's reason, not the bytes
            for secret in (b"sk-secret", b"AIzaSECRET"):
                assert secret not in got.body, got.body


async def test_a_stream_with_an_integer_past_64_bits_keeps_its_record(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """fuzz2: `created: 2**64` in a chunk (typed chunks keep integers whole, orjson refuses to
    write them) made the record "llmtap could not build this record": no model, tokens, user
    or bodies, and an upstream_error."""
    big = 2**64
    events = [
        {"id": "c1", "object": "chat.completion.chunk", "created": big, "model": "my-model",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hello"}}]},
        {"id": "c1", "object": "chat.completion.chunk", "created": big, "model": "my-model",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "c1", "object": "chat.completion.chunk", "created": big, "model": "my-model", "choices": [],
         "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18, "queue_time_ns": big}},
    ]  # fmt: skip
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=body, content_type="text/event-stream")

    runner, port = await tiny_upstream(handler)
    q = MemoryQueue()
    try:
        async with running_gateway(settings_for(port, tmp_path), q) as (svc, gw):
            ask = {"messages": [{"role": "user", "content": "hi"}], "stream": True}  # no model: rebuilt here
            headers = {"Authorization": "Bearer sk-test", "Llmtap-User-Id": "alice"}
            async with http.post(f"{gw}/openai/v1/chat/completions", json=ask, headers=headers) as r:
                assert r.status == 200 and b"hello" in await r.read()
            (rec,) = await published(svc, q, 1)
    finally:
        await runner.cleanup()
    assert (rec.outcome, rec.error, rec.model, rec.user_id) == ("completed", None, "my-model", "alice")
    assert (rec.usage.prompt_tokens, rec.usage.completion_tokens) == (11, 7)
    assert rec.response_body is not None and b"hello" in (rec.response_body.data or b"")


def test_a_forwarded_port_of_other_digits_is_not_taken() -> None:
    """rev18a: `X-Forwarded-Port: \u00b2` (and full-width digits) are digits to str.isdigit, and
    int() raised while the answer's headers were written: a 500, the request unlogged."""
    from aiohttp.test_utils import make_mocked_request

    from llmtap.gateway.proxy import _here

    def here(port: str) -> str | None:
        headers = {"X-Forwarded-Host": "a.com", "X-Forwarded-Port": port}
        return _here(make_mocked_request("GET", "/x", headers=headers), "openai", None)

    for port in ("\u00b2", "\uff14\uff14\uff13", "\u0668\u0660", "99999", "0"):
        assert here(port) == "http://a.com/openai", port
    assert here("8443") == "http://a.com:8443/openai"
