"""OpenTelemetry export through the real chain to an OTLP/HTTP receiver in the test that decodes
the protobuf with `opentelemetry-proto`: GenAI attributes per provider, the client's trace as
parent, content only when opted in, and a collector that is down never holding back storing."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from llmtap.bodies.file import FileBodyStore
from llmtap.config import Settings, load_settings
from llmtap.errors import ConfigError
from llmtap.handlers import otel
from llmtap.handlers.base import Item
from llmtap.handlers.chain import build_chain
from llmtap.record import Body, Usage
from llmtap.store.base import StatsQuery
from llmtap.store.sqlite import SQLiteStore
from test_webhooks import free_port, wait_for
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(180)

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"


class Collector:
    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.port = free_port()
        self._runner: web.AppRunner | None = None

    async def traces(self, request: web.Request) -> web.Response:
        req = ExportTraceServiceRequest()
        req.ParseFromString(await request.read())
        for rs in req.resource_spans:
            for ss in rs.scope_spans:
                self.spans.extend(ss.spans)
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self.traces)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def attrs(span: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in span.attributes:
        v = kv.value
        kind = v.WhichOneof("value")
        if kind == "array_value":
            out[kv.key] = [x.string_value for x in v.array_value.values]
        else:
            out[kv.key] = getattr(v, kind)
    return out


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / "store.db")
    await s.connect()
    yield s
    await s.close()


@pytest.fixture
async def bodies(tmp_path: Path) -> AsyncIterator[FileBodyStore]:
    b = FileBodyStore(str(tmp_path / "bodies"))
    await b.connect()
    yield b
    await b.close()


def json_body(obj: Any) -> Body:
    raw = orjson.dumps(obj)
    return Body(content_type="application/json", size=len(raw), data=raw)


def openai_record() -> Any:
    return make_record(
        1, session_id="sess-1", user_id="u-1", properties={"feature": "chat"},
        request_headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"},
        request_body=json_body({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}),
        response_body=json_body({"id": "chatcmpl-9", "model": "gpt-4o-mini-2024-07-18", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "hi there"}}]}),
        usage=Usage(source="provider", prompt_tokens=11, completion_tokens=3, total_tokens=14,
                    cached_tokens=4, reasoning_tokens=2),
    )  # fmt: skip


def anthropic_record() -> Any:
    return make_record(
        2, provider="anthropic", path="/v1/messages", model="claude-sonnet-4-5",
        target_url="https://api.anthropic.com/v1/messages",
        request_body=json_body({"model": "claude-sonnet-4-5", "system": "be brief",
                                "messages": [{"role": "user", "content": "hello"}]}),
        response_body=json_body({"id": "msg_01", "model": "claude-sonnet-4-5-20250929",
                                 "stop_reason": "end_turn", "content": [{"type": "text", "text": "hi"}]}),
        usage=Usage(source="provider", prompt_tokens=20, completion_tokens=5, total_tokens=25,
                    cached_tokens=10, cache_write_tokens=7),
    )  # fmt: skip


def otel_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, content: bool) -> None:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "2")
    if content:
        monkeypatch.setenv("LLMTAP_OTLP_CONTENT", "true")
    else:
        monkeypatch.delenv("LLMTAP_OTLP_CONTENT", raising=False)


@pytest.mark.parametrize("content", [False, True], ids=["metadata", "content"])
async def test_stored_records_become_genai_spans(
    monkeypatch: pytest.MonkeyPatch, store: SQLiteStore, bodies: FileBodyStore, content: bool
) -> None:
    col = Collector()
    await col.start()
    otel_env(monkeypatch, f"http://127.0.0.1:{col.port}", content)
    chain = build_chain(Settings(), store, bodies)
    assert [h.name for h in chain.handlers] == ["streams", "otel-capture", "bodies", "cost", "store", "otel"]
    await chain.start()
    try:
        oa, an = openai_record(), anthropic_record()
        await chain.run([Item(oa), Item(an)])
        assert await store.get_request("acme", oa.id) is not None
        await wait_for(lambda: len(col.spans) == 2, what="two spans at the collector")
    finally:
        await chain.close()
        await col.stop()
    by_name = {s.name: s for s in col.spans}
    assert set(by_name) == {"chat gpt-4o-mini", "chat claude-sonnet-4-5"}

    s = by_name["chat gpt-4o-mini"]
    a = attrs(s)
    assert s.trace_id.hex() == TRACE_ID and s.parent_span_id.hex() == PARENT_ID
    assert s.start_time_unix_nano == int(oa.started_at.timestamp() * 1e6) * 1000
    assert s.end_time_unix_nano == int(oa.ended_at.timestamp() * 1e6) * 1000
    assert a["gen_ai.operation.name"] == "chat" and a["gen_ai.provider.name"] == "openai"
    assert a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.response.model"] == "gpt-4o-mini-2024-07-18"
    assert a["gen_ai.response.id"] == "chatcmpl-9" and a["gen_ai.response.finish_reasons"] == ["stop"]
    assert (a["gen_ai.usage.input_tokens"], a["gen_ai.usage.output_tokens"]) == (11, 3)
    assert a["gen_ai.usage.cache_read.input_tokens"] == 4 and a["gen_ai.usage.reasoning.output_tokens"] == 2
    assert a["gen_ai.conversation.id"] == "sess-1" and a["llmtap.user_id"] == "u-1"
    assert a["llmtap.property.feature"] == "chat" and a["llmtap.cost_usd"] > 0
    assert "error.type" not in a

    s = by_name["chat claude-sonnet-4-5"]
    b = attrs(s)
    assert len(s.parent_span_id) == 0  # no traceparent: a root span
    assert b["gen_ai.provider.name"] == "anthropic" and b["gen_ai.response.id"] == "msg_01"
    assert b["gen_ai.response.model"] == "claude-sonnet-4-5-20250929"
    assert b["gen_ai.usage.cache_creation.input_tokens"] == 7
    assert b["gen_ai.response.finish_reasons"] == ["end_turn"]

    content_keys = {"gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.system_instructions"}
    if not content:
        assert not content_keys & (set(a) | set(b))
    else:
        assert orjson.loads(a["gen_ai.input.messages"]) == [
            {"role": "user", "parts": [{"type": "text", "content": "hello"}]}
        ]
        assert orjson.loads(a["gen_ai.output.messages"])[0]["parts"][0]["content"] == "hi there"
        assert orjson.loads(b["gen_ai.system_instructions"]) == [{"type": "text", "content": "be brief"}]
        assert orjson.loads(b["gen_ai.output.messages"])[0]["parts"][0]["content"] == "hi"


async def test_error_records_carry_error_type(
    monkeypatch: pytest.MonkeyPatch, store: SQLiteStore, bodies: FileBodyStore
) -> None:
    col = Collector()
    await col.start()
    otel_env(monkeypatch, f"http://127.0.0.1:{col.port}", False)
    chain = build_chain(Settings(), store, bodies)
    await chain.start()
    try:
        await chain.run([Item(make_record(3, status=429, response_body=None))])
        await wait_for(lambda: len(col.spans) == 1, what="the error span")
    finally:
        await chain.close()
        await col.stop()
    assert attrs(col.spans[0])["error.type"] == "429"
    assert col.spans[0].status.code == 2  # STATUS_CODE_ERROR


async def test_collector_down_never_holds_back_storing(
    monkeypatch: pytest.MonkeyPatch, store: SQLiteStore, bodies: FileBodyStore
) -> None:
    otel_env(monkeypatch, f"http://127.0.0.1:{free_port()}", False)  # nothing listens there
    chain = build_chain(Settings(), store, bodies)
    await chain.start()
    recs = [make_record(i) for i in range(2000)]
    t0 = time.monotonic()
    for i in range(0, 2000, 200):
        await chain.run([Item(r) for r in recs[i : i + 200]])
    elapsed = time.monotonic() - t0
    await chain.close()  # bounded even though the collector never answers
    for r in recs[::97]:
        assert await store.get_request("acme", r.id) is not None
    totals = await store.stats("acme", StatsQuery())
    assert totals["overall"]["count"] == 2000
    print(f"\n2000 records through the chain with the collector down: {elapsed:.2f}s")


def test_the_config_file_sets_the_otel_keys_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The contract: a TOML file may set the same keys as the environment, the OpenTelemetry
    SDK's `OTEL_*` included (it reads them from the environment, which still wins); a value
    of `LLMTAP_OTLP_CONTENT` that is no boolean stops start-up instead of meaning false."""
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_HEADERS", "LLMTAP_OTLP_CONTENT"):
        monkeypatch.setenv(name, "")  # so that the test's end restores what was there before
        monkeypatch.delenv(name)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "from=env")
    config = tmp_path / "llmtap.toml"
    config.write_text(
        'OTEL_EXPORTER_OTLP_ENDPOINT = "http://collector:4318"\n'
        'otel_exporter_otlp_headers = "from=file"\n'
        "LLMTAP_OTLP_CONTENT = true\n"
    )
    settings = load_settings(config)
    assert settings.otlp_content is True
    assert os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://collector:4318"
    assert os.environ["OTEL_EXPORTER_OTLP_HEADERS"] == "from=env"
    assert otel.enabled()
    chain = build_chain(settings, None, None)  # type: ignore[arg-type]
    capture = next(h for h in chain.handlers if isinstance(h, otel.OtelCapture))
    assert capture.content is True
    monkeypatch.setenv("LLMTAP_OTLP_CONTENT", "ture")
    with pytest.raises(ConfigError, match=r"^invalid setting LLMTAP_OTLP_CONTENT"):
        load_settings()


def test_gemini_and_other_routes_follow_the_conventions_names() -> None:
    """An outside check: Gemini spans were named `gemini-2.0-flash:generateContent <model>` (one
    name per model), with provider `gemini` and no response id, model or finish reasons."""
    answer = {"responseId": "r-1", "modelVersion": "gemini-2.0-flash-001",
              "candidates": [{"finishReason": "STOP", "content": {"parts": [{"text": "hi"}]}}]}  # fmt: skip
    path = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
    gem = make_record(
        3, provider="gemini", path=path, model="gemini-2.0-flash", response_body=json_body(answer)
    )
    a = otel.attributes(gem, otel.facts(gem, False))
    assert a["gen_ai.operation.name"] == "generate_content" and a["gen_ai.provider.name"] == "gcp.gemini"
    assert (a["gen_ai.response.id"], a["gen_ai.response.model"]) == ("r-1", "gemini-2.0-flash-001")
    assert a["gen_ai.response.finish_reasons"] == ["STOP"]
    assert otel.operation("/v1beta/models/text-embedding-004:batchEmbedContents") == "embeddings"
    assert otel.operation("/v1beta/models/gemini-2.5-flash:countTokens") == "countTokens"
    assert otel.operation("/openai/deployments/d1/chat/completions") == "chat"
    for route, name in (
        ("azure", "azure.ai.openai"),
        ("groq", "groq"),
        ("mistral", "mistral_ai"),
        ("openai", "openai"),
    ):
        r = make_record(4, provider=route)
        assert otel.attributes(r, {})["gen_ai.provider.name"] == name


def test_message_content_in_spans_has_its_credentials_masked() -> None:
    """`LLMTAP_OTLP_CONTENT=true` exported messages as sent; webhook payloads mask credentials."""
    secret = "sk-proj-" + "A1b2C3d4" * 6
    rec = make_record(
        5, request_body=json_body({"model": "gpt-4o-mini", "messages": [
            {"role": "user", "content": f"my key is {secret}, and \"api_key\": \"hunter2hunter2\""}]}),
    )  # fmt: skip
    notes = otel.facts(rec, True)
    assert secret not in notes["input"] and "hunter2hunter2" not in notes["input"]
    assert "my key is" in notes["input"]


def test_long_content_is_cut_before_it_is_redacted(monkeypatch: pytest.MonkeyPatch) -> None:
    """rev26: a 1.2 MB prompt was redacted whole, then cut to 16 KiB: 1.2 s of `llmtap up`'s
    event loop per span. Only the cap and the margin are read, a key across the cut is masked."""
    from llmtap.redact import REDACT_MARGIN

    read: list[int] = []
    real = otel.redact_body
    monkeypatch.setattr(otel, "redact_body", lambda text: read.append(len(text)) or real(text))
    secret = "sk-proj-" + "A1b2C3d4" * 6
    prompt = "x" * (otel.CONTENT_CAP - 60) + f" {secret} " + "hello world " * 100_000
    rec = make_record(
        6, request_body=json_body({"model": "m", "messages": [{"role": "user", "content": prompt}]})
    )
    notes = otel.facts(rec, True)
    assert read and max(read) <= otel.CONTENT_CAP + REDACT_MARGIN
    assert len(notes["input"]) == otel.CONTENT_CAP + 1 and notes["input"].endswith("…")
    assert secret[:12] not in notes["input"] and "***" in notes["input"]
    short = make_record(
        7, request_body=json_body({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
    )
    assert not otel.facts(short, True)["input"].endswith("…")
