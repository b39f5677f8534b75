"""Gemini through the gateway with the real `google-genai` SDK: plain, stream, tools, cached,
thinking, error, cut stream, countTokens and embedContent, and the API key never recorded.

Expected token counts come from the fake's own deterministic rule (`gemini_usage`), expected
costs from Google's published Gemini 2.5 Flash prices written out below, never from llmtap's
pricing code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from gateway_support import MemoryQueue, running_gateway, settings_for, wait_for
from llmtap.handlers import streams
from llmtap.pricing import apply_cost
from llmtap.record import LogRecord, body_bytes, encode
from llmtap.testing.fake_gemini import THOUGHTS_TOKENS, gemini_usage

pytestmark = pytest.mark.timeout(60)

KEY = "AIzaSy-test-secret-gemini-key-123"
MODEL = "gemini-2.5-flash"
# Gemini 2.5 Flash, paid tier (ai.google.dev/gemini-api/docs/pricing), USD per 1M tokens:
# input (text) 0.30, output incl. thinking 2.50, context cache read (text) 0.03.
IN, OUT, CACHE_READ = 0.30, 2.50, 0.03


_clients: list[genai.Client] = []


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _clients:
        await _clients.pop().aio.aclose()


def client(gw: str, headers: dict[str, str] | None = None) -> genai.Client:
    """An SDK client kept alive until the test ends (a collected client closes its session
    under a request still in flight)."""
    c = genai.Client(
        api_key=KEY, http_options=types.HttpOptions(base_url=f"{gw}/gemini", headers=headers or {})
    )
    _clients.append(c)
    return c


async def records(q: MemoryQueue, n: int) -> list[LogRecord]:
    await wait_for(lambda: len(q.messages) >= n, timeout=20)
    await asyncio.sleep(0.05)
    recs = q.records()
    assert len(recs) == n, [r.path for r in recs]
    return recs


def no_key(rec: LogRecord) -> None:
    """The API key is nowhere in what would be queued and stored."""
    assert KEY.encode() not in encode(rec)
    assert "x-goog-api-key" not in rec.request_headers


def contents(text: str) -> list[types.Content]:
    return [types.Content(role="user", parts=[types.Part(text=text)])]


REQ = {"contents": [{"role": "user", "parts": [{"text": "hello gemini world"}]}]}


async def test_plain_generate_content(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    async with running_gateway(
        settings_for(upstream, tmp_path, gemini_base_url=f"http://127.0.0.1:{upstream}"), q
    ) as (
        _,
        gw,
    ):
        r = await client(gw).aio.models.generate_content(model=MODEL, contents="hello gemini world")
        (rec,) = await records(q, 1)
    assert r.text == "echo: hello gemini world"
    want = gemini_usage(REQ)
    assert r.usage_metadata is not None and r.usage_metadata.prompt_token_count == want["promptTokenCount"]
    assert (rec.provider, rec.model, rec.status, rec.streamed) == ("gemini", MODEL, 200, False)
    assert rec.path.endswith(f"/models/{MODEL}:generateContent")  # the SDK picks the API version
    u = rec.usage
    assert u.source == "provider"
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (
        want["promptTokenCount"],
        want["candidatesTokenCount"],
        want["totalTokenCount"],
    )
    no_key(rec)
    apply_cost(rec)
    expected = (u.prompt_tokens * IN + u.completion_tokens * OUT) / 1e6  # type: ignore[operator]
    assert rec.cost_nanos == round(expected * 1e9)


async def test_stream_thinking_and_cut(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, gemini_base_url=f"http://127.0.0.1:{upstream}")
    config = types.GenerateContentConfig(
        thinking_config=types.ThinkingConfig(thinking_budget=1024, include_thoughts=True)
    )
    async with running_gateway(s, q) as (_, gw):
        c = client(gw, {"x-fake-chunks": "5"})
        texts: list[str] = []
        last: types.GenerateContentResponse | None = None
        async for chunk in await c.aio.models.generate_content_stream(
            model=MODEL, contents="stream me please", config=config
        ):
            last = chunk
            for cand in chunk.candidates or []:
                for part in (cand.content.parts if cand.content else None) or []:
                    if part.text and not part.thought:
                        texts.append(part.text)
        cut = client(gw, {"x-fake-chunks": "5", "x-fake-cut-after": "2"})
        with pytest.raises(Exception):  # noqa: B017  the SDK surfaces the broken body its own way
            async for _ in await cut.aio.models.generate_content_stream(
                model=MODEL, contents="stream me please"
            ):
                pass
        full, broken = await records(q, 2)
    assert "".join(texts) == "echo: stream me please echo:"
    assert last is not None and last.usage_metadata is not None
    assert last.usage_metadata.thoughts_token_count == THOUGHTS_TOKENS
    assert full.streamed and full.model == MODEL and full.outcome == "completed"
    u = full.usage
    assert u.source == "provider"
    assert u.reasoning_tokens == THOUGHTS_TOKENS
    assert u.completion_tokens == 5 + THOUGHTS_TOKENS  # visible words + thoughts, both billed as output
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens  # type: ignore[operator]
    # Usage from the last chunk: the message is the worker's to rebuild (`handlers.streams`).
    assert full.response_body is None and streams.deferred(full)
    streams.finish(full, s.inline_body_bytes)
    assert full.usage == u
    body = body_bytes(full.response_body)  # type: ignore[arg-type]
    assert body is not None and b"echo: stream me please echo:" in body and b'"thought":true' in body
    no_key(full)
    apply_cost(full)
    expected = (u.prompt_tokens * IN + u.completion_tokens * OUT) / 1e6  # type: ignore[operator]
    assert full.cost_nanos == round(expected * 1e9)
    # The cut stream: two chunks' running counts (no candidates count yet) are not the final usage.
    assert broken.outcome == "upstream_cut"
    assert broken.usage.source == "partial"


async def test_tools_cached_and_tool_use_tokens(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, gemini_base_url=f"http://127.0.0.1:{upstream}")
    tool = types.Tool(
        function_declarations=[
            types.FunctionDeclaration(
                name="get_weather",
                description="weather",
                parameters=types.Schema(
                    type=types.Type.OBJECT, properties={"text": types.Schema(type="STRING")}
                ),
            )
        ]
    )
    h = {"x-fake-cached-tokens": "4000", "x-fake-tool-use-prompt-tokens": "7"}
    async with running_gateway(s, q) as (_, gw):
        r = await client(gw, h).aio.models.generate_content(
            model=MODEL, contents="weather in Paris", config=types.GenerateContentConfig(tools=[tool])
        )
        (rec,) = await records(q, 1)
    assert r.function_calls is not None and r.function_calls[0].name == "get_weather"
    assert r.function_calls[0].args == {"text": "weather in Paris"}
    um = r.usage_metadata
    assert um is not None and um.cached_content_token_count == 4000 and um.tool_use_prompt_token_count == 7
    u = rec.usage
    assert um.prompt_token_count is not None and um.candidates_token_count is not None
    assert u.prompt_tokens == um.prompt_token_count + 7  # tool-use prompt tokens are input too
    assert u.cached_tokens == 4000
    assert u.completion_tokens == um.candidates_token_count
    body = body_bytes(rec.response_body)  # type: ignore[arg-type]
    assert body is not None and b"functionCall" in body
    apply_cost(rec)
    assert u.prompt_tokens is not None and u.completion_tokens is not None
    expected = ((u.prompt_tokens - 4000) * IN + 4000 * CACHE_READ + u.completion_tokens * OUT) / 1e6
    assert rec.cost_nanos == round(expected * 1e9)


async def test_error_count_tokens_embed(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, gemini_base_url=f"http://127.0.0.1:{upstream}")
    async with running_gateway(s, q) as (_, gw):
        with pytest.raises(errors.ClientError) as e:
            await client(gw, {"x-fake-status": "429"}).aio.models.generate_content(model=MODEL, contents="hi")
        n = await client(gw).aio.models.count_tokens(model=MODEL, contents="count these four words")
        emb = await client(gw).aio.models.embed_content(model="gemini-embedding-001", contents="embed me")
        err, counted, embedded = await records(q, 3)
    assert e.value.code == 429
    assert err.status == 429 and err.error and "429" in err.error
    assert err.usage.source == "missing"
    apply_cost(err)
    assert err.cost_usd == 0  # refused: nothing billed, so not "unpriced" either
    assert (
        n.total_tokens
        == gemini_usage({"contents": [{"parts": [{"text": "count these four words"}]}]})["promptTokenCount"]
    )
    assert counted.path.endswith(":countTokens") and counted.usage.source == "missing"
    assert emb.embeddings and emb.embeddings[0].values
    assert embedded.model == "gemini-embedding-001"
    for rec in (err, counted, embedded):
        no_key(rec)


async def test_openai_compatible_endpoint_with_the_openai_sdk(upstream: int, tmp_path: Path) -> None:
    """Gemini's OpenAI-compatible endpoint (`/v1beta/openai/`) through `/gemini`: an outside
    check found its records without model, tokens or cost (read as Gemini's own format)."""
    from openai import AsyncOpenAI

    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, gemini_base_url=f"http://127.0.0.1:{upstream}")
    async with running_gateway(s, q) as (_, gw):
        oa = AsyncOpenAI(api_key=KEY, base_url=f"{gw}/gemini/v1beta/openai", max_retries=0)
        try:
            chat = await oa.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hello gemini world"}]
            )
            stream = await oa.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "stream this"}], stream=True
            )
            chunks = [c async for c in stream]
            emb = await oa.embeddings.create(model="gemini-embedding-001", input="embed me")
        finally:
            await oa.close()
        plain, streamed, embedded = await records(q, 3)
    assert chat.usage is not None and chat.choices[0].message.content
    # The usage chunk the gateway asked for is the gateway's: the client, which did not ask,
    # gets none.
    assert chunks and all(c.usage is None for c in chunks)
    assert emb.data and emb.usage.prompt_tokens > 0
    for rec, want in (
        (plain, chat.usage.prompt_tokens),
        (streamed, None),
        (embedded, emb.usage.prompt_tokens),
    ):
        assert (rec.provider, rec.status) == ("gemini", 200)
        assert rec.usage.source == "provider", rec.path
        assert rec.usage.prompt_tokens and (want is None or rec.usage.prompt_tokens == want)
        no_key(rec)
    assert (plain.model, streamed.model, embedded.model) == (MODEL, MODEL, "gemini-embedding-001")
    assert streamed.streamed and streamed.usage.completion_tokens
    u = plain.usage
    assert (u.prompt_tokens, u.completion_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    apply_cost(plain)
    expected = (u.prompt_tokens * IN + u.completion_tokens * OUT) / 1e6  # type: ignore[operator]
    assert plain.cost_nanos == round(expected * 1e9)


async def test_a_file_upload_comes_through_the_gateway(upstream: int, tmp_path: Path) -> None:
    """The media audit: the Files API's resumable upload answered the upstream's own URL
    (`X-Goog-Upload-URL`), so the file's bytes went round the gateway: unlogged, and lost to a
    client that can reach only the gateway. The URL is the gateway's route now."""
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, gemini_base_url=f"http://127.0.0.1:{upstream}")
    data = tmp_path / "notes.txt"
    data.write_bytes(b"meeting notes " * 1000)
    async with running_gateway(s, q) as (_, gw):
        file = await client(gw).aio.files.upload(file=str(data), config={"mime_type": "text/plain"})
        start, upload = await records(q, 2)
    assert file.name == "files/fake-file-1" and file.size_bytes == 14_000
    assert start.path == upload.path and start.path.startswith("/upload/") and start.path.endswith("/files")
    assert upload.request_body is not None and upload.request_body.size == 14_000  # the bytes, logged
    assert "upload_id=fake-upload-1" in upload.target_url
    for rec in (start, upload):
        apply_cost(rec)
        assert rec.status == 200 and rec.cost_usd == 0  # an upload generates nothing
        no_key(rec)


async def test_query_key_never_recorded(upstream: int, tmp_path: Path) -> None:
    q = MemoryQueue()
    s = settings_for(upstream, tmp_path, gemini_base_url=f"http://127.0.0.1:{upstream}")
    async with running_gateway(s, q) as (_, gw), aiohttp.ClientSession() as http:
        url = f"{gw}/gemini/v1beta/models/{MODEL}:generateContent?key={KEY}"
        async with http.post(url, json=REQ) as r:
            data: dict[str, Any] = await r.json()
        (rec,) = await records(q, 1)
    assert (
        r.status == 200 and data["candidates"][0]["content"]["parts"][0]["text"] == "echo: hello gemini world"
    )
    assert "key=***" in rec.target_url
    no_key(rec)


def test_fake_process_serves_gemini_and_azure(tmp_path: Path) -> None:
    """`llmtap fake-upstream` (what the process tests run) answers every
    provider, not only the ones defined in its own module."""
    import json
    import urllib.request

    from procs import fake_upstream as fake_process

    with fake_process(tmp_path) as url:
        req = urllib.request.Request(
            f"{url}/v1beta/models/{MODEL}:generateContent",
            data=json.dumps(REQ).encode(),
            headers={"x-goog-api-key": "k", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(req, timeout=20) as r:
            body = json.loads(r.read())
        az = urllib.request.Request(
            f"{url}/openai/deployments/d/chat/completions?api-version=2024-10-21",
            data=json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode(),
            headers={"api-key": "k", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(az, timeout=20) as r:
            az_body = json.loads(r.read())
    assert body["candidates"][0]["content"]["parts"][0]["text"] == "echo: hello gemini world"
    assert az_body["model"] and az_body["choices"][0]["message"]["content"] == "echo: hi"
