"""A local fake OpenAI, Anthropic, Gemini and Azure OpenAI upstream in their exact wire formats.

This module is the entry point (`make_app`, `serve`, `run`; run it with `llmtap fake-upstream`) and
what the providers share: knobs, deterministic reply planning, request recording, transport.
Each provider's handlers live in their own module (`fake_openai`, `fake_anthropic`,
`fake_gemini`), registered by `make_app`.

Why it exists: the gateway has to be proven byte-exact against real provider behaviour
(SSE framing, usage blocks, error bodies, truncated streams, large bodies) without network
access or cost, and the benchmark needs an upstream that is never the bottleneck.  The real
``openai`` / ``anthropic`` SDKs parse everything served here (see tests/test_fake_upstream.py).

Replies are deterministic: the text is ``"echo: " + <last user message>``; token counts are
whitespace word counts (see :func:`expected_usage`, which tests use to check proxied usage).

Test controls are request headers (the gateway forwards them untouched):

=============================  ==================================================================
``x-fake-status: N``           answer HTTP N with the provider's exact error JSON (400/401/403/404/
                               413/429/500/502/503/529); 429 adds ``retry-after`` + rate-limit headers
``x-fake-retry-after: S``      value of ``retry-after`` on a forced 429 (default 7)
``x-fake-delay-ms: N``         sleep N ms before the first response byte (also before errors)
``x-fake-chunk-delay-ms: N``   sleep N ms between stream events (slow stream)
``x-fake-chunks: N``           reply is exactly N words, i.e. N content deltas when streaming
                               (tool calls: N argument fragments)
``x-fake-cut-after: N``        stream: send N SSE events, then close the connection mid-body
                               (no terminating events, no final chunk); non-stream: send N body
                               bytes of a larger Content-Length, then close
``x-fake-stream-error: N``     stream: after N events send the provider's in-stream error event
``x-fake-hold: NAME``          stream: after the first event (``x-fake-hold-after: N``: the first
                               N), hold the rest until ``POST /_fake/release/NAME`` (at most 20 s).
                               Its answer says whether a stream was still holding: a client that
                               got those events before releasing them proves that nothing between
                               buffers the stream, however slow the machine
``x-fake-hold-first: NAME``    hold the answer before its first byte (stream or not) until
                               ``POST /_fake/release/NAME`` (at most 120 s): a test stops the
                               gateway while a request is surely in flight, however slow the machine
``x-fake-response-bytes: N``   pad the reply so a non-stream body is about N bytes
``x-fake-cached-tokens: N``    simulate an N-token cached prompt prefix (OpenAI ``cached_tokens``,
                               Anthropic ``cache_read_input_tokens``)
``x-fake-cache-creation-tokens: N``  Anthropic ``cache_creation_input_tokens`` (5-minute TTL),
                               OpenAI Responses ``cache_write_tokens``
``x-fake-reasoning-tokens: N`` OpenAI reasoning tokens (default: 64 for models named ``o*``, else 0)
``x-fake-web-searches: N``     OpenAI Responses: N ``web_search_call`` output items
``x-fake-cache-1h-tokens: N``  Anthropic cache writes with the 1-hour TTL (``cache_creation``)
``x-fake-delta-usage: full``   Anthropic: ``message_delta.usage`` also carries the input counts
``x-fake-echo-headers: 1``     add ``x-fake-received-headers`` (received header names, in order)
                               and ``x-fake-body-sha256`` (sha256 of the raw request body)
=============================  ==================================================================

Every request (except ``/_fake/*``) is recorded in a ring buffer: ``GET /_fake/requests``
returns it as JSON (bodies base64) plus ``client_aborts`` (streams whose client disconnected early),
``DELETE /_fake/requests`` clears both.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import hashlib
import itertools
import os
import struct
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

import msgspec
from aiohttp import web

__all__ = [
    "expected_usage",
    "make_app",
    "reply_text",
    "run",
    "serve",
]

# ---------------------------------------------------------------------------------------------
# Constants shared by the handlers and expected_usage (tests depend on these numbers).

PROMPT_OVERHEAD: Final = 8  # prompt tokens = words in all message text + this
TOOL_CALL_OVERHEAD: Final = 5  # tool-call output tokens = words in the arguments JSON + this
REASONING_TOKENS: Final = 64  # reported for OpenAI models whose name starts with "o"
DEFAULT_RECORD_LIMIT: Final = 256
SYSTEM_FINGERPRINT: Final = "fp_fake0001"
_PAD_WORD_LEN: Final = 1023
_PAD_WORD: Final = "x" * _PAD_WORD_LEN
_PAD_BODY_OVERHEAD: Final = 600  # rough size of a non-stream body minus its reply text
_TOOL_FRAGMENT: Final = 8  # characters per streamed tool-argument fragment

_ENC = msgspec.json.Encoder()
_DEC = msgspec.json.Decoder()
_RUN_ID = os.urandom(4).hex()
_COUNTER = itertools.count(1)

_JSON_HEADERS: Final = {"Content-Type": "application/json"}
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

JSONDict = dict[str, Any]


def _new_id(prefix: str) -> str:
    """Unique-per-process ids without the cost of uuid4 on the hot path."""
    return f"{prefix}{_RUN_ID}{next(_COUNTER):010d}"


def _pretty(obj: Any) -> bytes:
    """OpenAI pretty-prints non-stream JSON bodies; mimic it so re-serialising proxies are caught."""
    return msgspec.json.format(_ENC.encode(obj), indent=2)


# ---------------------------------------------------------------------------------------------
# Header knobs.


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    raw = headers.get(name)
    if raw is None:
        return None
    try:
        return int(raw.strip())
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Knobs:
    """Header controls that change the reply content (and therefore usage)."""

    chunks: int | None = None
    response_bytes: int | None = None
    cached: int = 0
    cache_creation: int = 0
    cache_1h: int = 0
    reasoning: int | None = None  # overrides the model-name rule (REASONING_TOKENS for "o*")
    web_searches: int = 0  # Responses API: web_search_call output items before the message

    @classmethod
    def parse(cls, headers: Mapping[str, str]) -> _Knobs:
        return cls(
            chunks=_int_header(headers, "x-fake-chunks"),
            response_bytes=_int_header(headers, "x-fake-response-bytes"),
            cached=max(0, _int_header(headers, "x-fake-cached-tokens") or 0),
            cache_creation=max(0, _int_header(headers, "x-fake-cache-creation-tokens") or 0),
            cache_1h=max(0, _int_header(headers, "x-fake-cache-1h-tokens") or 0),
            reasoning=_nonneg(_int_header(headers, "x-fake-reasoning-tokens")),
            web_searches=max(0, _int_header(headers, "x-fake-web-searches") or 0),
        )


def _nonneg(value: int | None) -> int | None:
    return None if value is None else max(0, value)


_NO_KNOBS: Final = _Knobs()


# ---------------------------------------------------------------------------------------------
# Deterministic reply planning (pure; shared by the handlers and expected_usage).


@dataclass(frozen=True, slots=True)
class _Reply:
    words: list[str]  # visible reply words; the text is " ".join(words); empty for a tool call
    tool_name: str | None  # set when the reply is a tool call
    tool_args: str  # the tool input as compact JSON text ("" without a tool call)
    truncated: bool  # cut by max_tokens -> finish_reason "length" / stop_reason "max_tokens"
    prompt_tokens: int  # visible prompt tokens (excludes the simulated cached prefix)
    output_tokens: int  # visible output tokens (excludes reasoning)
    reasoning_tokens: int
    cached_tokens: int
    cache_creation_tokens: int  # all cache writes, 1-hour ones included
    cache_1h_tokens: int

    @property
    def text(self) -> str:
        return " ".join(self.words)


def _count_words(text: str) -> int:
    return len(text.split())


def _openai_content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _anthropic_block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    if block.get("type") == "tool_result":
        return _anthropic_content_text(block.get("content"))
    text = block.get("text")
    return text if isinstance(text, str) else ""


def _anthropic_content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(_anthropic_block_text(b) for b in content)
    return ""


def _limit(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _pad_words(nbytes: int) -> list[str]:
    """Words adding about ``nbytes`` bytes (with separators) to the reply text."""
    if nbytes <= 0:
        return []
    full, rem = divmod(nbytes, _PAD_WORD_LEN + 1)
    out = [_PAD_WORD] * full
    if rem > 1:
        out.append("x" * (rem - 1))
    return out


def _finish(
    source: list[str],
    tool_name: str | None,
    tool_text: str,
    limit: int | None,
    knobs: _Knobs,
    prompt_tokens: int,
    reasoning: int,
) -> _Reply:
    if tool_name is not None:
        args: JSONDict = {"text": tool_text}
        if knobs.response_bytes:
            pad = knobs.response_bytes - len(tool_text) - _PAD_BODY_OVERHEAD
            if pad > 0:
                args["pad"] = "x" * pad
        tool_args = _ENC.encode(args).decode()
        return _Reply(
            words=[],
            tool_name=tool_name,
            tool_args=tool_args,
            truncated=False,
            prompt_tokens=prompt_tokens,
            output_tokens=_count_words(tool_args) + TOOL_CALL_OVERHEAD,
            reasoning_tokens=reasoning,
            cached_tokens=knobs.cached,
            cache_creation_tokens=knobs.cache_creation + knobs.cache_1h,
            cache_1h_tokens=knobs.cache_1h,
        )
    words = source
    if knobs.chunks is not None:
        n = max(0, knobs.chunks)
        words = [w for w, _ in zip(itertools.cycle(source), range(n), strict=False)]
    truncated = limit is not None and len(words) > max(limit, 0)
    if truncated and limit is not None:
        words = words[: max(limit, 0)]
    if knobs.response_bytes:
        words = words + _pad_words(knobs.response_bytes - len(" ".join(words)) - _PAD_BODY_OVERHEAD)
    return _Reply(
        words=words,
        tool_name=None,
        tool_args="",
        truncated=truncated,
        prompt_tokens=prompt_tokens,
        output_tokens=len(words),
        reasoning_tokens=reasoning,
        cached_tokens=knobs.cached,
        cache_creation_tokens=knobs.cache_creation + knobs.cache_1h,
        cache_1h_tokens=knobs.cache_1h,
    )


def _openai_tool_name(req: JSONDict) -> str | None:
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = req.get("tool_choice")
    if choice == "none":
        return None
    if isinstance(choice, dict):
        fn = choice.get("function")
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return str(fn["name"])
    first = tools[0]
    if isinstance(first, dict):
        for key in ("function", "custom"):
            spec = first.get(key)
            if isinstance(spec, dict) and isinstance(spec.get("name"), str):
                return str(spec["name"])
    return "tool"


def _anthropic_tool_name(req: JSONDict) -> str | None:
    tools = req.get("tools")
    if not isinstance(tools, list) or not tools:
        return None
    choice = req.get("tool_choice")
    if isinstance(choice, dict):
        if choice.get("type") == "none":
            return None
        if choice.get("type") == "tool" and isinstance(choice.get("name"), str):
            return str(choice["name"])
    first = tools[0]
    if isinstance(first, dict) and isinstance(first.get("name"), str):
        return str(first["name"])
    return "tool"


def _plan_openai_chat(req: JSONDict, knobs: _Knobs) -> _Reply:
    messages = req.get("messages")
    msgs = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    prompt = PROMPT_OVERHEAD + sum(_count_words(_openai_content_text(m.get("content"))) for m in msgs)
    last = msgs[-1] if msgs else {}
    tool_name: str | None = None
    user_text = ""
    if last.get("role") == "tool":
        source = ["tool", "result:", *_openai_content_text(last.get("content")).split()]
    else:
        for m in reversed(msgs):
            if m.get("role") == "user":
                user_text = _openai_content_text(m.get("content"))
                break
        source = ["echo:", *user_text.split()]
        tool_name = _openai_tool_name(req)
    limit = _limit(req.get("max_completion_tokens"))
    if limit is None:
        limit = _limit(req.get("max_tokens"))
    return _finish(source, tool_name, user_text, limit, knobs, prompt, _reasoning(req, knobs))


def _reasoning(req: JSONDict, knobs: _Knobs) -> int:
    if knobs.reasoning is not None:
        return knobs.reasoning
    model = req.get("model")
    return REASONING_TOKENS if isinstance(model, str) and model.startswith("o") else 0


def _responses_text(content: Any) -> str:
    """Text of a Responses API input message's content: a string or `input_text` parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"]
            for p in content
            if isinstance(p, dict)
            and p.get("type") in ("input_text", "output_text")
            and isinstance(p.get("text"), str)
        )
    return ""


def _plan_openai_responses(req: JSONDict, knobs: _Knobs) -> _Reply:
    """Responses API: `input` is a string (one user message) or a list of input items;
    `instructions` count towards the prompt like a system message."""
    raw = req.get("input")
    items: list[JSONDict] = (
        [{"role": "user", "content": raw}]
        if isinstance(raw, str)
        else [i for i in raw if isinstance(i, dict)]
        if isinstance(raw, list)
        else []
    )
    instructions = req.get("instructions")
    words = _count_words(instructions) if isinstance(instructions, str) else 0
    words += sum(_count_words(_responses_text(i.get("content"))) for i in items)
    user_text = ""
    for item in reversed(items):
        if item.get("role") == "user":
            user_text = _responses_text(item.get("content"))
            break
    source = ["echo:", *user_text.split()]
    limit = _limit(req.get("max_output_tokens"))
    return _finish(source, None, user_text, limit, knobs, PROMPT_OVERHEAD + words, _reasoning(req, knobs))


def _plan_anthropic(req: JSONDict, knobs: _Knobs) -> _Reply:
    messages = req.get("messages")
    msgs = [m for m in messages if isinstance(m, dict)] if isinstance(messages, list) else []
    words = _count_words(_anthropic_content_text(req.get("system")))
    words += sum(_count_words(_anthropic_content_text(m.get("content"))) for m in msgs)
    prompt = PROMPT_OVERHEAD + words
    last = msgs[-1] if msgs else {}
    content = last.get("content")
    tool_results = (
        [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
        if isinstance(content, list)
        else []
    )
    tool_name: str | None = None
    user_text = ""
    if tool_results:
        source = ["tool", "result:", *" ".join(_anthropic_block_text(b) for b in tool_results).split()]
    else:
        for m in reversed(msgs):
            if m.get("role") == "user":
                user_text = _anthropic_content_text(m.get("content"))
                break
        source = ["echo:", *user_text.split()]
        tool_name = _anthropic_tool_name(req)
    return _finish(source, tool_name, user_text, _limit(req.get("max_tokens")), knobs, prompt, 0)


def _openai_usage(r: _Reply) -> JSONDict:
    prompt = r.prompt_tokens + r.cached_tokens
    completion = r.output_tokens + r.reasoning_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": r.cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": r.reasoning_tokens,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _responses_usage(r: _Reply) -> JSONDict:
    """A Responses API `usage`: `input_tokens` counts cache reads and writes too."""
    prompt = r.prompt_tokens + r.cached_tokens + r.cache_creation_tokens
    output = r.output_tokens + r.reasoning_tokens
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": r.cached_tokens,
            "cache_write_tokens": r.cache_creation_tokens,
        },
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": r.reasoning_tokens},
        "total_tokens": prompt + output,
    }


def _anthropic_usage(r: _Reply, output_tokens: int | None = None) -> JSONDict:
    return {
        "input_tokens": r.prompt_tokens,
        "cache_creation_input_tokens": r.cache_creation_tokens,
        "cache_read_input_tokens": r.cached_tokens,
        "cache_creation": {
            "ephemeral_5m_input_tokens": r.cache_creation_tokens - r.cache_1h_tokens,
            "ephemeral_1h_input_tokens": r.cache_1h_tokens,
        },
        "output_tokens": r.output_tokens if output_tokens is None else output_tokens,
        "service_tier": "standard",
    }


def _embedding_inputs(req: JSONDict) -> list[Any]:
    raw = req.get("input")
    if isinstance(raw, str):
        return [raw]
    if isinstance(raw, list):
        if raw and all(isinstance(t, int) for t in raw):
            return [raw]  # a single token array
        return list(raw)
    return []


def _embedding_tokens(item: Any) -> int:
    if isinstance(item, str):
        return _count_words(item)
    if isinstance(item, list):
        return len(item)
    return 0


def _lower_headers(headers: Mapping[str, str] | None) -> Mapping[str, str]:
    return {k.lower(): v for k, v in headers.items()} if headers else {}


def expected_usage(
    provider: str, request_json: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> JSONDict:
    """The exact ``usage`` object the fake sends for this request (tests compare proxied usage to it).

    ``provider`` is ``"openai"`` (chat completions, or embeddings when the body has ``input`` and no
    ``messages``), ``"openai-responses"`` (the Responses API) or ``"anthropic"``.  Pass the
    request headers when they include usage-affecting knobs (``x-fake-cached-tokens``,
    ``x-fake-cache-creation-tokens``, ``x-fake-reasoning-tokens``, ``x-fake-chunks``,
    ``x-fake-response-bytes``).  For OpenAI streams the same object is in the final usage chunk
    (only with ``stream_options.include_usage``); for Anthropic streams ``message_start`` carries
    these counts with ``output_tokens: 1`` and ``message_delta`` the final ``output_tokens``.
    """
    req = dict(request_json)
    knobs = _Knobs.parse(_lower_headers(headers))
    if provider == "openai":
        if "messages" not in req and "input" in req:
            n = sum(_embedding_tokens(i) for i in _embedding_inputs(req))
            return {"prompt_tokens": n, "total_tokens": n}
        return _openai_usage(_plan_openai_chat(req, knobs))
    if provider == "openai-responses":
        return _responses_usage(_plan_openai_responses(req, knobs))
    if provider == "anthropic":
        return _anthropic_usage(_plan_anthropic(req, knobs))
    raise ValueError(f"unknown provider {provider!r}; expected 'openai', 'openai-responses' or 'anthropic'")


def reply_text(
    provider: str, request_json: Mapping[str, Any], headers: Mapping[str, str] | None = None
) -> str:
    """The exact assistant text the fake answers with ("" when it answers with a tool call)."""
    knobs = _Knobs.parse(_lower_headers(headers))
    plans = {"openai": _plan_openai_chat, "openai-responses": _plan_openai_responses}
    return plans.get(provider, _plan_anthropic)(dict(request_json), knobs).text


# ---------------------------------------------------------------------------------------------
# Request recording.


@dataclass(frozen=True, slots=True)
class _Recorded:
    ts: float
    method: str
    raw_path: str
    path: str
    query: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes

    def to_json(self) -> JSONDict:
        return {
            "ts": self.ts,
            "method": self.method,
            "raw_path": self.raw_path,
            "path": self.path,
            "query": self.query,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
            "body_b64": base64.b64encode(self.body).decode(),
            "body_len": len(self.body),
            "body_sha256": hashlib.sha256(self.body).hexdigest(),
        }


class _State:
    """Per-app mutable state: the ring buffer of received requests."""

    def __init__(self, record_limit: int) -> None:
        self.record_limit = record_limit
        self.client_aborts = 0  # streams whose client disconnected before the end
        self.holds: dict[str, asyncio.Event] = {}  # x-fake-hold name -> released
        self.requests: collections.deque[_Recorded] = collections.deque(maxlen=max(record_limit, 1))

    def record(self, request: web.Request, body: bytes) -> None:
        if self.record_limit > 0:
            self.requests.append(
                _Recorded(
                    time.time(),
                    request.method,
                    request.raw_path,
                    request.path,
                    request.query_string,
                    request.raw_headers,
                    body,
                )
            )


STATE: Final = web.AppKey("llmtap_fake_state", _State)


async def _receive(request: web.Request) -> tuple[bytes, float]:
    """Read + record the body, then honour ``x-fake-delay-ms``; returns (body, created time)."""
    body = await request.read()
    request.app[STATE].record(request, body)
    delay = _int_header(request.headers, "x-fake-delay-ms")
    if delay and delay > 0:
        await asyncio.sleep(delay / 1000)
    hold = request.headers.get("x-fake-hold-first", "")
    if hold:
        await _hold(request.app[STATE], hold, most=120.0)
    return body, time.time()


def _decode_json(body: bytes, headers: Mapping[str, str]) -> Any:
    """Parse the (possibly compressed) body; raises ValueError when it is not valid JSON."""
    encoding = headers.get("Content-Encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            body = zlib.decompress(body, 47)  # 47 = auto-detect gzip/zlib header
        except zlib.error as exc:
            raise ValueError(str(exc)) from exc
    elif encoding not in ("", "identity"):
        raise ValueError(f"unsupported content-encoding {encoding}")
    try:
        return _DEC.decode(body)
    except msgspec.DecodeError as exc:
        raise ValueError(str(exc)) from exc


def _echo_headers(request: web.Request, body: bytes, out: dict[str, str]) -> None:
    if request.headers.get("x-fake-echo-headers", "") not in ("", "0"):
        out["x-fake-received-headers"] = ",".join(k.decode("latin-1").lower() for k, _ in request.raw_headers)
        out["x-fake-body-sha256"] = hashlib.sha256(body).hexdigest()


async def _send_json(
    request: web.Request, status: int, body: bytes, headers: dict[str, str]
) -> web.StreamResponse:
    """Send a JSON body, honouring ``x-fake-cut-after`` (truncate after N bytes and drop the line)."""
    cut = _int_header(request.headers, "x-fake-cut-after")
    if cut is None or cut >= len(body):
        return web.Response(status=status, body=body, headers=headers)
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = len(body)
    try:
        await resp.prepare(request)
        await resp.write(body[: max(cut, 0)])
    except ConnectionResetError:
        request.app[STATE].client_aborts += 1
        return resp
    return _cut_connection(request, resp)


HOLD_MAX_S: Final = 20.0


async def _hold(state: _State, name: str, most: float = HOLD_MAX_S) -> None:
    """Wait for `POST /_fake/release/<name>` (or `most` seconds); the name is forgotten after."""
    event = state.holds.setdefault(name, asyncio.Event())
    try:
        async with asyncio.timeout(most):
            await event.wait()
    except TimeoutError:
        pass
    finally:
        state.holds.pop(name, None)


async def fake_release(request: web.Request) -> web.Response:
    """`POST /_fake/release/<name>`: let a held stream go on; says whether one was holding."""
    event = request.app[STATE].holds.get(request.match_info["name"])
    if event is not None:
        event.set()
    return web.json_response({"was_holding": event is not None})


def _cut_connection(request: web.Request, resp: web.StreamResponse) -> web.StreamResponse:
    """Flush what was written and close the socket without ending the body (truncated response)."""
    transport = request.transport
    if transport is not None:
        transport.close()  # close() flushes the write buffer first; abort() would drop it
    resp.force_close()
    return resp


async def _write_events(
    request: web.Request, headers: dict[str, str], events: list[bytes]
) -> web.StreamResponse:
    """Send a 200 SSE response made of ``events``, honouring the chunk-delay / cut-after knobs."""
    resp = web.StreamResponse(status=200, headers=headers)
    delay = _int_header(request.headers, "x-fake-chunk-delay-ms") or 0
    cut = _int_header(request.headers, "x-fake-cut-after")
    hold = request.headers.get("x-fake-hold", "")
    hold_after = max(1, _int_header(request.headers, "x-fake-hold-after") or 1)
    if hold and delay <= 0:
        delay = 1  # event by event, so the first one leaves before the hold
    if cut is not None:
        events = events[: max(cut, 0)]
    try:
        await resp.prepare(request)
        if delay <= 0:
            if events:
                await resp.write(b"".join(events))
        else:
            for i, event in enumerate(events):
                if i:
                    await asyncio.sleep(delay / 1000)
                await resp.write(event)
                if hold and i == hold_after - 1:
                    await _hold(request.app[STATE], hold)
        if cut is not None:
            return _cut_connection(request, resp)
        await resp.write_eof()
    except ConnectionResetError:
        # The client (gateway) went away mid-stream: expected in cancellation tests, so count it
        # for GET /_fake/requests instead of logging a traceback.
        request.app[STATE].client_aborts += 1
    return resp


# ---------------------------------------------------------------------------------------------
# Helpers the provider modules share.


def _rate_limit_headers(request: web.Request, provider: str) -> dict[str, str]:
    retry = request.headers.get("x-fake-retry-after", "7").strip() or "7"
    if provider == "openai":
        return {
            "retry-after": retry,
            "x-ratelimit-limit-requests": "10000",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": f"{retry}s",
            "x-ratelimit-limit-tokens": "200000",
            "x-ratelimit-remaining-tokens": "0",
            "x-ratelimit-reset-tokens": f"{retry}s",
        }
    wait = _int_header(request.headers, "x-fake-retry-after") or 7
    reset = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + wait))
    return {
        "retry-after": retry,
        "anthropic-ratelimit-requests-limit": "4000",
        "anthropic-ratelimit-requests-remaining": "0",
        "anthropic-ratelimit-requests-reset": reset,
        "anthropic-ratelimit-tokens-limit": "400000",
        "anthropic-ratelimit-tokens-remaining": "0",
        "anthropic-ratelimit-tokens-reset": reset,
    }


def _with_stream_error(request: web.Request, events: list[bytes], error_event: bytes) -> list[bytes]:
    after = _int_header(request.headers, "x-fake-stream-error")
    if after is None:
        return events
    return [*events[: max(after, 0)], error_event]


def _fragments(args: str, chunks: int | None = None) -> list[str]:
    size = max(_TOOL_FRAGMENT, -(-len(args) // 256)) if not chunks else max(1, -(-len(args) // chunks))
    return [args[i : i + size] for i in range(0, len(args), size)]


@lru_cache(maxsize=4096)
def _embedding(text: str, dims: int) -> tuple[list[float], str]:
    """A deterministic pseudo-embedding (floats and little-endian float32 base64), cached for speed."""
    seed = zlib.crc32(text.encode()) or 1
    values = [((seed * (i + 1) * 2654435761) % 2001 - 1000) / 1000.0 for i in range(dims)]
    packed = struct.pack(f"<{dims}f", *values)
    floats = list(struct.unpack(f"<{dims}f", packed))  # float32-rounded, so both formats agree
    return floats, base64.b64encode(packed).decode()


# ---------------------------------------------------------------------------------------------
# Introspection + fallbacks.


async def fake_requests(request: web.Request) -> web.Response:
    """``GET``/``DELETE /_fake/requests``: inspect or clear what reached the upstream."""
    state = request.app[STATE]
    if request.method == "DELETE":
        state.requests.clear()
        state.client_aborts = 0
        return web.Response(body=b'{"cleared":true}', headers=_JSON_HEADERS)
    items = [r.to_json() for r in list(state.requests)]
    out = {"requests": items, "client_aborts": state.client_aborts}
    return web.Response(body=_ENC.encode(out), headers=_JSON_HEADERS)


async def fake_health(request: web.Request) -> web.Response:
    """``GET /_fake/health``: readiness probe for fixtures."""
    return web.Response(text="ok")


async def not_found(request: web.Request) -> web.StreamResponse:
    """Any other path: recorded, then the provider's 404 JSON (real APIs never answer HTML)."""
    from llmtap.testing.fake_anthropic import _anthropic_error
    from llmtap.testing.fake_openai import _is_anthropic_request, _openai_error

    await _receive(request)
    if _is_anthropic_request(request):
        return _anthropic_error(404, "Not Found")
    return _openai_error(
        404, f"Invalid URL ({request.method} {request.path})", err_type="invalid_request_error"
    )


def make_app(
    *, record_limit: int = DEFAULT_RECORD_LIMIT, client_max_size: int = 256 * 1024 * 1024
) -> web.Application:
    """Build the fake upstream app; ``record_limit=0`` disables request recording (benchmarks)."""
    app = web.Application(client_max_size=client_max_size)
    app[STATE] = _State(record_limit)
    r = app.router
    # The provider modules build on this one's helpers, so they are imported here, not at the top.
    from llmtap.testing import fake_anthropic, fake_gemini, fake_openai

    openai_chat_completions = fake_openai.openai_chat_completions
    openai_embeddings = fake_openai.openai_embeddings
    list_models = fake_openai.list_models
    azure_chat_completions = fake_openai.azure_chat_completions
    anthropic_messages = fake_anthropic.anthropic_messages
    anthropic_count_tokens = fake_anthropic.anthropic_count_tokens
    r.add_post("/v1/chat/completions", openai_chat_completions)
    r.add_post("/v1/responses", fake_openai.openai_responses)
    r.add_post("/v1/embeddings", openai_embeddings)
    r.add_post("/v1/audio/transcriptions", fake_openai.openai_transcriptions)
    r.add_post("/v1/audio/speech", fake_openai.openai_speech)
    r.add_post("/v1/images/generations", fake_openai.openai_images)
    r.add_get("/v1/models", list_models)
    r.add_post("/v1/messages", anthropic_messages)
    r.add_post("/v1/messages/count_tokens", anthropic_count_tokens)
    fake_gemini.add_routes(r)
    r.add_post("/openai/deployments/{deployment}/chat/completions", azure_chat_completions)
    r.add_post("/openai/v1/chat/completions", azure_chat_completions)
    r.add_route("GET", "/_fake/requests", fake_requests)
    r.add_route("DELETE", "/_fake/requests", fake_requests)
    r.add_get("/_fake/health", fake_health)
    r.add_post("/_fake/release/{name}", fake_release)
    r.add_route("*", "/{tail:.*}", not_found)
    return app


# ---------------------------------------------------------------------------------------------
# Serving.

_RUNNER_KWARGS: Final[dict[str, Any]] = {
    "access_log": None,  # logging every request would dominate the cost under benchmark load
    "auto_decompress": False,  # record request bodies byte-for-byte, even when compressed
    "max_line_size": 65536,
    "max_field_size": 65536,
    "max_headers": 512,
    "shutdown_timeout": 0.5,
}


async def serve(
    app: web.Application | None = None, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, int]:
    """Start serving on the running loop; returns the runner (call ``cleanup()``) and the bound port."""
    runner = web.AppRunner(app if app is not None else make_app(), **_RUNNER_KWARGS)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=4096)
    await site.start()
    return runner, int(runner.addresses[0][1])


def run(host: str = "127.0.0.1", port: int = 9999, *, record_limit: int = DEFAULT_RECORD_LIMIT) -> None:
    """Serve forever (`llmtap fake-upstream`); prints the URL once bound."""

    async def main() -> None:
        runner, bound = await serve(make_app(record_limit=record_limit), host, port)
        print(f"fake upstream listening on http://{host}:{bound}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        import uvloop
    except ImportError:
        loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    else:
        loop_factory = uvloop.new_event_loop
    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(main())
