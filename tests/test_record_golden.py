"""The records the gateway publishes for fixed traffic, compared with the ones committed in
`tests/golden/gateway_records.json` (issue 15: every hot-path change keeps the record identical).

The traffic covers each record-building path: OpenAI chat (plain, stream with the injected usage
chunk stripped, tool call, cut stream, upstream error), the Responses API, embeddings, Anthropic
and Gemini (plain and stream), `Llmtap-*` metadata, masked query strings, cut headers, a gzip
request body and a failed connection. What differs from run to run is blanked before comparing:
the request id, times and latencies, the gateway's name, ports, the fake upstream's generated
ids and timestamps, `Date`. Streams whose message the gateway leaves to the worker
(`llmtap.handlers.streams`) are finished as the worker does, so the records compared are the ones
stored, whichever side built them.

After an intended change of the record: `LLMTAP_UPDATE_GOLDEN=1 pytest tests/test_record_golden.py`,
then review the diff of the JSON file like code.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from llmtap.config import Settings
from llmtap.gateway.app import GatewayService
from llmtap.handlers import streams
from llmtap.providers import Route
from llmtap.record import Body, LogRecord, body_bytes
from llmtap.testing import fake_upstream
from llmtap.testing.fake_upstream import make_app, serve
from llmtap.testing.sinks import ListSink

pytestmark = pytest.mark.timeout(120)

GOLDEN = Path(__file__).parent / "golden" / "gateway_records.json"
#: Fields that differ from run to run by nature.
VOLATILE = (
    "id",
    "started_at",
    "first_byte_at",
    "ended_at",
    "latency_ms",
    "time_to_first_token_ms",
    "gateway",
)
VOLATILE_HEADERS = ("date", "server")


def chat(content: str = "hello golden", **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
ANTHROPIC = {
    "model": "claude-3-5-haiku-latest",
    "max_tokens": 64,
    "messages": [{"role": "user", "content": "hi"}],
}
GEMINI = {"contents": [{"role": "user", "parts": [{"text": "hello gemini"}]}]}

#: name -> (method, path, headers, body). Sent in this order, one at a time.
CASES: dict[str, tuple[str, str, dict[str, str], Any]] = {
    "openai-chat": (
        "POST", "/openai/v1/chat/completions",
        {"Llmtap-User-Id": "u-1", "Llmtap-Session-Id": "s-1", "Llmtap-Property-Feature": "golden",
         "Referer": "https://app.example/p?api_key=sk-q&x=1"},
        chat(),
    ),
    "openai-stream": ("POST", "/openai/v1/chat/completions", {"x-fake-chunks": "5"}, chat(stream=True)),
    "openai-stream-usage-asked": (
        "POST", "/openai/v1/chat/completions", {"x-fake-chunks": "3"},
        chat(stream=True, stream_options={"include_usage": True}),
    ),
    "openai-tool-call": (
        "POST", "/openai/v1/chat/completions", {},
        chat("weather?", tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    ),
    "openai-stream-tool-call": (
        "POST", "/openai/v1/chat/completions", {},
        chat("weather?", stream=True, tools=TOOLS,
             tool_choice={"type": "function", "function": {"name": "get_weather"}}),
    ),
    "openai-stream-cut": (
        "POST", "/openai/v1/chat/completions", {"x-fake-chunks": "6", "x-fake-cut-after": "3"},
        chat(stream=True),
    ),
    "openai-429": ("POST", "/openai/v1/chat/completions", {"x-fake-status": "429"}, chat()),
    "openai-not-json": ("POST", "/openai/v1/chat/completions", {"Content-Type": "text/plain"}, b"not json {"),
    "openai-gzip-request": (
        "POST", "/openai/v1/chat/completions", {"Content-Encoding": "gzip"}, chat("zipped")
    ),
    "openai-big-response": ("POST", "/openai/v1/chat/completions", {"x-fake-response-bytes": "5000"}, chat()),
    "openai-responses": (
        "POST", "/openai/v1/responses", {}, {"model": "gpt-4o-mini", "input": "hello responses"}
    ),
    "openai-responses-stream": (
        "POST", "/openai/v1/responses", {}, {"model": "gpt-4o-mini", "input": "hi", "stream": True}
    ),
    "openai-embeddings": (
        "POST", "/openai/v1/embeddings", {}, {"model": "text-embedding-3-small", "input": "a b"}
    ),
    "openai-cut-headers": (
        "POST", "/openai/v1/chat/completions",
        {"X-Big": "h" * 5000, "Llmtap-Property-" + "n" * 200: "v", "Llmtap-User-Id": "ü" * 300},
        chat(),
    ),
    "anthropic": ("POST", "/anthropic/v1/messages", {}, ANTHROPIC),
    "anthropic-stream": ("POST", "/anthropic/v1/messages", {}, {**ANTHROPIC, "stream": True}),
    "gemini": ("POST", "/gemini/v1beta/models/gemini-2.0-flash:generateContent", {}, GEMINI),
    "gemini-stream": (
        "POST", "/gemini/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse&key=AIza-never", {},
        GEMINI,
    ),
}  # fmt: skip


#: What each provider's fake asks for (credentials are never recorded: the golden file shows it).
AUTH = {
    "openai": {"Authorization": "Bearer sk-golden"},
    "anthropic": {"x-api-key": "sk-ant-golden", "anthropic-version": "2023-06-01"},
    "gemini": {"x-goog-api-key": "AIza-golden"},
}


def _blank(text: str, port: int) -> str:
    text = re.sub(re.escape(fake_upstream._RUN_ID) + r"\d{10}", "<fake-id>", text)
    text = re.sub(r'("(?:created|created_at|completed_at)"\s*:\s*)\d{9,}', r"\1<time>", text)
    return text.replace(f"127.0.0.1:{port}", "127.0.0.1:<port>")


def _body(body: Body | None, port: int) -> Any:
    if body is None:
        return None
    raw = body_bytes(body)
    out = msgspec.to_builtins(body)
    out.pop("data", None)  # compared decoded, below
    out.pop("encoding", None)  # compression is a transport choice (by size), not the record's content
    out["text"] = None if raw is None else _blank(raw.decode("utf-8", "replace"), port)
    return out


def normalized(record: LogRecord, ports: tuple[int, int]) -> dict[str, Any]:
    up, gw = ports
    out: dict[str, Any] = msgspec.to_builtins(record)
    for k in VOLATILE:
        out.pop(k, None)
    for part in ("request_body", "response_body", "response_events"):
        out[part] = _body(getattr(record, part), up)
    for part in ("request_headers", "response_headers"):
        headers = dict(out[part])
        for k in VOLATILE_HEADERS:
            if k in headers:
                headers[k] = "<volatile>"
        out[part] = headers
    text = json.dumps(out, sort_keys=True, ensure_ascii=False)
    text = _blank(text, up).replace(f"127.0.0.1:{gw}", "127.0.0.1:<gateway-port>")
    result: dict[str, Any] = json.loads(text)
    return result


async def test_records_for_fixed_traffic_are_the_committed_ones(tmp_path: Path) -> None:
    runner, up_port = await serve(make_app(record_limit=0))
    base = f"http://127.0.0.1:{up_port}"
    settings = Settings(
        data_dir=tmp_path,
        host="127.0.0.1",
        gateway_port=0,
        openai_base_url=base,
        anthropic_base_url=base,
        gemini_base_url=base,
        publish_linger_ms=1.0,
    )
    sink = ListSink(large_bodies=True)
    service = GatewayService(settings, sinks=[sink])
    await service.start()
    got: dict[str, Any] = {}
    deferred: list[str] = []
    try:
        gw = f"http://127.0.0.1:{service.port}"
        async with aiohttp.ClientSession(
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            auto_decompress=False,
        ) as http:
            for name, (method, path, headers, body) in CASES.items():
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                if headers.get("Content-Encoding") == "gzip":
                    data = gzip.compress(data, mtime=0)
                auth = AUTH[path.split("/")[1]]
                sent = {"Content-Type": "application/json", "User-Agent": "golden/1", **auth, **headers}
                sent["Llmtap-Property-Case"] = name
                async with http.request(method, gw + path, headers=sent, data=data) as resp:
                    try:
                        await resp.read()
                    except aiohttp.ClientPayloadError:
                        pass  # the cut stream arrives cut
            # The failed connection: an upstream nobody listens on.
            routes = service.proxy.routes
            routes["openai"] = Route(routes["openai"].provider, "http://127.0.0.1:9")
            async with http.post(
                gw + "/openai/v1/chat/completions",
                headers={
                    **AUTH["openai"],
                    "Content-Type": "application/json",
                    "Llmtap-Property-Case": "unreachable",
                },
                data=json.dumps(chat()).encode(),
            ) as resp:
                assert resp.status == 502
        await service.publisher.flush()
        for r in sink.records:
            if streams.deferred(r):
                # The worker's first handler finishes what the gateway left to it: the record
                # it stores is the one compared.
                deferred.append(r.properties["case"])
                streams.finish(r, settings.inline_body_bytes)
            got[r.properties["case"]] = normalized(r, (up_port, service.port))
    finally:
        await service.stop()
        await runner.cleanup()

    assert sorted(got) == sorted([*CASES, "unreachable"])
    # Whole streams of every provider leave their message to the worker; cut ones are built whole.
    assert sorted(deferred) == [
        "anthropic-stream",
        "gemini-stream",
        "openai-stream",
        "openai-stream-tool-call",
        "openai-stream-usage-asked",
    ]
    stored = json.dumps(got)
    assert not any(
        secret in stored for secret in ("sk-golden", "sk-ant-golden", "AIza-golden", "sk-q", "AIza-never")
    )
    if os.environ.get("LLMTAP_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(got, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    want = json.loads(GOLDEN.read_text())
    for name in want:
        assert got[name] == want[name], name
    assert sorted(got) == sorted(want)
