"""End to end through real processes and the real SDKs: `llmtap up` in front of the fake upstream.

Every kind of call goes through the gateway with the official `openai` / `anthropic` client and,
for comparison, straight to the fake with the same client: what the SDK gets through llmtap must
be what the upstream sent (ids and timestamps aside, which differ per call). Then the stored
record, read back through the query API, must say exactly what happened: tokens equal to the
fake's `expected_usage`, cost equal to genai-prices' own `calc_price`, the bodies as sent and
received. The module counts every request it sends through the gateway and ends by checking the
store holds exactly that many rows, and that no credential reached any file.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import quote

import anthropic
import openai
import pytest
import zstandard
from anthropic import Anthropic
from genai_prices import Usage as PriceUsage
from genai_prices import calc_price
from openai import OpenAI

from llmtap.testing.fake_upstream import expected_usage, reply_text
from procs import (
    Proc,
    fake_upstream,
    free_port,
    get_record,
    http_json,
    list_records,
    llmtap_env,
    start_llmtap,
    wait_http,
    wait_until,
)

pytestmark = pytest.mark.timeout(120)

OPENAI_KEY = "sk-test-SECRET-openai"
ANTHROPIC_KEY = "sk-ant-SECRET-anthropic"
USER = "user-e2e-7"
SESSION = "session-e2e-42"
PROPERTIES = {"team": "core", "env": "ci"}  # names are lowercased, however the header is spelled
META = {
    "Llmtap-User-Id": USER,
    "Llmtap-Session-Id": SESSION,
    **{f"Llmtap-Property-{k.title()}": v for k, v in PROPERTIES.items()},
}
MARK = "x-e2e-call"  # a per-call header to find the request the fake received
#: What a held stream waits after its first token before the test lets it go on (a floor, not a race).
GAP = 0.35
CHAT_MODEL = "gpt-4o-mini"
CLAUDE = "claude-haiku-4-5"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
CLAUDE_TOOLS = [
    {
        "name": "get_weather",
        "description": "Weather in a city",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]


@dataclass
class Stack:
    gw: str
    api: str
    fake: str
    data_dir: Path
    log: Path
    proc: Proc
    oa: OpenAI
    an: Anthropic
    direct_oa: OpenAI
    direct_an: Anthropic
    sent: int = 0  # requests sent through the gateway: each must become exactly one row
    ids: set[str] = field(default_factory=set)

    def mark(self, **extra: str) -> dict[str, str]:
        """Headers for one gateway call (counted) with a fresh marker."""
        self.sent += 1
        return {MARK: uuid.uuid4().hex, **extra}

    def record(self, request_id: str) -> dict[str, Any]:
        self.ids.add(request_id)
        assert self.proc.alive(), self.proc.output()
        return get_record(self.api, request_id, timeout=20)

    def upstream_request(self, marker: str) -> dict[str, Any]:
        """What the fake received for the call carrying `marker` (exactly one such request)."""
        status, body = http_json("GET", f"{self.fake}/_fake/requests")
        assert status == 200
        hits = [
            r for r in body["requests"] if any(k.lower() == MARK and v == marker for k, v in r["headers"])
        ]
        assert len(hits) == 1, f"{len(hits)} upstream requests carry {marker}"
        return dict(hits[0])


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("e2e-sdk")
    with fake_upstream(tmp) as fake:
        gw_port, api_port = free_port(), free_port()
        env = llmtap_env(
            tmp / "data",
            gateway_port=gw_port,
            server_port=api_port,
            openai_base_url=fake,
            anthropic_base_url=fake,
        )
        proc = start_llmtap("up", env, tmp / "up.log")
        gw, api = f"http://127.0.0.1:{gw_port}", f"http://127.0.0.1:{api_port}"
        try:
            try:
                wait_http(f"{gw}/healthz")
                wait_http(f"{api}/healthz")
            except AssertionError:
                raise AssertionError(proc.output()) from None
            yield Stack(
                gw=gw,
                api=api,
                fake=fake,
                data_dir=tmp / "data",
                log=tmp / "up.log",
                proc=proc,
                oa=OpenAI(
                    base_url=f"{gw}/openai/v1", api_key=OPENAI_KEY, max_retries=0, default_headers=META
                ),
                an=Anthropic(
                    base_url=f"{gw}/anthropic", api_key=ANTHROPIC_KEY, max_retries=0, default_headers=META
                ),
                direct_oa=OpenAI(base_url=f"{fake}/v1", api_key="sk-direct", max_retries=0),
                direct_an=Anthropic(base_url=fake, api_key="sk-ant-direct", max_retries=0),
            )
        finally:
            code = proc.stop()
            out = proc.output()
            assert "Traceback" not in out, out
            assert code == 0, out


# -- comparison helpers ----------------------------------------------------------------------------

_VOLATILE = frozenset({"id", "created", "request_id"})
_VOLATILE_RAW = re.compile(rb'"(id|created|request_id)":("[^"]*"|\d+)')


def norm(obj: Any) -> Any:
    """`obj` with the values that differ per call (ids, timestamps) blanked."""
    if isinstance(obj, dict):
        return {k: ("<v>" if k in _VOLATILE else norm(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [norm(v) for v in obj]
    return obj


def norm_raw(data: bytes) -> bytes:
    return _VOLATILE_RAW.sub(rb'"\1":"<v>"', data)


def record_usage(provider: str, body: dict[str, Any], headers: dict[str, str]) -> dict[str, int | None]:
    """The token fields a record must carry, from the fake's own `expected_usage`.

    Anthropic's counts are disjoint; the record follows OpenAI's convention (prompt includes
    cache reads and writes), see `llmtap.providers.anthropic`.
    """
    u = expected_usage(provider, body, headers)
    if provider == "anthropic":
        read, write = u["cache_read_input_tokens"], u["cache_creation_input_tokens"]
        prompt = u["input_tokens"] + read + write
        return {
            "prompt_tokens": prompt,
            "completion_tokens": u["output_tokens"],
            "total_tokens": prompt + u["output_tokens"],
            "cached_tokens": read,
            "cache_write_tokens": write,
            "reasoning_tokens": None,
        }
    if "completion_tokens" not in u:  # embeddings
        return {"prompt_tokens": u["prompt_tokens"], "total_tokens": u["total_tokens"]}
    return {
        "prompt_tokens": u["prompt_tokens"],
        "completion_tokens": u["completion_tokens"],
        "total_tokens": u["total_tokens"],
        "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
        "reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"],
    }


def expected_cost(provider: str, model: str, tokens: dict[str, int | None]) -> Decimal | None:
    """genai-prices' own price for these tokens, or None for a model it does not know."""
    usage = PriceUsage(
        input_tokens=tokens["prompt_tokens"],
        output_tokens=tokens.get("completion_tokens") or 0,
        cache_read_tokens=tokens.get("cached_tokens") or None,
        cache_write_tokens=tokens.get("cache_write_tokens") or None,
    )
    try:
        return calc_price(usage, model, provider_id=provider).total_price
    except LookupError:
        return None


def check_record(
    rec: dict[str, Any],
    *,
    request_id: str,
    provider: str,
    model: str | None,
    status: int,
    streamed: bool,
    request_body: Any,
    response_body: Any,
    tokens: dict[str, int | None] | None,
    cost_known: bool = True,
    meta: bool = True,
) -> None:
    """Everything a stored record must say about one call."""
    assert rec["id"] == request_id
    assert rec["provider"] == provider
    assert rec["model"] == model
    assert rec["status"] == status
    assert rec["streamed"] is streamed
    assert rec["outcome"] == "completed"
    if meta:
        assert (rec["user_id"], rec["session_id"], rec["properties"]) == (USER, SESSION, PROPERTIES)
    assert rec["request_body"] == request_body
    assert rec["response_body"] == response_body
    assert isinstance(rec["latency_ms"], (int, float)) and rec["latency_ms"] > 0
    ttft = rec["time_to_first_token_ms"]
    assert isinstance(ttft, (int, float)) and 0 < ttft <= rec["latency_ms"], (ttft, rec["latency_ms"])
    if tokens is None:  # an error answered without usage: not billed, so $0 (not "unpriced")
        for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
            assert rec[name] is None, (name, rec[name])
        assert status >= 400 and rec["cost_usd"] == 0 and rec["usage_source"] == "missing"
        return
    for name, want in tokens.items():
        assert rec[name] == want, (name, rec[name], want)
    assert rec["usage_source"] == "provider"
    want_cost = expected_cost(provider, model or "", tokens)
    if cost_known:
        assert want_cost is not None and want_cost > 0, f"genai-prices does not price {model}"
        assert rec["cost_usd"] == pytest.approx(float(want_cost), rel=0, abs=6e-10), (
            rec["cost_usd"],
            want_cost,
        )
    else:
        assert want_cost is None
        assert rec["cost_usd"] is None


def sent_json(raw: Any) -> Any:
    """The JSON body the SDK actually sent for this response."""
    return json.loads(raw.http_request.content)


def received_json(raw: Any) -> Any:
    """The JSON body the SDK received (openai's legacy raw response has `.content`)."""
    return json.loads(raw.content if hasattr(raw, "content") else raw.read())


def upstream_body(stack: Stack, marker: str) -> bytes:
    return base64.b64decode(stack.upstream_request(marker)["body_b64"])


# -- OpenAI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "knobs", "cost_known"),
    [
        (CHAT_MODEL, {"x-fake-cached-tokens": "1024"}, True),  # cached prompt tokens
        ("o4-mini", {}, True),  # the fake reports reasoning tokens for o-models
        ("my-local-model", {}, False),  # not in genai-prices: tokens, but no cost
    ],
)
def test_openai_chat(stack: Stack, model: str, knobs: dict[str, str], cost_known: bool) -> None:
    kw: dict[str, Any] = {
        "model": model,
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "say something about proxies"},
        ],
        "max_tokens": 50,
    }
    h = stack.mark(**knobs)
    raw = stack.oa.chat.completions.with_raw_response.create(**kw, extra_headers=h)
    got = raw.parse()
    direct = stack.direct_oa.chat.completions.create(**kw, extra_headers=knobs)
    assert norm(got.to_dict()) == norm(direct.to_dict())
    assert got.choices[0].message.content == reply_text("openai", kw)
    # byte-exact both ways: the upstream got the SDK's bytes, the SDK got the upstream's
    assert upstream_body(stack, h[MARK]) == raw.http_request.content
    tokens = record_usage("openai", kw, knobs)
    assert got.usage is not None and got.usage.prompt_tokens == tokens["prompt_tokens"]

    rid = raw.headers["llmtap-request-id"]
    assert str(uuid.UUID(rid)) == rid
    check_record(
        stack.record(rid),
        request_id=rid,
        provider="openai",
        model=model,
        status=200,
        streamed=False,
        request_body=sent_json(raw),
        response_body=received_json(raw),
        tokens=tokens,
        cost_known=cost_known,
    )


def test_openai_stream_without_include_usage(stack: Stack) -> None:
    """The gateway asks upstream for usage, strips it from the stream, and still logs tokens."""
    kw: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "stream me five words please"}],
        "stream": True,
    }
    # 1. the raw bytes the SDK reads: identical to a direct call (no usage chunk, no "usage":null)
    h = stack.mark()
    with stack.oa.chat.completions.with_streaming_response.create(**kw, extra_headers=h) as resp:
        rid_raw = resp.headers["llmtap-request-id"]
        sent_raw = sent_json(resp)
        got_raw = b"".join(resp.iter_bytes())
    with stack.direct_oa.chat.completions.with_streaming_response.create(**kw) as resp:
        direct_raw = b"".join(resp.iter_bytes())
    assert b'"usage"' not in got_raw and b'"choices":[]' not in got_raw
    assert norm_raw(got_raw) == norm_raw(direct_raw)
    # ...while upstream was asked for usage
    assert json.loads(upstream_body(stack, h[MARK]))["stream_options"] == {"include_usage": True}

    # 2. the SDK's parsed chunks: equal to a direct call's
    h = stack.mark()
    raw = stack.oa.chat.completions.with_raw_response.create(**kw, extra_headers=h)
    chunks = [c.to_dict() for c in raw.parse()]
    direct = [c.to_dict() for c in stack.direct_oa.chat.completions.create(**kw)]
    assert norm(chunks) == norm(direct)
    assert all(c["choices"] and "usage" not in c for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
    assert text == reply_text("openai", kw)

    tokens = record_usage("openai", kw, {})
    for rid, request_body in ((rid_raw, sent_raw), (raw.headers["llmtap-request-id"], sent_json(raw))):
        rec = stack.record(rid)
        assert rec["request_body"] == request_body  # what the client sent, not our rewrite
        body = rec["response_body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == text
        assert body["choices"][0]["finish_reason"] == "stop"
        check_record(
            rec,
            request_id=rid,
            provider="openai",
            model=CHAT_MODEL,
            status=200,
            streamed=True,
            request_body=request_body,
            response_body=body,
            tokens=tokens,
        )


def test_openai_stream_with_include_usage(stack: Stack) -> None:
    kw: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "count my tokens while streaming"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    knobs = {"x-fake-cached-tokens": "16"}
    h = stack.mark(**knobs)
    raw = stack.oa.chat.completions.with_raw_response.create(**kw, extra_headers=h)
    chunks = [c.to_dict() for c in raw.parse()]
    direct = [c.to_dict() for c in stack.direct_oa.chat.completions.create(**kw, extra_headers=knobs)]
    assert norm(chunks) == norm(direct)
    # the client asked for usage: it gets the usage chunk untouched
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == expected_usage("openai", kw, knobs)
    assert upstream_body(stack, h[MARK]) == raw.http_request.content

    rid = raw.headers["llmtap-request-id"]
    rec = stack.record(rid)
    body = rec["response_body"]
    assert body["choices"][0]["message"]["content"] == reply_text("openai", kw, knobs)
    assert body["usage"] == expected_usage("openai", kw, knobs)
    check_record(
        rec,
        request_id=rid,
        provider="openai",
        model=CHAT_MODEL,
        status=200,
        streamed=True,
        request_body=sent_json(raw),
        response_body=body,
        tokens=record_usage("openai", kw, knobs),
    )


@pytest.mark.parametrize("stream", [False, True])
def test_openai_tool_calls(stack: Stack, stream: bool) -> None:
    kw: dict[str, Any] = {
        "model": CHAT_MODEL,
        "messages": [{"role": "user", "content": "weather in Lisbon and Porto today"}],
        "tools": TOOLS,
        "tool_choice": "auto",
    }
    if stream:
        kw["stream"] = True
    h = stack.mark()
    raw = stack.oa.chat.completions.with_raw_response.create(**kw, extra_headers=h)
    if stream:
        chunks = [c.to_dict() for c in raw.parse()]
        direct = [c.to_dict() for c in stack.direct_oa.chat.completions.create(**kw)]
        assert norm(chunks) == norm(direct)
        frags = [
            tc["function"].get("arguments", "")
            for c in chunks
            for ch in c["choices"]
            for tc in ch["delta"].get("tool_calls", [])
        ]
        assert len(frags) > 2  # really fragmented
        args = "".join(frags)
        call_id = chunks[0]["choices"][0]["delta"]["tool_calls"][0]["id"]
    else:
        got = raw.parse()
        assert norm(got.to_dict()) == norm(stack.direct_oa.chat.completions.create(**kw).to_dict())
        calls = got.choices[0].message.tool_calls
        assert calls is not None and len(calls) == 1
        args = calls[0].function.arguments
        call_id = calls[0].id
    assert json.loads(args) == {"text": "weather in Lisbon and Porto today"}

    rid = raw.headers["llmtap-request-id"]
    rec = stack.record(rid)
    body = rec["response_body"]
    msg = body["choices"][0]["message"]
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    assert msg["tool_calls"] == [
        {"id": call_id, "type": "function", "function": {"name": "get_weather", "arguments": args}}
    ]
    check_record(
        rec,
        request_id=rid,
        provider="openai",
        model=CHAT_MODEL,
        status=200,
        streamed=stream,
        request_body=sent_json(raw),
        response_body=body if stream else received_json(raw),
        tokens=record_usage("openai", kw, {}),
    )


def test_non_ascii_ids_and_properties_travel_from_the_sdks_percent_encoded(stack: Stack) -> None:
    """The SDKs refuse header values that are not ASCII (`UnicodeEncodeError`), so a user named
    José or a property in Japanese could not be set at all (unicode check): an RFC 8187
    ext-value (`UTF-8''` and percent-encoded UTF-8) is decoded; anything else is kept as sent."""
    user, session, feature = "José Müller", "セッション-1", "검색 🔎"
    h = stack.mark(
        **{
            "Llmtap-User-Id": "UTF-8''" + quote(user),
            "Llmtap-Session-Id": "utf-8''" + quote(session),
            "Llmtap-Property-Feature": "UTF-8''" + quote(feature),
            "Llmtap-Property-Literal": "100%25 sure",  # no prefix: as sent
            "Llmtap-Property-Broken": "UTF-8''%ff%fe",  # not UTF-8: as sent
        }
    )
    raw = stack.oa.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "hi"}], extra_headers=h
    )
    rec = stack.record(raw.headers["llmtap-request-id"])
    assert (rec["user_id"], rec["session_id"]) == (user, session)
    assert rec["properties"]["feature"] == feature
    assert rec["properties"]["literal"] == "100%25 sure"
    assert rec["properties"]["broken"] == "UTF-8''%ff%fe"
    assert [r["id"] for r in list_records(stack.api, user_id=user)] == [rec["id"]]


def test_openai_embeddings(stack: Stack) -> None:
    kw: dict[str, Any] = {"model": "text-embedding-3-small", "input": ["the quick brown fox", "jumps"]}
    h = stack.mark()
    raw = stack.oa.embeddings.with_raw_response.create(**kw, extra_headers=h)
    got = raw.parse()
    direct = stack.direct_oa.embeddings.create(**kw)
    assert [d.embedding for d in got.data] == [d.embedding for d in direct.data]
    assert len(got.data) == 2 and len(got.data[0].embedding) == 1536
    assert got.usage.prompt_tokens == 5
    sent = sent_json(raw)
    assert sent["encoding_format"] == "base64"  # the SDK's own choice, passed through
    assert upstream_body(stack, h[MARK]) == raw.http_request.content

    rid = raw.headers["llmtap-request-id"]
    rec = stack.record(rid)
    assert rec["completion_tokens"] in (None, 0)
    check_record(
        rec,
        request_id=rid,
        provider="openai",
        model="text-embedding-3-small",
        status=200,
        streamed=False,
        request_body=sent,
        response_body=received_json(raw),
        tokens=record_usage("openai", sent, {}),
    )


def _audio_or_image(stack: Stack, kind: str, stream: bool) -> tuple[Any, list[Any]]:
    """One transcription, image or speech call through the gateway: the raw answer and, for a
    stream, its events as the SDK parsed them."""
    h = stack.mark()
    extra: dict[str, Any] = {"extra_headers": h}
    if kind == "transcription":
        raw = stack.oa.audio.transcriptions.with_raw_response.create(
            model="gpt-4o-transcribe", file=("a.wav", bytes(range(256)) * 40), stream=stream, **extra
        )
    elif kind == "image":
        more = {"stream": True, "partial_images": 1} if stream else {}
        raw = stack.oa.images.with_raw_response.generate(
            model="gpt-image-1", prompt="a red cat on a mat", **more, **extra
        )
    else:
        more = {"stream_format": "sse"} if stream else {}
        raw = stack.oa.audio.speech.with_raw_response.create(
            model="gpt-4o-mini-tts", voice="alloy", input="hello there friend", **more, **extra
        )
    if not stream:
        return raw, []
    events = (
        list(raw.parse())
        if kind != "speech"
        else [json.loads(line[6:]) for line in raw.text.split("\n") if line.startswith("data: ")]
    )
    return raw, events


@pytest.mark.parametrize("kind", ["transcription", "image", "speech"])
def test_openai_audio_and_image_streams_keep_their_usage(stack: Stack, kind: str) -> None:
    """A streamed transcription, image or speech carries its usage in its last event (not in
    a chat chunk): it was recorded with no tokens and no cost, under a made-up empty
    `chat.completion`. Now: the provider's tokens, priced as the same call unstreamed, and
    the events themselves as the response."""
    raw, events = _audio_or_image(stack, kind, stream=True)
    last = events[-1]
    usage = last.get("usage") if isinstance(last, dict) else last.usage.model_dump()
    assert usage and usage["total_tokens"] > 0, last
    rec = stack.record(raw.headers["llmtap-request-id"])
    assert rec["streamed"] is True and rec["outcome"] == "completed", rec
    assert rec["usage_source"] == "provider"
    assert (rec["prompt_tokens"], rec["completion_tokens"], rec["total_tokens"]) == (
        usage["input_tokens"], usage["output_tokens"], usage["total_tokens"],
    )  # fmt: skip
    assert rec["cost_usd"] and rec["cost_usd"] > 0, rec["cost_usd"]
    body = rec["response_body"]  # the events as sent, every one
    assert isinstance(body, str), body
    sent = [json.loads(line[6:]) for line in body.split("\n") if line.startswith("data: ")]
    assert [e["type"] for e in sent] == [e["type"] if isinstance(e, dict) else e.type for e in events]
    if kind == "transcription":
        assert rec["input_audio_tokens"] == usage["input_token_details"]["audio_tokens"]
    if kind != "speech":  # speech unstreamed is bytes alone, no usage: nothing to compare with
        twin, _ = _audio_or_image(stack, kind, stream=False)
        plain = stack.record(twin.headers["llmtap-request-id"])
        assert plain["usage_source"] == "provider" and plain["total_tokens"] == rec["total_tokens"]
        assert plain["cost_usd"] == rec["cost_usd"]
    if kind == "transcription":  # its text is found like the same call's unstreamed
        status, found = http_json("GET", f"{stack.api}/api/v1/requests?q=the%20fake%20transcript&limit=100")
        assert status == 200 and rec["id"] in [r["id"] for r in found["items"]], found


# -- Anthropic -------------------------------------------------------------------------------------


def test_the_end_user_an_sdk_names_in_the_body_is_the_user_when_no_header_says_one(stack: Stack) -> None:
    """Apps already tell the provider who asks (OpenAI's `user` or `safety_identifier`,
    Anthropic's `metadata.user_id`): without `Llmtap-User-Id` that is the record's user, on
    chat, streams, embeddings and messages alike; the header wins where both are sent."""
    oa = OpenAI(base_url=f"{stack.gw}/openai/v1", api_key=OPENAI_KEY, max_retries=0)
    an = Anthropic(base_url=f"{stack.gw}/anthropic", api_key=ANTHROPIC_KEY, max_retries=0)
    msgs: list[Any] = [{"role": "user", "content": "who am i"}]

    def chat(**kw: Any) -> Any:
        return oa.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=msgs, extra_headers=stack.mark(), **kw
        )

    def streamed(**kw: Any) -> Any:
        raw = chat(stream=True, **kw)
        assert [c for c in raw.parse()]
        return raw

    calls: list[tuple[str | None, Any]] = [
        ("body-user-1", chat(user="body-user-1")),
        ("body-user-2", streamed(user="body-user-2")),
        ("hashed-3", chat(safety_identifier="hashed-3")),
        ("body-user-4", chat(user="body-user-4", safety_identifier="hashed-4")),
        ("José", chat(user="José")),  # the body is UTF-8: no header encoding needed
        (
            "emb-user-5",
            oa.embeddings.with_raw_response.create(
                model="text-embedding-3-small", input="x", user="emb-user-5", extra_headers=stack.mark()
            ),
        ),
        (
            "claude-user-6",
            an.messages.with_raw_response.create(
                model=CLAUDE,
                max_tokens=50,
                messages=msgs,
                metadata={"user_id": "claude-user-6"},
                extra_headers=stack.mark(),
            ),
        ),
        # The header wins over the body.
        (USER, stack.oa.chat.completions.with_raw_response.create(
            model=CHAT_MODEL, messages=msgs, user="not-this-one", extra_headers=stack.mark()
        )),
        # Nothing named, or nothing that is a name.
        (None, chat()),
        (None, chat(user="")),
        (None, chat(extra_body={"user": 42})),
        (None, an.messages.with_raw_response.create(
            model=CLAUDE, max_tokens=50, messages=msgs, metadata={}, extra_headers=stack.mark()
        )),
    ]  # fmt: skip
    for user, raw in calls:
        rec = stack.record(raw.headers["llmtap-request-id"])
        assert rec["user_id"] == user, (user, rec["request_body"])
    got = {r["id"] for r in list_records(stack.api, user_id="body-user-2")}
    assert got == {calls[1][1].headers["llmtap-request-id"]}


def test_anthropic_messages(stack: Stack) -> None:
    kw: dict[str, Any] = {
        "model": CLAUDE,
        "max_tokens": 100,
        "system": "Answer briefly.",
        "messages": [{"role": "user", "content": "what does a gateway log"}],
    }
    knobs = {"x-fake-cached-tokens": "2048", "x-fake-cache-creation-tokens": "300"}
    h = stack.mark(**knobs)
    raw = stack.an.messages.with_raw_response.create(**kw, extra_headers=h)
    got = raw.parse()
    direct = stack.direct_an.messages.create(**kw, extra_headers=knobs)
    assert norm(got.to_dict()) == norm(direct.to_dict())
    assert got.content[0].text == reply_text("anthropic", kw)
    assert upstream_body(stack, h[MARK]) == raw.http_request.content

    rid = raw.headers["llmtap-request-id"]
    check_record(
        stack.record(rid),
        request_id=rid,
        provider="anthropic",
        model=CLAUDE,
        status=200,
        streamed=False,
        request_body=sent_json(raw),
        response_body=received_json(raw),
        tokens=record_usage("anthropic", kw, knobs),
    )


def _claude_stream(
    client: Anthropic,
    kw: dict[str, Any],
    headers: dict[str, str],
    on_first: Callable[[], None] | None = None,
) -> tuple[Any, ...]:
    """(final message, text as streamed, s to first text, s in all, request id, JSON sent);
    `on_first` runs when the first text arrives."""
    t0 = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    with client.messages.stream(**kw, extra_headers=headers) as stream:
        for text in stream.text_stream:
            if first is None:
                first = time.perf_counter() - t0
                if on_first is not None:
                    on_first()
            parts.append(text)
        final = stream.get_final_message()
        rid = stream.response.headers.get("llmtap-request-id")
        sent = json.loads(stream.response.request.content)
    return final, "".join(parts), first, time.perf_counter() - t0, rid, sent


def test_anthropic_stream_helper(stack: Stack) -> None:
    """`messages.stream`: events reach the SDK as they come (the first text arrives while the
    upstream still holds the rest), and the record's TTFT is before its end."""
    kw: dict[str, Any] = {
        "model": CLAUDE,
        "max_tokens": 200,
        "messages": [{"role": "user", "content": "tell me about streaming"}],
    }
    knobs = {"x-fake-chunks": "6", "x-fake-cached-tokens": "64"}
    hold = uuid.uuid4().hex
    released: dict[str, Any] = {}

    def release() -> None:
        # Not a wait for anything: a gap of at least GAP between the first token and the end,
        # which the record must show however slowly the machine runs.
        time.sleep(GAP)
        status, body = http_json("POST", f"{stack.fake}/_fake/release/{hold}")
        assert status == 200
        released.update(body)

    # held after message_start, content_block_start, ping and the first text delta
    h = stack.mark(**knobs, **{"x-fake-hold": hold, "x-fake-hold-after": "4"})
    final, text, first, total, rid, sent = _claude_stream(stack.an, kw, h, on_first=release)
    d_final, d_text, *_ = _claude_stream(stack.direct_an, kw, knobs)
    assert norm(final.to_dict()) == norm(d_final.to_dict())
    assert text == d_text == reply_text("anthropic", kw, knobs) and len(text.split()) == 6
    # The upstream sent one event and waited: a buffering gateway would have shown the SDK
    # nothing until the hold ran out (20 s), and the release would find nobody holding.
    assert released == {"was_holding": True} and first is not None and total > GAP, (released, first)

    rec = stack.record(rid)
    body = rec["response_body"]
    assert body["content"] == [{"type": "text", "text": text}]
    assert body["stop_reason"] == "end_turn" and body["id"] == final.id
    assert body["usage"] == expected_usage("anthropic", kw, knobs)
    assert rec["latency_ms"] > GAP * 1000
    assert rec["time_to_first_token_ms"] < rec["latency_ms"] - GAP * 1000, rec
    check_record(
        rec,
        request_id=rid,
        provider="anthropic",
        model=CLAUDE,
        status=200,
        streamed=True,
        request_body=sent,
        response_body=body,
        tokens=record_usage("anthropic", kw, knobs),
    )


@pytest.mark.parametrize("stream", [False, True])
def test_anthropic_tool_use(stack: Stack, stream: bool) -> None:
    kw: dict[str, Any] = {
        "model": CLAUDE,
        "max_tokens": 200,
        "tools": CLAUDE_TOOLS,
        "messages": [{"role": "user", "content": "weather in Oslo tonight"}],
    }
    h = stack.mark()
    if stream:
        final, _, _, _, rid, sent = _claude_stream(stack.an, kw, h)
        d_final = _claude_stream(stack.direct_an, kw, {})[0]
        raw_body = None
    else:
        raw = stack.an.messages.with_raw_response.create(**kw, extra_headers=h)
        final, rid, sent = raw.parse(), raw.headers["llmtap-request-id"], sent_json(raw)
        d_final = stack.direct_an.messages.create(**kw)
        raw_body = received_json(raw)
    assert norm(final.to_dict()) == norm(d_final.to_dict())
    block = final.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"text": "weather in Oslo tonight"}
    assert final.stop_reason == "tool_use"

    rec = stack.record(rid)
    body = rec["response_body"]
    assert body["content"] == [
        {"type": "tool_use", "id": block.id, "name": "get_weather", "input": block.input}
    ]
    assert body["stop_reason"] == "tool_use"
    check_record(
        rec,
        request_id=rid,
        provider="anthropic",
        model=CLAUDE,
        status=200,
        streamed=stream,
        request_body=sent,
        response_body=raw_body if raw_body is not None else body,
        tokens=record_usage("anthropic", kw, {}),
    )


# -- errors, both SDKs ----------------------------------------------------------------------------

ERRORS: list[tuple[str, int, type[openai.APIStatusError | anthropic.APIStatusError]]] = [
    ("openai", 400, openai.BadRequestError),
    ("openai", 401, openai.AuthenticationError),
    ("openai", 429, openai.RateLimitError),
    ("openai", 500, openai.InternalServerError),
    ("anthropic", 400, anthropic.BadRequestError),
    ("anthropic", 401, anthropic.AuthenticationError),
    ("anthropic", 429, anthropic.RateLimitError),
    ("anthropic", 500, anthropic.InternalServerError),
    ("anthropic", 529, anthropic.OverloadedError),
]


@pytest.mark.parametrize(("provider", "status", "exc"), ERRORS)
def test_errors(
    stack: Stack, provider: str, status: int, exc: type[openai.APIStatusError | anthropic.APIStatusError]
) -> None:
    """An upstream error reaches the SDK as it would without the gateway (same exception, body
    and rate-limit headers) and is logged with its status and both bodies."""
    messages = [{"role": "user", "content": "fail please"}]
    if provider == "openai":
        model, kw = CHAT_MODEL, {"model": CHAT_MODEL, "messages": messages}
        through, direct = stack.oa.chat.completions.create, stack.direct_oa.chat.completions.create
        remaining = "x-ratelimit-remaining-requests"
    else:
        model, kw = CLAUDE, {"model": CLAUDE, "max_tokens": 10, "messages": messages}
        through, direct = stack.an.messages.create, stack.direct_an.messages.create  # type: ignore[assignment]
        remaining = "anthropic-ratelimit-requests-remaining"
    knobs = {"x-fake-status": str(status)}
    h = stack.mark(**knobs)
    with pytest.raises(exc) as via:
        through(**kw, extra_headers=h)
    with pytest.raises(exc) as without:
        direct(**kw, extra_headers=knobs)
    err = via.value
    assert err.status_code == status
    assert norm(err.body) == norm(without.value.body)
    assert norm_raw(err.response.content) == norm_raw(without.value.response.content)
    if provider == "openai":  # Anthropic's message quotes its per-call request id
        assert err.message == without.value.message
    if status == 429:
        assert err.response.headers["retry-after"] == "7"
        assert err.response.headers[remaining] == "0"

    rid = err.response.headers["llmtap-request-id"]
    check_record(
        stack.record(rid),
        request_id=rid,
        provider=provider,
        model=model,
        status=status,
        streamed=False,
        request_body=json.loads(err.response.request.content),
        response_body=json.loads(err.response.content),
        tokens=None,
    )


# -- headers, ids, odd bodies ----------------------------------------------------------------------


def test_omit_headers_keep_bodies_out_of_the_log(stack: Stack) -> None:
    kw: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "private stuff"}]}
    h = stack.mark(**{"Llmtap-Omit-Request": "true", "Llmtap-Omit-Response": "true"})
    raw = stack.oa.chat.completions.with_raw_response.create(**kw, extra_headers=h)
    assert raw.parse().choices[0].message.content == reply_text("openai", kw)  # the client is unaffected
    rid = raw.headers["llmtap-request-id"]
    check_record(
        stack.record(rid),
        request_id=rid,
        provider="openai",
        model=CHAT_MODEL,
        status=200,
        streamed=False,
        request_body=None,
        response_body=None,
        tokens=record_usage("openai", kw, {}),
    )
    # the Llmtap-* headers are ours: never sent upstream
    up = stack.upstream_request(h[MARK])
    assert not [k for k, _ in up["headers"] if k.lower().startswith("llmtap-")]


def test_client_chosen_request_id_is_logged_once(stack: Stack) -> None:
    rid = str(uuid.uuid4())
    case = uuid.uuid4().hex
    kw: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "same id twice"}]}
    for _ in range(2):
        h = stack.mark(**{"Llmtap-Request-Id": rid, "Llmtap-Property-case": case})
        raw = stack.oa.chat.completions.with_raw_response.create(**kw, extra_headers=h)
        assert raw.headers["llmtap-request-id"] == rid
        raw.parse()
    # a later request on the same (ordered) partition: once it is stored, both above were processed
    h = stack.mark()
    after = stack.oa.chat.completions.with_raw_response.create(**kw, extra_headers=h)
    stack.record(after.headers["llmtap-request-id"])
    rec = stack.record(rid)
    assert rec["properties"] == {**PROPERTIES, "case": case}
    stack.sent -= 1  # two requests, one id: one row
    assert [r["id"] for r in list_records(stack.api, **{"property.case": case})] == [rid]
    status, stats = http_json("GET", f"{stack.api}/api/v1/stats?property.case={case}")
    assert status == 200 and stats["overall"]["count"] == 1


def test_a_stream_that_ends_in_an_error_event_counts_as_an_error(stack: Stack) -> None:
    """A 200 stream the provider ends with an error event (Anthropic's overloaded_error
    mid-answer) failed: the SDK raises, and the record, stats and error rate say so. Its
    provisional counts are not a cost (unpriced, not the placeholder's few cents)."""
    case = uuid.uuid4().hex
    prop = {"Llmtap-Property-case": case}
    ids = []
    with pytest.raises(openai.APIError):
        h = stack.mark(**prop, **{"x-fake-stream-error": "2"})
        for _ in stack.oa.chat.completions.create(
            model=CHAT_MODEL,
            messages=[{"role": "user", "content": "fail midway"}],
            stream=True,
            extra_headers=h,
        ):
            pass
    with pytest.raises(anthropic.APIStatusError):
        h = stack.mark(**prop, **{"x-fake-stream-error": "3"})
        with stack.an.messages.stream(
            model=CLAUDE,
            max_tokens=50,
            messages=[{"role": "user", "content": "fail midway"}],
            extra_headers=h,
        ) as st:
            for _ in st:
                pass
    ok = stack.oa.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "fine"}], extra_headers=stack.mark(**prop)
    )
    ids.append(ok.headers["llmtap-request-id"])
    # one ordered partition (the embedded queue's default key): the last stored, all are
    stack.record(ids[0])
    rows = list_records(stack.api, **{"property.case": case})
    assert len(rows) == 3, rows
    failed = [r for r in rows if r["id"] != ids[0]]
    for r in failed:
        stack.record(r["id"])
        assert r["status"] == 200 and r["outcome"] == "upstream_error" and r["error"], r
        assert r["cost_usd"] is None, r
    claude = next(r for r in failed if r["provider"] == "anthropic")
    assert claude["usage_source"] == "partial" and claude["completion_tokens"] == 1  # the placeholder
    status, stats = http_json("GET", f"{stack.api}/api/v1/stats?property.case={case}")
    assert status == 200
    overall = stats["overall"]
    assert (overall["count"], overall["error_count"], overall["unpriced_count"]) == (3, 2, 2), overall


def test_malformed_json_is_proxied_byte_identical_and_logged(stack: Stack) -> None:
    body = b'{"model": "gpt-4o-mini", '
    h = stack.mark(
        **{
            "Authorization": f"Bearer {OPENAI_KEY}",
            "Content-Type": "application/json",
            **META,
        }
    )
    req = urllib.request.Request(
        f"{stack.gw}/openai/v1/chat/completions", data=body, headers=h, method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=10)
    assert e.value.code == 400
    answer = e.value.read()
    assert b"could not parse the JSON body" in answer
    assert upstream_body(stack, h[MARK]) == body
    rid = e.value.headers["Llmtap-Request-Id"]
    check_record(
        stack.record(rid),
        request_id=rid,
        provider="openai",
        model=None,
        status=400,
        streamed=False,
        request_body=body.decode(),
        response_body=json.loads(answer),
        tokens=None,
    )


def test_property_names_do_not_depend_on_header_spelling(stack: Stack) -> None:
    """HTTP header names are case-insensitive (RFC 9110 §5.1; HTTP/2 lowercases them all), so
    `Llmtap-Property-Team` must name the same property however a client or proxy spells it;
    otherwise `?property.Team=` misses the traffic of one SDK and finds the other's."""
    kw: dict[str, Any] = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": "spelling"}]}
    names = []
    for spelling in ("Llmtap-Property-Team", "llmtap-property-team", "LLMTAP-PROPERTY-TEAM"):
        h = stack.mark(**{spelling: "core"})
        # httpx keeps a header's spelling on the wire (the openai SDK lowercases default_headers only)
        raw = stack.an.messages.with_raw_response.create(
            model=CLAUDE, max_tokens=5, messages=kw["messages"], extra_headers=h
        )
        assert (MARK, h[MARK]) in [(k.lower(), v) for k, v in stack.upstream_request(h[MARK])["headers"]]
        rec = stack.record(raw.headers["llmtap-request-id"])
        names.append(sorted(k for k in rec["properties"] if k.lower() == "team"))
    assert names == [["team"]] * 3, names  # one name, lowercased like HTTP/2 would


# -- last: totals and secrets ----------------------------------------------------------------------


_B64_RUN = re.compile(rb"[A-Za-z0-9+/]{24,}={0,2}")


def _decoded_views(data: bytes) -> Iterator[bytes]:
    """`data`, then what hides inside it: zstd frames, and base64 runs (inline bodies in queue
    messages are base64 in JSON), themselves searched for zstd frames."""
    yield data
    yield from _zstd_frames(data)
    for m in _B64_RUN.finditer(data):
        try:
            blob = base64.b64decode(m.group() + b"=" * (-len(m.group()) % 4))
        except ValueError:
            continue
        yield blob
        yield from _zstd_frames(blob)


def _zstd_frames(data: bytes) -> Iterator[bytes]:
    start = 0
    while (i := data.find(b"\x28\xb5\x2f\xfd", start)) >= 0:
        start = i + 4
        try:
            yield zstandard.ZstdDecompressor().decompressobj().decompress(data[i:])
        except zstandard.ZstdError:
            continue


def test_zz_every_request_stored_once_and_no_secret_on_disk(stack: Stack) -> None:
    """Runs last: the store holds exactly one row per request sent, and no credential anywhere."""
    h = stack.mark()
    raw = stack.oa.chat.completions.with_raw_response.create(
        model=CHAT_MODEL, messages=[{"role": "user", "content": "last one"}], extra_headers=h
    )
    h = stack.mark()
    with stack.an.messages.stream(
        model=CLAUDE, max_tokens=20, messages=[{"role": "user", "content": "bye"}], extra_headers=h
    ) as s:
        s.until_done()
        last = s.response.headers["llmtap-request-id"]
    stack.record(raw.headers["llmtap-request-id"])
    stack.record(last)

    def all_stored() -> bool:
        status, stats = http_json("GET", f"{stack.api}/api/v1/stats")
        return status == 200 and stats["overall"]["count"] >= stack.sent

    wait_until(all_stored, 20, what=f"{stack.sent} records")
    time.sleep(0.3)  # a duplicate, were there one, would have had time to land
    rows = list_records(stack.api)
    ids = [r["id"] for r in rows]
    assert len(ids) == stack.sent, (len(ids), stack.sent)
    assert len(set(ids)) == len(ids)
    assert stack.ids <= set(ids)
    status, stats = http_json("GET", f"{stack.api}/api/v1/stats")
    assert status == 200 and stats["overall"]["count"] == stack.sent

    # every byte the process wrote: data dir (databases, WAL files, body files) and its log
    files = [p for p in stack.data_dir.rglob("*") if p.is_file()] + [stack.log]
    assert any(p.name.endswith("-wal") for p in files), [p.name for p in files]
    needles = [OPENAI_KEY.encode(), ANTHROPIC_KEY.encode(), b"SECRET", b"Bearer"]
    scanned = 0
    seen_header = seen_body = False  # the scan does see headers and (decoded) bodies
    for path in files:
        data = path.read_bytes()
        scanned += len(data)
        for view in _decoded_views(data):
            for needle in needles:
                assert needle not in view, f"{needle!r} found in {path}"
            seen_header = seen_header or b"x-stainless-lang" in view
            seen_body = seen_body or b"last one" in view
    assert scanned > 10_000 and seen_header and seen_body
    # ... and none of it readable by another user (the deploy audit: store.db, its WAL and the
    # body files were 0644 / 0640 under the default umask 022)
    shared = [(str(p), oct(p.stat().st_mode & 0o777)) for p in [stack.data_dir, *stack.data_dir.rglob("*")]
              if p.stat().st_mode & 0o077]  # fmt: skip
    assert not shared, shared
