"""Whole streams: the gateway reads their usage from the first and last events and the worker
rebuilds the message (`llmtap.handlers.streams`). The record stored must be the one the gateway
built whole before (issue 15: the record stays identical), for well-formed streams and for every
odd one a provider or a broken connection produces; odd ones the shortcut must not take.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest

from llmtap.bodies.file import FileBodyStore
from llmtap.config import Settings
from llmtap.gateway.capture import Capture, RecordBuilder
from llmtap.handlers import streams
from llmtap.handlers.base import Item
from llmtap.handlers.chain import build_chain, process_records
from llmtap.providers.anthropic import Anthropic
from llmtap.providers.common import dumps
from llmtap.providers.gemini import Gemini
from llmtap.providers.openai import OpenAI
from llmtap.record import LogRecord, Outcome, body_bytes
from llmtap.store.sqlite import SQLiteStore

INLINE = 64 * 1024
DONE = b"data: [DONE]\n\n"


def chunk(content: str | None = None, *, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    delta: dict[str, Any] = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": None}],
        **extra,
    }


def usage_chunk(prompt: int = 9, completion: int = 5, **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "gpt-4o-mini",
        "choices": [],
        "usage": {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        },
        **extra,
    }


def sse(*events: dict[str, Any] | bytes, done: bool = True) -> bytes:
    out = b"".join(e if isinstance(e, bytes) else b"data: " + orjson.dumps(e) + b"\n\n" for e in events)
    return out + (DONE if done else b"")


def capture(
    stream: bytes,
    *,
    request: dict[str, Any] | None = None,
    provider: str = "openai",
    path: str = "/v1/chat/completions",
    pieces: list[int] | None = None,
    encoding: str | None = None,
    outcome: Outcome = "completed",
    error: str | None = None,
    llmtap: list[tuple[str, str]] | None = None,
    max_bytes: int = 4 * 1024 * 1024,
) -> Capture:
    body = orjson.dumps(request if request is not None else {"model": "gpt-4o-mini", "stream": True})
    now = 1000.0  # fixed clocks: the two builds of one capture must agree to the microsecond
    cap = Capture(
        "00000000-0000-7000-8000-000000000001",
        "default",
        provider,
        "POST",
        path,
        "https://api.example" + path,
        [("Content-Type", "application/json")],
        llmtap,
        body,
        len(body),
        1_780_000_000.0,
        now,
        max_bytes,
    )
    cap.status = 200
    headers = [("Content-Type", "text/event-stream")]
    if encoding == "gzip":
        stream = gzip.compress(stream, mtime=0)
        headers.append(("Content-Encoding", "gzip"))
    cap.response_headers = headers
    cap.streamed = True
    cap.t_headers = cap.t_first = now + 0.001
    at = 0
    for size in pieces or [len(stream)]:
        cap.add(stream[at : at + size])
        at += size
    if at < len(stream):
        cap.add(stream[at:])
    cap.t_end = now + 0.002
    cap.outcome = outcome
    cap.error = error
    return cap


def both(cap_args: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[LogRecord, LogRecord, bool]:
    """(stored record with the shortcut, record built whole, whether the shortcut was taken)."""
    builder = RecordBuilder(inline_body_bytes=INLINE, gateway="gw")
    fast = builder.build(capture(**cap_args))
    took = streams.deferred(fast)
    if took:
        streams.finish(fast, INLINE)
    with monkeypatch.context() as m:
        for cls in (OpenAI, Anthropic, Gemini):
            m.setattr(cls, "stream_summary", lambda self, raw: None)
        slow = builder.build(capture(**cap_args))
    assert not streams.deferred(slow)
    return fast, slow, took


def same(a: LogRecord, b: LogRecord) -> None:
    da, db = msgspec.to_builtins(a), msgspec.to_builtins(b)
    for part in ("request_body", "response_body", "response_events"):
        for d, r in ((da, a), (db, b)):
            body = getattr(r, part)
            if d.get(part) is not None:
                d[part].pop("data", None)
                d[part]["bytes"] = body_bytes(body)
    assert da == db


TOOL = {
    "index": 0,
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": ""},
}

CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "plain": ({"stream": sse(chunk(""), chunk("Hello"), chunk(" world"), usage_chunk())}, True),
    "network pieces": (
        {"stream": sse(chunk(""), chunk("Hi"), usage_chunk()), "pieces": [3, 17, 40, 1]},
        True,
    ),
    "gzip": ({"stream": sse(chunk("a"), chunk("b"), usage_chunk()), "encoding": "gzip"}, True),
    "tool call": (
        {
            "stream": sse(
                chunk(None, choices=[{"index": 0, "delta": {"tool_calls": [TOOL]}, "finish_reason": None}]),
                chunk(
                    None,
                    choices=[
                        {
                            "index": 0,
                            "delta": {"tool_calls": [{"index": 0, "function": {"arguments": '{"c":1}'}}]},
                            "finish_reason": "tool_calls",
                        }
                    ],
                ),
                usage_chunk(),
            )
        },
        True,
    ),
    "two choices, refusal": (
        {
            "stream": sse(
                chunk(
                    None,
                    choices=[
                        {"index": 0, "delta": {"refusal": "no"}},
                        {"index": 1, "delta": {"content": "x"}},
                    ],
                ),
                usage_chunk(),
            )
        },
        True,
    ),
    "service tier": (
        {"stream": sse(chunk("a", service_tier="flex"), usage_chunk(service_tier="flex"))},
        True,
    ),
    "client left after DONE": (
        {"stream": sse(chunk("a"), usage_chunk()), "outcome": "client_disconnected", "error": "client gone"},
        True,
    ),
    "named upstream": ({"stream": sse(chunk("a"), usage_chunk()), "provider": "groq"}, True),
    # ... and what the shortcut must leave to the gateway's full reassembly:
    # the model then comes from the message, which only the reassembly knows
    "no model in request": ({"stream": sse(chunk("a"), usage_chunk()), "request": {"stream": True}}, False),
    "azure": ({"stream": sse(chunk("a"), usage_chunk()), "provider": "azure"}, False),
    "azure filter chunk first": (
        {"stream": sse(chunk(None, model="", choices=[]), chunk("a"), usage_chunk()), "provider": "azure"},
        False,
    ),
    "no usage chunk": ({"stream": sse(chunk("a"), chunk("b"))}, False),
    "usage not last": ({"stream": sse(chunk("a"), usage_chunk(), chunk("b"))}, False),
    "cut, no DONE": (
        {"stream": sse(chunk("a"), usage_chunk(), done=False), "outcome": "upstream_error"},
        False,
    ),
    "error event last": ({"stream": sse(chunk("a"), {"error": {"message": "overloaded"}})}, False),
    "CRLF framing": ({"stream": sse(chunk("a"), usage_chunk()).replace(b"\n", b"\r\n")}, False),
    "comment first": ({"stream": b": keep-alive\n\n" + sse(chunk("a"), usage_chunk())}, False),
    "responses API": (
        {
            "stream": sse(
                {
                    "type": "response.completed",
                    "response": {"model": "gpt-4o-mini", "usage": {"input_tokens": 1}},
                }
            )
        },
        False,
    ),
    "omitted response": (
        {"stream": sse(chunk("a"), usage_chunk()), "llmtap": [("Llmtap-Omit-Response", "true")]},
        False,
    ),
    "cut at max bytes": (
        {"stream": sse(*(chunk("word ") for _ in range(50)), usage_chunk()), "max_bytes": 500},
        False,
    ),
    "above the inline limit": (
        {"stream": sse(*(chunk("w" * 1000) for _ in range(70)), usage_chunk())},
        False,
    ),
    # Odd events in the middle: the shortcut reads only the ends, the worker's reassembly settles it.
    "error event in the middle": (
        {"stream": sse(chunk("a"), {"error": {"message": "hiccup"}}, usage_chunk())},
        True,
    ),
    "garbage in the middle": ({"stream": sse(chunk("a"), b"data: {not json\n\n", usage_chunk())}, True),
    "odd field type in the middle": (
        {"stream": sse(chunk("a"), chunk(None, choices="x"), chunk("b"), usage_chunk())},
        True,
    ),
}


def test_gateway_record_carries_usage_and_events_not_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """What travels on the queue for a plain stream: tokens, model, outcome, the events."""
    stream = sse(chunk(""), chunk("Hello"), usage_chunk(12, 3))
    rec = RecordBuilder(inline_body_bytes=INLINE, gateway="gw").build(capture(stream))
    assert rec.response_body is None and rec.response_events is not None
    assert body_bytes(rec.response_events) == stream
    assert (rec.usage.source, rec.usage.prompt_tokens, rec.usage.completion_tokens) == ("provider", 12, 3)
    assert rec.model == "gpt-4o-mini" and rec.outcome == "completed"


def _random_stream(rnd: random.Random) -> dict[str, Any]:
    """A plain stream with random odd events in the middle, random framing of the ends."""
    events: list[dict[str, Any] | bytes] = [
        chunk(rnd.choice(["", "a", None]), model=rnd.choice(["m1", "m1", ""]))
    ]
    odd: list[dict[str, Any] | bytes] = [
        {"error": {"message": "hiccup"}},
        b"data: {cut\n\n",
        b": comment\n\n",
        b"event: x\ndata: {}\n\n",
        chunk(None, choices="x"),
        usage_chunk(1, 1),
        {"type": "response.completed", "response": {"model": "r"}},
        chunk("y", model="other"),
        chunk(None, choices=[{"index": 2, "delta": {"content": "z"}, "finish_reason": "stop"}]),
    ]
    for _ in range(rnd.randrange(0, 8)):
        events.append(rnd.choice(odd) if rnd.random() < 0.3 else chunk(rnd.choice(["x", " y", "ü"])))
    if rnd.random() < 0.8:
        events.append(
            usage_chunk(rnd.randrange(100), rnd.randrange(100), service_tier=rnd.choice(["flex", None]))
        )
    return {
        "stream": sse(*events, done=rnd.random() < 0.85),
        "outcome": rnd.choice(["completed", "completed", "client_disconnected", "upstream_error"]),
        "error": rnd.choice([None, None, "broke"]),
        "provider": rnd.choice(["openai", "azure", "vllm"]),
        "request": rnd.choice([{"model": "asked", "stream": True}, {"stream": True}]),
        "encoding": rnd.choice([None, None, "gzip"]),
    }


def test_random_streams_store_the_same_record(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(1504)
    took = 0
    for _ in range(400):
        args = _random_stream(rnd)
        fast, slow, shortcut = both(args, monkeypatch)
        took += shortcut
        same(fast, slow)
    assert 50 < took < 350  # both paths were exercised (74 with this seed)


async def test_handler_finishes_deferred_streams_and_leaves_the_rest() -> None:
    builder = RecordBuilder(inline_body_bytes=INLINE, gateway="gw")
    deferred = builder.build(capture(sse(chunk("a"), usage_chunk())))
    whole = builder.build(capture(sse(chunk("a"), chunk("b"))))  # no usage chunk: built whole
    before = msgspec.to_builtins(whole)
    items = [Item(deferred), Item(whole)]
    await streams.StreamHandler(INLINE).handle(items)
    assert all(i.ok for i in items)
    assert orjson.loads(body_bytes(deferred.response_body))["choices"][0]["message"]["content"] == "a"  # type: ignore[arg-type]
    assert msgspec.to_builtins(whole) == before
    # A redelivered record is finished already: handling it again changes nothing (idempotent).
    again = msgspec.to_builtins(deferred)
    await streams.StreamHandler(INLINE).handle([Item(deferred)])
    assert msgspec.to_builtins(deferred) == again


# -- Anthropic and Gemini ---------------------------------------------------------------------------


def anthropic_event(kind: str, **data: Any) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps({"type": kind, **data}) + b"\n\n"


def anthropic_stream(*middle: bytes, stop: bool = True, out_tokens: int = 7) -> bytes:
    start = anthropic_event(
        "message_start",
        message={
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "model": "claude-x",
            "content": [],
            "usage": {"input_tokens": 11, "cache_read_input_tokens": 4, "output_tokens": 1},
        },
    )
    body = [
        anthropic_event("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        *middle,
        anthropic_event("content_block_stop", index=0),
        anthropic_event(
            "message_delta", delta={"stop_reason": "end_turn"}, usage={"output_tokens": out_tokens}
        ),
    ]
    return start + b"".join(body) + (anthropic_event("message_stop") if stop else b"")


def text(t: str) -> bytes:
    return anthropic_event("content_block_delta", index=0, delta={"type": "text_delta", "text": t})


GEMINI_PATH = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"


def gemini_chunk(t: str, *, finish: bool = False, usage: bool = False) -> bytes:
    cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": t}]}, "index": 0}
    if finish:
        cand["finishReason"] = "STOP"
    obj: dict[str, Any] = {"candidates": [cand], "modelVersion": "gemini-2.0-flash-001"}
    if usage:
        obj["usageMetadata"] = {"promptTokenCount": 5, "candidatesTokenCount": 3, "totalTokenCount": 8}
    return b"data: " + orjson.dumps(obj) + b"\r\n\r\n"


ANTHROPIC = {
    "provider": "anthropic",
    "path": "/v1/messages",
    "request": {"model": "claude-x", "stream": True},
}
GEMINI = {"provider": "gemini", "path": GEMINI_PATH, "request": {"contents": []}}

MORE_CASES: dict[str, tuple[dict[str, Any], bool]] = {
    "anthropic": ({**ANTHROPIC, "stream": anthropic_stream(text("Hel"), text("lo"))}, True),
    "anthropic, a ping and an error between": (
        {
            **ANTHROPIC,
            "stream": anthropic_stream(
                text("a"), anthropic_event("ping"), anthropic_event("error", error={"message": "overloaded"})
            ),
        },
        True,
    ),
    "anthropic, two message_deltas": (
        {
            **ANTHROPIC,
            "stream": anthropic_stream(
                text("a"),
                anthropic_event("message_delta", delta={}, usage={"input_tokens": 99, "output_tokens": 3}),
            ),
        },
        True,
    ),
    "anthropic, cut before message_stop": (
        {**ANTHROPIC, "stream": anthropic_stream(text("a"), stop=False)},
        False,
    ),
    "anthropic, ping last": (
        {**ANTHROPIC, "stream": anthropic_stream(text("a")) + anthropic_event("ping")},
        False,
    ),
    "anthropic, no model in request": (
        {**ANTHROPIC, "request": {"stream": True}, "stream": anthropic_stream(text("a"))},
        False,
    ),
    "gemini": ({**GEMINI, "stream": gemini_chunk("Hel") + gemini_chunk("lo", finish=True, usage=True)}, True),
    "gemini, LF framing": (
        {
            **GEMINI,
            "stream": (gemini_chunk("a") + gemini_chunk("b", finish=True, usage=True)).replace(b"\r", b""),
        },
        True,
    ),
    "gemini, one chunk": ({**GEMINI, "stream": gemini_chunk("a", finish=True, usage=True)}, True),
    "gemini, usage on every chunk": (
        {**GEMINI, "stream": gemini_chunk("a", usage=True) + gemini_chunk("b", finish=True, usage=True)},
        True,
    ),
    "gemini, error between": (
        {
            **GEMINI,
            "stream": gemini_chunk("a")
            + b'data: {"error": {"message": "x"}}\r\n\r\n'
            + gemini_chunk("b", finish=True, usage=True),
        },
        True,
    ),
    "gemini, no finish": ({**GEMINI, "stream": gemini_chunk("a") + gemini_chunk("b", usage=True)}, False),
    "gemini, cut": (
        {**GEMINI, "stream": gemini_chunk("a") + gemini_chunk("b", finish=True, usage=True)[:-3]},
        False,
    ),
    "gemini, no model in path": (
        {
            **GEMINI,
            "path": "/v1beta/models:streamGenerateContent",
            "stream": gemini_chunk("a", finish=True, usage=True),
        },
        False,
    ),
}


@pytest.mark.parametrize("name", [*CASES, *MORE_CASES])
def test_stored_record_is_the_one_built_whole(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    args, shortcut = {**CASES, **MORE_CASES}[name]
    fast, slow, took = both(args, monkeypatch)
    assert took is shortcut
    same(fast, slow)
    if shortcut:
        assert fast.response_body is not None and fast.response_body.content_type == "application/json"


def test_random_anthropic_and_gemini_streams_store_the_same_record(monkeypatch: pytest.MonkeyPatch) -> None:
    rnd = random.Random(2026)
    odd_a = [
        anthropic_event("ping"),
        anthropic_event("error", error={"message": "e"}),
        b"event: message_delta\ndata: {cut\n\n",
        anthropic_event("message_delta", delta={"stop_reason": "max_tokens"}, usage={"output_tokens": 2}),
        anthropic_event("message_stop"),
        b": comment\n\n",
    ]
    odd_g = [
        b'data: {"error": {"message": "x"}}\r\n\r\n',
        b"data: {cut\r\n\r\n",
        gemini_chunk("u", usage=True),
        gemini_chunk("f", finish=True),
        b": keep-alive\r\n\r\n",
    ]
    took = 0
    for n in range(300):
        if n % 2:
            middle = [
                rnd.choice(odd_a) if rnd.random() < 0.3 else text(rnd.choice("xyü"))
                for _ in range(rnd.randrange(6))
            ]
            stream = anthropic_stream(*middle, stop=rnd.random() < 0.85, out_tokens=rnd.randrange(50))
            if rnd.random() < 0.1:
                stream += rnd.choice(odd_a)
            args = {**ANTHROPIC, "stream": stream}
        else:
            parts = [
                rnd.choice(odd_g) if rnd.random() < 0.3 else gemini_chunk(rnd.choice("xyü"))
                for _ in range(rnd.randrange(6))
            ]
            parts.append(gemini_chunk("end", finish=rnd.random() < 0.85, usage=rnd.random() < 0.85))
            args = {**GEMINI, "stream": b"".join(parts)}
        args["outcome"] = rnd.choice(["completed", "client_disconnected", "upstream_error"])
        args["encoding"] = rnd.choice([None, None, "gzip"])
        fast, slow, shortcut = both(args, monkeypatch)
        took += shortcut
        same(fast, slow)
    assert 50 < took < 250  # both paths were exercised


async def test_a_message_that_cannot_be_rebuilt_is_stored_as_the_gateway_sent_it(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A reassembly bug costs the record its message, never its log (nor its neighbours')."""
    builder = RecordBuilder(inline_body_bytes=INLINE, gateway="gw")
    broken = builder.build(capture(sse(chunk("secret words"), usage_chunk(12, 3))))
    fine = builder.build(capture(anthropic_stream(text("a")), **ANTHROPIC))
    assert streams.deferred(broken) and streams.deferred(fine)
    sent = msgspec.to_builtins(broken)

    def boom(self: OpenAI, raw: bytes) -> None:
        raise RuntimeError("reassembly bug near secret words")

    monkeypatch.setattr(OpenAI, "reassemble_stream", boom)
    items = [Item(broken), Item(fine)]
    await streams.StreamHandler(INLINE).handle(items)
    assert all(i.ok for i in items)
    assert msgspec.to_builtins(broken) == sent  # untouched: usage from the ends, the events
    assert broken.usage.prompt_tokens == 12 and body_bytes(broken.response_events)  # type: ignore[arg-type]
    assert fine.response_body is not None  # the other provider's stream was finished
    assert "RuntimeError" in caplog.text and "secret" not in caplog.text


async def test_worker_chain_stores_every_stream_even_one_it_cannot_rebuild(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The standard chain on a real SQLite store and file bodies: 40 deferred streams, one of
    which makes the reassembly raise. All 40 rows are stored; 39 with their rebuilt message."""
    builder = RecordBuilder(inline_body_bytes=INLINE, gateway="gw")
    records = []
    for i in range(40):
        cap = capture(sse(chunk("boom" if i == 7 else f"answer {i}"), usage_chunk(10 + i, 3)))
        cap.id = f"00000000-0000-7000-8000-{i:012d}"
        records.append(builder.build(cap))
    assert all(streams.deferred(r) for r in records)
    real = OpenAI.reassemble_stream

    def flaky(self: OpenAI, raw: bytes) -> Any:
        if b'"boom"' in raw:
            raise RuntimeError("reassembly bug")
        return real(self, raw)

    monkeypatch.setattr(OpenAI, "reassemble_stream", flaky)
    store = SQLiteStore(str(tmp_path / "store.db"))
    bodies = FileBodyStore(str(tmp_path / "bodies"))
    await store.connect()
    await bodies.connect()
    try:
        chain = build_chain(Settings(data_dir=tmp_path), store, bodies)
        await chain.start()
        items = await process_records(chain, records)
        await chain.close()
        assert all(i.ok for i in items)
        rows = [await store.get_request("default", r.id) for r in records]
        assert all(row is not None for row in rows)  # 40 in, 40 stored
        rebuilt = [row for row in rows if row is not None and row["response_body"] is not None]
        assert len(rebuilt) == 39
        broken = rows[7]
        assert broken is not None and broken["response_body"] is None
        assert broken["response_events"] is not None and broken["prompt_tokens"] == 17
    finally:
        await bodies.close()
        await store.close()


@pytest.mark.parametrize(
    ("odd", "text"),
    [
        # JSON.parse gives the client both halves, and joined they are the emoji again
        pytest.param(
            (b"a \\ud83d", b"\\ude00 b"), "a \U0001f600 b!", id="surrogate-pair-split-over-two-events"
        ),
        pytest.param((b"a \xff\xfe", b" b"), "a \ufffd\ufffd b!", id="bytes-that-are-not-utf-8"),
        pytest.param((b"a \\ud83d", b" b"), "a \ufffd b!", id="a-lone-surrogate"),
    ],
)
def test_a_stream_event_only_a_lenient_parser_reads_keeps_the_message(
    odd: tuple[bytes, bytes], text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """msgspec refuses a lone surrogate escape and raises UnicodeDecodeError on a bad byte: the
    event was skipped as cut off (the answer's text lost from the message) or the whole
    reassembly failed (no message at all), where the client's own parser reads both (unicode
    check). Now read as the client does, U+FFFD for what cannot be text."""
    first, second = (
        b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini",'
        b'"choices":[{"index":0,"delta":{"content":"' + text + b'"},"finish_reason":null}]}\n\n'
        for text in odd
    )
    stream = sse(chunk("", role="assistant"), first, second, chunk("!"), usage_chunk())
    fast, slow, _ = both({"stream": stream}, monkeypatch)
    same(fast, slow)
    for rec in (fast, slow):
        assert rec.usage.prompt_tokens == 9 and rec.usage.completion_tokens == 5
        assert rec.model == "gpt-4o-mini" and rec.usage.source == "provider"
        message = orjson.loads(body_bytes(rec.response_body))["choices"][0]["message"]
        assert message["content"] == text


def test_a_json_answer_only_a_lenient_parser_reads_keeps_its_usage_and_model() -> None:
    """orjson refuses a lone surrogate escape: the answer's usage and model were lost (unpriced)."""
    answer = (
        b'{"id":"c","object":"chat.completion","created":1,"model":"gpt-4o-mini-2024-07-18",'
        b'"choices":[{"index":0,"message":{"role":"assistant","content":"lone \\ud83d split"},'
        b'"finish_reason":"stop"}],"usage":{"prompt_tokens":11,"completion_tokens":7,"total_tokens":18}}'
    )
    for body in (answer, answer.replace(b"\\ud83d", b"\xff")):
        cap = capture(
            body, request={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "\\ud800"}]}
        )
        cap.streamed = False
        cap.response_headers = [("Content-Type", "application/json")]
        rec = RecordBuilder(inline_body_bytes=INLINE, gateway="gw").build(cap)
        assert rec.model == "gpt-4o-mini"  # (the built-in route's: the model asked for)
        assert (rec.usage.source, rec.usage.prompt_tokens, rec.usage.completion_tokens) == ("provider", 11, 7)
        assert body_bytes(rec.response_body) == body  # stored as it came


@pytest.mark.parametrize(
    "encode",
    [
        pytest.param(lambda b: b"\xef\xbb\xbf" + b, id="utf-8-with-a-byte-order-mark"),
        pytest.param(lambda b: b.decode().encode("utf-16"), id="utf-16"),
    ],
)
def test_a_json_request_with_a_bom_or_in_utf_16_names_its_model(encode: Any) -> None:
    """Python's json (RFC 8259 §8.1) reads both; orjson refused them: no model, no price."""
    request = encode(b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}')
    cap = capture(b'{"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}')
    cap.streamed = False
    cap.response_headers = [("Content-Type", "application/json")]
    cap.request_body, cap.request_size = request, len(request)
    rec = RecordBuilder(inline_body_bytes=INLINE, gateway="gw").build(cap)
    assert rec.model == "gpt-4o-mini"
    assert body_bytes(rec.request_body) == request  # stored as it came


@pytest.mark.parametrize("step", ["stream_summary", "reassemble_stream"])
def test_a_provider_that_fails_on_a_stream_costs_its_message_only(
    monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """A provider's bug on an odd stream (rev29: a `delta.audio` list raised out of the OpenAI
    rebuild): before, the publisher published the record bare, with no bodies, tokens or model.
    Now the stream is stored as it came and the rest of the record is whole."""

    def boom(self: Any, data: bytes) -> Any:
        raise TypeError("sequence item 1: expected str instance, int found")

    if step == "reassemble_stream":  # what a stream the gateway does not leave to the worker takes
        monkeypatch.setattr(OpenAI, "stream_summary", lambda self, data: None)
    monkeypatch.setattr(OpenAI, step, boom)
    stream = sse(chunk(""), chunk("Hello"), usage_chunk(12, 3))
    builder = RecordBuilder(inline_body_bytes=INLINE, gateway="gw")
    rec = builder.build(capture(stream))
    assert builder.rebuild_errors == 1 and builder.rebuild_error == "TypeError"
    assert rec.outcome == "completed" and rec.error is None and rec.model == "gpt-4o-mini"
    assert rec.request_body is not None and rec.response_body is not None
    assert body_bytes(rec.response_body) == stream
    # its tokens too, from the last usage its end holds: before, none (stop 56)
    u = rec.usage
    assert (u.source, u.prompt_tokens, u.completion_tokens) == ("partial", 12, 3)


def test_a_message_nested_too_deep_for_json_costs_its_message_only() -> None:
    """rev30c: a tool's input nested ~1000 levels parses but will not serialize: `dumps`
    raised RecursionError outside the rebuild's guard and the whole record was published bare.
    Now it is a ValueError, inside the guard: the stream is stored as it came."""
    deep = b"[" * 1000 + b"]" * 1000
    with pytest.raises(ValueError):
        dumps(orjson.loads(deep))
    start = {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "input": {}}}
    delta = {"type": "input_json_delta", "partial_json": deep.decode()}
    stream = b"".join(
        b"event: %s\ndata: %s\n\n" % (str(e["type"]).encode(), orjson.dumps(e))
        for e in (
            {"type": "message_start", "message": {"id": "m", "model": "claude-sonnet-4-5"}},
            start,
            {"type": "content_block_delta", "index": 0, "delta": delta},
        )
    )
    builder = RecordBuilder(inline_body_bytes=INLINE, gateway="gw")
    cap = capture(stream, provider="anthropic", path="/v1/messages", request={"model": "claude-sonnet-4-5"})
    rec = builder.build(cap)
    assert builder.rebuild_errors == 1 and builder.rebuild_error == "ValueError"
    assert rec.request_body is not None and rec.response_body is not None
    assert body_bytes(rec.response_body) == stream and rec.model == "claude-sonnet-4-5"


def test_a_message_too_deep_for_json_keeps_the_streams_usage() -> None:
    """rev31: the message's encoding failing took the rebuild's usage and outcome with it."""
    deep = "[" * 1000 + "]" * 1000
    events = (
        {
            "type": "message_start",
            "message": {"id": "m", "model": "claude-sonnet-4-5", "usage": {"input_tokens": 12}},
        },
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "input": {}}},
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": deep},
        },
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}},
        {"type": "message_stop"},
    )
    stream = b"".join(b"event: %s\ndata: %s\n\n" % (str(e["type"]).encode(), orjson.dumps(e)) for e in events)
    builder = RecordBuilder(inline_body_bytes=INLINE, gateway="gw")
    rec = builder.build(capture(stream, provider="anthropic", path="/v1/messages", request={"stream": True}))
    assert builder.rebuild_errors == 1 and builder.rebuild_error == "ValueError"
    assert (rec.usage.source, rec.usage.prompt_tokens, rec.usage.completion_tokens) == ("provider", 12, 7)
    assert rec.outcome == "completed" and rec.response_body is not None and rec.response_events is None
    assert body_bytes(rec.response_body) == stream and rec.model == "claude-sonnet-4-5"


def _responses_stream(whole: bool, usage: Any, cut_in_end: bool = False, crlf: bool = False) -> bytes:
    nl = "\r\n" if crlf else "\n"
    pending = {"id": "r1", "object": "response", "model": "gpt-4.1", "status": "in_progress", "output": []}
    text = "word " * 40_000
    part = {"type": "output_text", "text": text, "annotations": []}
    done = {"output": [{"type": "message", "content": [part]}], "usage": usage, "user": None, "metadata": {}}
    events = [
        {"type": "response.created", "response": {**pending, "usage": None}},
        {"type": "response.output_text.delta", "output_index": 0, "delta": text},
    ]
    if whole:
        events.append({"type": "response.completed", "response": {**pending, "status": "completed", **done}})
    else:
        events.append(events[1])
    body = "".join(f"event: {e['type']}{nl}data: {orjson.dumps(e).decode()}{nl}{nl}" for e in events).encode()
    return body[: body.rfind(b'"user"') + 5] if cut_in_end else body


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("framing", ["chunked", "close", "gzip"])
def test_a_responses_stream_past_the_size_limit_is_whole_or_cut_as_it_ended(framing: str, crlf: bool) -> None:
    """Past `max_body_bytes` a Responses stream's end event (as long as the output it repeats)
    begins before the kept end: its end tells (rev32: whole ones were `upstream_cut`; rev33: cut
    chunked ones `completed`; rev34: whole ones whose usage is null were `upstream_cut`, and so
    were close-delimited ones and gzipped ones cut only once decoded, and one cut inside its end
    event after its usage was `completed`)."""
    usage = {"input_tokens": 11, "output_tokens": 40_000, "total_tokens": 40_011}
    cases = [
        (_responses_stream(True, usage, crlf=crlf), "completed"),
        (_responses_stream(True, None, crlf=crlf), "completed"),
        (_responses_stream(False, usage, crlf=crlf), "upstream_cut"),
        (_responses_stream(True, usage, cut_in_end=True, crlf=crlf), "upstream_cut"),
    ]
    for stream, expected in cases:
        raw = gzip.compress(stream) if framing == "gzip" else stream
        cap = capture(
            raw,
            request={"model": "gpt-4.1", "input": "hi", "stream": True},
            path="/v1/responses",
            max_bytes=300_000,
            encoding="gzip" if framing == "gzip" else None,
            pieces=[4096] * (len(raw) // 4096 + 1),
        )
        if framing != "close":
            cap.response_headers.append(("Transfer-Encoding", "chunked"))
        rec = RecordBuilder(inline_body_bytes=INLINE, gateway="gw").build(cap)
        if framing == "gzip":  # cut once decoded, its end unread: its chunks' end decides
            expected = "completed"
        elif framing == "close" and expected == "completed":
            assert bool(cap.tail) and rec.usage.source in ("provider", "missing")
        assert rec.outcome == expected, (framing, expected, len(stream))
