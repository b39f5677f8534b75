"""OpenAI wire format: usage, stream reassembly, and the stream-usage request rewrite.

Covers chat completions, legacy text completions, embeddings and the Responses API. Everything
here except `inject_stream_usage` and `UsageChunkStripper` runs off the latency path, on bytes
the gateway already relayed.

Why the rewrite: OpenAI reports usage on a stream only when the request says
`stream_options.include_usage`. Without usage the log has no tokens and no cost, so (setting
`openai_stream_usage`) the gateway asks for it and removes what that adds from what the client
receives: the final usage-only chunk (`"choices":[]` with `usage`) and the `"usage":null` member
OpenAI then puts on every other chunk. The client gets the bytes it would have got without us.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import msgspec
import orjson

from llmtap.limits import MAX_BILLED_USD, MAX_TOKENS
from llmtap.providers.base import Provider, StreamFilter, response_model, text_member
from llmtap.providers.common import after_last_reply, error_message, loads, role_is, scrub_stream, token_count
from llmtap.providers.sse import StreamResult, data_payloads, event_bounds, last_boundary
from llmtap.record import Usage

if TYPE_CHECKING:
    from llmtap.config import Settings

__all__ = [
    "OpenAI",
    "OpenAICompatible",
    "UsageChunkStripper",
    "inject_stream_usage",
    "parse_usage",
    "reassemble_stream",
    "usage_from_body",
]


def parse_usage(u: Any) -> Usage:
    """An OpenAI `usage` object (chat, completions, embeddings or Responses API) as a `Usage`.

    `total_tokens` is the provider's; when absent it is prompt + completion (both reported).
    """
    if not isinstance(u, dict):
        return Usage()
    if u.get("type") == "duration":  # whisper-1 bills its audio by the second
        seconds = u.get("seconds")
        if isinstance(seconds, int | float) and not isinstance(seconds, bool) and 0 <= seconds <= MAX_TOKENS:
            return Usage(source="provider", audio_seconds=math.ceil(seconds))
        return Usage()  # NaN, negative, absurd: unknown
    if "prompt_tokens" in u or "completion_tokens" in u:
        prompt = token_count(u.get("prompt_tokens"))
        completion = token_count(u.get("completion_tokens"))
        details_in = u.get("prompt_tokens_details")
        details_out = u.get("completion_tokens_details")
    elif "input_tokens" in u or "output_tokens" in u:  # Responses API
        prompt = token_count(u.get("input_tokens"))
        completion = token_count(u.get("output_tokens"))
        # Transcriptions spell it `input_token_details` (with its `audio_tokens`).
        details_in = u.get("input_tokens_details") or u.get("input_token_details")
        details_out = u.get("output_tokens_details")
    else:
        return Usage()
    total = token_count(u.get("total_tokens"))
    if total is None and prompt is not None and completion is not None:
        total = prompt + completion
    if not isinstance(details_in, dict):
        details_in = {}
    if not isinstance(details_out, dict):
        details_out = {}
    if prompt is None and completion is None and total is None:
        return Usage()
    cached = token_count(details_in.get("cached_tokens"))
    if not cached:  # DeepSeek's spelling: its cache hits are billed at a tenth
        cached = token_count(u.get("prompt_cache_hit_tokens")) or cached
    return Usage(
        source="provider",
        billed_usd=billed_usd(u),
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=total,
        cached_tokens=cached,
        cache_write_tokens=token_count(details_in.get("cache_write_tokens")) or None,
        reasoning_tokens=token_count(details_out.get("reasoning_tokens")),
        input_audio_tokens=token_count(details_in.get("audio_tokens")) or None,
        output_audio_tokens=token_count(details_out.get("audio_tokens")) or None,
        input_image_tokens=token_count(details_in.get("image_tokens")) or None,
    )


def _usd(value: Any) -> float | None:
    if type(value) not in (int, float) or not 0 <= value <= MAX_BILLED_USD:
        return None  # bool, NaN, negative, absurd: no figure rather than a wrong one
    return float(value)


def billed_usd(u: dict[str, Any]) -> float | None:
    """The charge an aggregator reports in its usage (OpenRouter: `cost`, in USD), or None.

    With the client's own provider key (`is_byok`), `cost` is only the aggregator's fee and the
    provider's charge, billed to that key, is `cost_details.upstream_inference_cost`: the call
    cost their sum."""
    cost = _usd(u.get("cost"))
    if cost is None or u.get("is_byok") is not True:
        return cost
    details = u.get("cost_details")
    upstream = _usd(details.get("upstream_inference_cost")) if isinstance(details, dict) else None
    if upstream is None or cost + upstream > MAX_BILLED_USD:
        return None  # the sum too must be a charge (ingest refuses a record whose is not)
    return cost + upstream


def with_tier(usage: Usage, tier: Any) -> Usage:
    """The usage with the response's `service_tier` (it prices flex and priority requests)."""
    if isinstance(tier, str) and tier and usage.source != "missing":
        usage.service_tier = tier
    return usage


def with_searches(usage: Usage, response: dict[str, Any]) -> Usage:
    """Count a Responses API answer's `web_search_call` output items (billed per call)."""
    output = response.get("output")
    if usage.source != "missing" and isinstance(output, list):
        n = sum(1 for item in output if isinstance(item, dict) and item.get("type") == "web_search_call")
        if n:
            usage.web_search_requests = n
    return usage


def usage_from_body(body: Any) -> Usage:
    """Usage of a non-stream response body (already parsed)."""
    if isinstance(body, dict):
        return with_searches(with_tier(parse_usage(body.get("usage")), body.get("service_tier")), body)
    return Usage()


# -- stream reassembly ---------------------------------------------------------------------------
#
# Chat chunks are decoded into typed structs (msgspec skips the fields we do not need without
# building dicts: about twice as fast as a generic parse, and a stream is hundreds of chunks).
# Anything that does not fit the types — Responses API events, error events, a provider's odd
# field types — takes the generic path on a plain dict instead. `gc=False`: these short-lived
# structs never form reference cycles, so the garbage collector need not track them.


class _FnDelta(msgspec.Struct, gc=False):
    name: str | None = None
    arguments: str | None = None


class _ToolDelta(msgspec.Struct, gc=False):
    index: int = 0
    id: str | None = None
    type: str | None = None
    function: _FnDelta | None = None


class _Delta(msgspec.Struct, gc=False):
    role: str | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[_ToolDelta] | None = None
    function_call: _FnDelta | None = None  # the legacy `functions=` call, one per choice
    reasoning_content: str | None = None  # DeepSeek, vLLM, llama.cpp
    reasoning: str | None = None  # OpenRouter, Groq, Ollama
    annotations: list[Any] | None = None  # url_citation (search models), appended
    audio: dict[str, Any] | None = None  # `modalities=["audio"]`: data and transcript in pieces


class _ChoiceDelta(msgspec.Struct, gc=False):
    index: int = 0
    delta: _Delta | None = None
    text: str | None = None
    logprobs: dict[str, Any] | None = None  # its lists (content, refusal; tokens ...) extended
    finish_reason: str | None = None


class _Chunk(msgspec.Struct, gc=False):
    id: str | None = None
    object: str | None = None
    created: int | None = None
    model: str | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    choices: list[_ChoiceDelta] | None = None
    usage: dict[str, Any] | None = None
    x_groq: dict[str, Any] | None = None  # Groq: `{"usage": ...}` on a stream's last chunk


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_HEAD_KEYS = ("id", "created", "model", "system_fingerprint", "service_tier")
_RESPONSE_END = frozenset({"response.completed", "response.incomplete", "response.failed"})
#: The last event of the other typed streams (transcriptions, image generations and edits,
#: speech as SSE): each carries the call's `usage`.
_EVENTS_END = frozenset(
    {"transcript.text.done", "image_generation.completed", "image_edit.completed", "speech.audio.done"}
)


class _Choice:
    __slots__ = (
        "annotations", "audio", "content", "finish", "function", "logprobs", "reasoning", "refusal", "role",
        "saw_content", "text", "tools",
    )  # fmt: skip

    def __init__(self) -> None:
        self.role: str | None = None
        self.content: list[str] = []
        self.saw_content = False
        self.refusal: list[str] = []
        #: Reasoning text by the member that carried it (`reasoning_content` or `reasoning`):
        #: the message keeps the server's name for it, as its non-stream answer does.
        self.reasoning: dict[str, list[str]] = {}
        self.text: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        #: The legacy `function_call`'s name and arguments fragments, once a delta has one.
        self.function: tuple[list[str], list[str]] | None = None
        #: What only some streams carry, None until one does (the message then has it).
        self.logprobs: dict[str, Any] | None = None
        self.annotations: list[Any] | None = None
        #: `delta.audio`'s members but its data and transcript, and the pieces of those two.
        self.audio: tuple[dict[str, Any], list[str], list[str]] | None = None
        self.finish: Any = None

    def add_logprobs(self, lp: dict[str, Any]) -> None:
        """Each chunk's logprobs hold its own tokens: the answer's lists are their concatenation."""
        acc = self.logprobs
        if acc is None:
            self.logprobs = {k: list(v) if isinstance(v, list) else v for k, v in lp.items()}
            return
        for k, v in lp.items():
            if isinstance(v, list):
                old = acc.get(k)
                if isinstance(old, list):
                    old.extend(v)
                else:
                    acc[k] = list(v)
            elif k not in acc:
                acc[k] = v

    def add_audio(self, audio: dict[str, Any]) -> None:
        """`delta.audio`: its base64 data and transcript in pieces, in lists of their own (only
        strings are joined: an `id` of `["a", 1]` crashed the rebuild), any other member as sent."""
        acc = self.audio
        if acc is None:
            acc = self.audio = ({"id": None, "data": None, "expires_at": None, "transcript": None}, [], [])
        members, data, transcript = acc
        for k, v in audio.items():
            if k == "data" or k == "transcript":
                if isinstance(v, str):
                    (data if k == "data" else transcript).append(v)
            elif v is not None:
                members[k] = v

    def start_function(self) -> tuple[list[str], list[str]]:
        self.function = ([], [])
        return self.function

    def tool(self, index: Any) -> dict[str, Any]:
        t = self.tools.get(index)
        if t is None:
            t = self.tools[index] = {"id": None, "type": "function", "name": [], "arguments": []}
        return t


class _Stream:
    """What has been gathered so far from one stream's events."""

    __slots__ = (
        "choices", "complete", "error", "events", "final", "final_response", "head", "item_events", "output",
        "response_ended", "seen", "text_completion", "usage",
    )  # fmt: skip

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.choices: dict[Any, _Choice] = {}
        self.usage: Any = None
        self.error: str | None = None
        self.text_completion = False
        self.final_response: dict[str, Any] | None = None
        #: A Responses stream had events about its output items (`output_index`). Only if it
        #: never ended (`response_ended`: its last `response` object then has the output of its
        #: start) are they read, in a second pass (`_Output.of`), into `output`.
        self.item_events = False
        self.output: _Output | None = None
        self.response_ended = False
        self.seen = False
        self.complete = False
        self.final = False  # the usage chunk (no choices: the stream's last before `[DONE]`) came
        self.events = False  # typed events that are neither chat chunks nor the Responses API's

    def choice(self, index: Any) -> _Choice:
        st = self.choices.get(index)
        if st is None:
            st = self.choices[index] = _Choice()
        return st

    def typed(self, c: _Chunk, choices: list[_ChoiceDelta]) -> None:
        if not self.head.get("model"):
            # id, created, model ... are the same on every chunk, except Azure's first one
            # (`prompt_filter_results`, empty id and model): take them from a chunk that has them.
            self.head = {k: v for k in _HEAD_KEYS if (v := getattr(c, k)) is not None and v != ""}
            self.text_completion = c.object == "text_completion"
        if c.usage is not None:
            self.usage = c.usage
            self.final = not choices
        elif c.x_groq is not None and isinstance(c.x_groq.get("usage"), dict):
            self.usage = c.x_groq["usage"]  # on the chunk that finishes: the last word there
            self.final = all(ch.finish_reason is not None for ch in choices)
        elif choices:
            self.final = False  # content after a usage chunk: that one was not the last word
        for ch in choices:
            st = self.choice(ch.index)
            d = ch.delta
            if d is not None:
                if d.content is not None:
                    st.saw_content = True
                    st.content.append(d.content)
                if d.role is not None:
                    st.role = d.role
                if d.refusal is not None:
                    st.refusal.append(d.refusal)
                if d.reasoning_content is not None:
                    st.reasoning.setdefault("reasoning_content", []).append(d.reasoning_content)
                if d.reasoning is not None:
                    st.reasoning.setdefault("reasoning", []).append(d.reasoning)
                if d.tool_calls:
                    for tc in d.tool_calls:
                        t = st.tool(tc.index)
                        if tc.id is not None:
                            t["id"] = tc.id
                        if tc.type is not None:
                            t["type"] = tc.type
                        fn = tc.function
                        if fn is not None:
                            if fn.name is not None:
                                t["name"].append(fn.name)
                            if fn.arguments is not None:
                                t["arguments"].append(fn.arguments)
                fc = d.function_call
                if fc is not None:
                    name, args = st.function or st.start_function()
                    if fc.name is not None:
                        name.append(fc.name)
                    if fc.arguments is not None:
                        args.append(fc.arguments)
                if d.annotations is not None:
                    if st.annotations is None:
                        st.annotations = []
                    st.annotations.extend(d.annotations)
                if d.audio is not None:
                    st.add_audio(d.audio)
            elif ch.text is not None:
                st.text.append(ch.text)
            if ch.logprobs is not None:
                st.add_logprobs(ch.logprobs)
            if ch.finish_reason is not None:
                st.finish = ch.finish_reason

    def generic(self, obj: dict[str, Any]) -> None:
        chunk_choices = obj.get("choices")
        if chunk_choices is None:
            kind = obj.get("type")
            if obj.get("object") == "error":  # vLLM's and Mistral's flat error event
                self.error = error_message(obj) or str(kind or "error")
            elif isinstance(kind, str):  # Responses API events
                resp = obj.get("response")
                if isinstance(resp, dict):
                    self.final_response = resp
                elif "output_index" in obj:
                    self.item_events = True
                elif isinstance(obj.get("usage"), dict):  # a transcription's, image's or speech's
                    self.usage = obj["usage"]
                self.events = True
                if kind in _RESPONSE_END:
                    self.complete = self.response_ended = True
                elif kind in _EVENTS_END:
                    self.complete = True
                if kind == "error" or kind == "response.failed":
                    self.error = error_message(obj) or error_message(resp) or str(obj.get("message") or kind)
            elif "error" in obj:
                self.error = error_message(obj)
            return
        if not self.head.get("model"):
            self.head = {k: v for k in _HEAD_KEYS if (v := obj.get(k)) is not None and v != ""}
            self.text_completion = obj.get("object") == "text_completion"
        u = obj.get("usage")
        groq = obj.get("x_groq")
        if isinstance(u, dict):
            self.usage = u
            self.final = chunk_choices == []
        elif isinstance(groq, dict) and isinstance(groq.get("usage"), dict):
            self.usage = groq["usage"]
            self.final = isinstance(chunk_choices, list) and all(
                isinstance(ch, dict) and ch.get("finish_reason") is not None for ch in chunk_choices
            )
        elif chunk_choices:
            self.final = False
        for ch in chunk_choices if isinstance(chunk_choices, list) else ():
            if not isinstance(ch, dict):
                continue
            st = self.choice(_index(ch.get("index", 0)))
            delta = ch.get("delta")
            if isinstance(delta, dict):
                _apply_delta(st, delta)
            text = ch.get("text")
            if isinstance(text, str):
                st.text.append(text)
            lp = ch.get("logprobs")
            if isinstance(lp, dict):
                st.add_logprobs(lp)
            if ch.get("finish_reason") is not None:
                st.finish = ch["finish_reason"]


def reassemble_stream(raw: bytes) -> StreamResult | None:
    """Rebuild the non-stream response a stream stands for; None if `raw` holds no JSON events.

    Chat chunks become a `chat.completion` (content joined, tool calls assembled from their
    argument fragments by index, finish_reason, usage from the usage chunk); text completions a
    `text_completion`; a Responses API stream its final `response` object, or, when it never
    ended, its last one with the output its item events carried (`_Output`).
    """
    s = _Stream()
    chunks = _all_chunks(raw)
    if chunks is not None:
        s.seen = bool(chunks) or s.seen
        s.complete = raw.endswith(_DONE)
        for c in chunks:
            s.typed(c, c.choices)  # type: ignore[arg-type]  # _all_chunks checked it
        return _result(s)
    decode = _chunk_decoder.decode
    for data in data_payloads(raw):
        if data[:1] != b"{":  # `[DONE]`, keep-alive noise
            if data == b"[DONE]":
                s.complete = True
            continue
        try:
            chunk = decode(data)
        except msgspec.ValidationError:
            chunk = None
        except (msgspec.DecodeError, UnicodeDecodeError):
            chunk = None  # not JSON (a cut-off last event), or JSON only a lenient parser reads
        if chunk is not None and chunk.choices is not None:
            s.seen = True
            s.typed(chunk, chunk.choices)
            continue
        try:
            obj = loads(data, keep_surrogates=True)  # joined with the next event's, then scrubbed
        except orjson.JSONDecodeError:
            continue
        s.seen = True
        if isinstance(obj, dict):
            s.generic(obj)

    ended = s.final_response is not None and s.response_ended and _has_output(s.final_response)
    if s.item_events and s.final_response is not None and not ended:
        s.output = _Output.of(raw)
    return scrub_stream(_result(s), raw)


def _has_output(response: dict[str, Any]) -> bool:
    """Whether an ended stream's `response` carries its output: `response.failed` and
    `response.incomplete` may not, when the client had the items their events carried."""
    output = response.get("output")
    return not isinstance(output, list) or bool(output)


_DONE = b"data: [DONE]\n\n"
_chunks_decoder = msgspec.json.Decoder(list[_Chunk])


def _all_chunks(raw: bytes) -> list[_Chunk] | None:
    """Every chunk of a plain chat stream in one decoder call, or None for anything else.

    A stream made only of `data: {...}` events (and the final `data: [DONE]`) becomes a JSON
    array by replacing each event separator with a comma: JSON text never holds a raw line
    break, so the separator cannot occur inside a chunk. Comments, multi-line events, error or
    Responses API events, odd field types or a cut-off last event all fail this and take the
    general path.
    """
    if not raw.startswith(b"data: {") or b"\r" in raw:
        return None
    body = raw[: -len(_DONE)] if raw.endswith(_DONE) else raw
    if not body.endswith(b"}\n\n"):
        return None
    try:
        chunks = _chunks_decoder.decode(b"[" + body[6:-2].replace(b"\n\ndata: ", b",") + b"]")
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return None
    for c in chunks:
        if c.choices is None:
            return None
    return chunks


def stream_summary(raw: bytes) -> StreamResult | None:
    """A plain chat stream's usage and model from its first and last chunks; None otherwise.

    The gateway's shortcut (`RecordBuilder`): the worker reassembles the message later from
    the events (`llmtap.handlers.streams`), so a stream's record costs the gateway two chunk
    parses instead of twenty. It answers only where `reassemble_stream` would agree: the stream
    ends with `[DONE]`, the first chunk names the model (so it is the head) and the last one
    carries the usage (so no later chunk replaces it). The worker's full reassembly is the
    record's final word either way.
    """
    if not raw.startswith(b"data: {") or not raw.endswith(_DONE) or b"\r" in raw:
        return None
    body = raw[: -len(_DONE)]
    if not body.endswith(b"}\n\n"):
        return None
    first_end = body.find(b"\n\n")
    last_start = body.rfind(b"\n\ndata: ", 0, len(body) - 2)
    try:
        first = _chunk_decoder.decode(body[6:first_end])
        last = first if last_start < 0 else _chunk_decoder.decode(body[last_start + 8 : -2])
    except (msgspec.ValidationError, msgspec.DecodeError, UnicodeDecodeError):
        return None
    if first.choices is None or last.choices is None or not first.model or last.usage is None:
        return None
    usage = with_tier(parse_usage(last.usage), first.service_tier)
    return StreamResult(None, usage, first.model, None, True)


def _result(s: _Stream) -> StreamResult | None:
    if not s.seen:
        return None
    if s.final_response is not None:
        response = s.final_response
        if s.output is not None:
            # Cut, cancelled or ended by an `error` event: the client has what the events
            # carried, the last `response` object (`response.in_progress`) none of it; nor
            # does a `response.failed` or `.incomplete` without its output.
            response = {**response, "output": s.output.items_so_far()}
        model = response.get("model")
        return StreamResult(
            response,
            with_searches(
                with_tier(parse_usage(response.get("usage")), response.get("service_tier")), response
            ),
            model if isinstance(model, str) else None,
            s.error,
            s.complete,
            marked=True,  # every Responses stream ends with `response.completed` or another end
        )
    if s.events and not s.choices and not s.head:
        # A transcription, image or speech stream: no message to rebuild (its events are the
        # record's response), but the usage its last event carries. Model: the request's.
        return StreamResult(None, parse_usage(s.usage), None, s.error, s.complete)
    out_choices: list[dict[str, Any]] = []
    for idx in sorted(s.choices, key=lambda i: i if isinstance(i, int) else 0):
        st = s.choices[idx]
        if s.text_completion:
            out_choices.append(
                {"index": idx, "text": "".join(st.text), "logprobs": st.logprobs, "finish_reason": st.finish}
            )
            continue
        message: dict[str, Any] = {
            "role": st.role or "assistant",
            "content": "".join(st.content) if st.saw_content else None,
        }
        if st.refusal:
            message["refusal"] = "".join(st.refusal)
        for key, parts in st.reasoning.items():
            message[key] = "".join(parts)
        if st.tools:
            message["tool_calls"] = [
                {
                    "id": t["id"],
                    "type": t["type"],
                    "function": {"name": "".join(t["name"]), "arguments": "".join(t["arguments"])},
                }
                for _, t in sorted(st.tools.items(), key=lambda kv: kv[0] if isinstance(kv[0], int) else 0)
            ]
        if st.function is not None:
            message["function_call"] = {"name": "".join(st.function[0]), "arguments": "".join(st.function[1])}
        if st.annotations is not None:
            message["annotations"] = st.annotations
        if st.audio is not None:
            members, data, transcript = st.audio
            message["audio"] = {**members, "data": "".join(data), "transcript": "".join(transcript)}
        out: dict[str, Any] = {"index": idx, "message": message, "finish_reason": st.finish}
        if st.logprobs is not None:
            out["logprobs"] = st.logprobs
        out_choices.append(out)
    head = s.head
    message_obj: dict[str, Any] = {
        "id": head.get("id"),
        "object": "text_completion" if s.text_completion else "chat.completion",
        "created": head.get("created"),
        "model": head.get("model"),
        "choices": out_choices,
        "usage": s.usage,
    }
    for key in ("system_fingerprint", "service_tier"):
        if key in head:
            message_obj[key] = head[key]
    model = head.get("model")
    usage = with_tier(parse_usage(s.usage), head.get("service_tier"))
    model = model if isinstance(model, str) else None
    return StreamResult(message_obj, usage, model, s.error, s.complete, s.final)


#: Responses events whose strings the client joins into an output item (`<kind>.delta`; the
#: `.done` event repeats the whole): where the text goes, as (the item's list of parts, the
#: event's index into it, the part's member, the type of a part no event added), or (None, None,
#: the item's member, None) for an item's own string.
_DELTA_TARGETS: dict[str, tuple[str | None, str | None, str, str | None]] = {
    "response.output_text": ("content", "content_index", "text", "output_text"),
    "response.refusal": ("content", "content_index", "refusal", "refusal"),
    "response.reasoning_text": ("content", "content_index", "text", "reasoning_text"),
    "response.reasoning_summary_text": ("summary", "summary_index", "text", "summary_text"),
    "response.function_call_arguments": (None, None, "arguments", None),
    "response.mcp_call_arguments": (None, None, "arguments", None),
    "response.custom_tool_call_input": (None, None, "input", None),
    "response.code_interpreter_call_code": (None, None, "code", None),
}
#: `<kind>.delta` and `<kind>.done` events: (kind, the index's name, the text's member, a delta).
_DELTAS = {k + ".delta": (k, v[1], "delta", True) for k, v in _DELTA_TARGETS.items()} | {
    k + ".done": (k, v[1], v[2], False) for k, v in _DELTA_TARGETS.items()
}
#: Events that add (`.added`) or finish (`.done`) a whole part: (its list, the index's name).
_PARTS = {
    f"response.{kind}.{end}": where
    for kind, where in (
        ("content_part", ("content", "content_index")),
        ("reasoning_summary_part", ("summary", "summary_index")),
    )
    for end in ("added", "done")
}


class _Output:
    """The `output` of a Responses stream that never ended, as its item events build it in the
    client's SDK: items from `output_item.added` (whole again at `.done`), their parts, and the
    text, refusal, reasoning and arguments deltas gathered by where they go (`add`), joined in
    `items_so_far`."""

    __slots__ = ("done", "items", "texts")

    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}
        self.done: set[int] = set()
        #: Text pieces by (output index, part index, `_DELTA_TARGETS` kind).
        self.texts: dict[tuple[int, int, str], list[str]] = {}

    @classmethod
    def of(cls, raw: bytes) -> _Output:
        """The item events of a stream read again, as `_Stream.generic` took them: keeping them
        from the first pass cost every stream (a 100k-delta one 77 MB against 44, 528 ms against
        345) for the few that are cut."""
        out = cls()
        for data in data_payloads(raw):
            if data[:1] != b"{":
                continue
            try:
                obj = loads(data, keep_surrogates=True)
            except orjson.JSONDecodeError:
                continue
            if not isinstance(obj, dict) or obj.get("choices") is not None or obj.get("object") == "error":
                continue
            kind = obj.get("type")
            if isinstance(kind, str) and not isinstance(obj.get("response"), dict) and "output_index" in obj:
                out.add(kind, obj)
        return out

    def add(self, kind: str, ev: dict[str, Any]) -> None:
        at = ev.get("output_index")
        target = _DELTAS.get(kind)
        if target is not None:  # (a finished item's are skipped at the end)
            base, index_name, member, is_delta = target
            index = 0 if index_name is None else ev.get(index_name)
            value = ev.get(member)
            if type(value) is str and type(at) is int and type(index) is int:
                key = (at, index, base)
                pieces = self.texts.get(key) if is_delta else None
                if pieces is not None:
                    pieces.append(value)
                elif is_delta:  # appended to what the item or part already holds, as the SDK does
                    held = self.held(at, index, base)
                    self.texts[key] = [held, value] if held else [value]
                else:
                    self.texts[key] = [value]
            return
        if type(at) is not int or at in self.done:
            return
        if kind == "response.output_item.added" or kind == "response.output_item.done":
            item = ev.get("item")
            if isinstance(item, dict):
                self.items[at] = {k: list(v) if isinstance(v, list) else v for k, v in item.items()}
                if kind == "response.output_item.done":
                    self.done.add(at)
        elif kind in _PARTS and at in self.items:
            where, index_name = _PARTS[kind]
            part = ev.get("part")
            if isinstance(part, dict):
                _put(self.items[at], where, ev.get(index_name), part)

    def held(self, at: int, index: int, base: str) -> str | None:
        """The text an item (`output_item.added`'s arguments) or its part (`content_part.added`'s
        text) already holds where a kind's first delta goes."""
        where, _, member, _ = _DELTA_TARGETS[base]
        held = self.items.get(at)
        if held is not None and where is not None:
            parts = held.get(where)
            held = parts[index] if isinstance(parts, list) and 0 <= index < len(parts) else None
        text = held.get(member) if isinstance(held, dict) else None
        return text if isinstance(text, str) else None

    def items_so_far(self) -> list[Any]:
        items = self.items
        for (at, index, base), pieces in self.texts.items():
            item = items.get(at)
            if item is None or at in self.done:
                continue
            where, _, member, part_type = _DELTA_TARGETS[base]
            text = "".join(pieces)
            if where is None:
                item[member] = text
                continue
            parts = item.get(where)
            part = parts[index] if isinstance(parts, list) and 0 <= index < len(parts) else None
            if isinstance(part, dict):
                part = {**part, member: text}
            else:
                part = {"type": part_type, member: text}
                if part_type == "output_text":
                    part["annotations"] = []
            _put(item, where, index, part)
        return [items[k] for k in sorted(items)]


def _put(item: dict[str, Any], where: str, index: Any, part: dict[str, Any]) -> None:
    """Set part `index` of the item's list `where`: one it has, or the next one (a later index
    is ignored rather than padded: it could be any number)."""
    parts = item.get(where)
    if not isinstance(parts, list):
        parts = item[where] = []
    if type(index) is not int or not 0 <= index <= len(parts):
        return
    if index == len(parts):
        parts.append(part)
    else:
        parts[index] = part


def _index(value: Any) -> Any:
    """A choice's or tool call's `index` as a key: a list or object cannot be one (it raised,
    and the record lost its contents), so it counts as 0 as the order of choices does."""
    return 0 if isinstance(value, list | dict) else value


def _apply_delta(st: _Choice, delta: dict[str, Any]) -> None:
    role = delta.get("role")
    if isinstance(role, str):
        st.role = role
    content = delta.get("content")
    if isinstance(content, str):
        st.saw_content = True
        st.content.append(content)
    refusal = delta.get("refusal")
    if isinstance(refusal, str):
        st.refusal.append(refusal)
    for key in ("reasoning_content", "reasoning"):
        text = delta.get(key)
        if isinstance(text, str):
            st.reasoning.setdefault(key, []).append(text)
    calls = delta.get("tool_calls")
    if isinstance(calls, list):
        for tc in calls:
            if not isinstance(tc, dict):
                continue
            t = st.tool(_index(tc.get("index", 0)))
            if tc.get("id") is not None:
                t["id"] = tc["id"]
            if isinstance(tc.get("type"), str):
                t["type"] = tc["type"]
            fn = tc.get("function")
            if isinstance(fn, dict):
                if isinstance(fn.get("name"), str):
                    t["name"].append(fn["name"])
                if isinstance(fn.get("arguments"), str):
                    t["arguments"].append(fn["arguments"])
    fc = delta.get("function_call")
    if isinstance(fc, dict):
        name, args = st.function or st.start_function()
        if isinstance(fc.get("name"), str):
            name.append(fc["name"])
        if isinstance(fc.get("arguments"), str):
            args.append(fc["arguments"])
    notes = delta.get("annotations")
    if isinstance(notes, list):
        if st.annotations is None:
            st.annotations = []
        st.annotations.extend(notes)
    audio = delta.get("audio")
    if isinstance(audio, dict):
        st.add_audio(audio)


# -- the stream-usage rewrite (hot path: keep it cheap) -------------------------------------------


def inject_stream_usage(body: bytes) -> bytes | None:
    """The request body with `stream_options.include_usage: true`, or None to send it unchanged.

    None when the body is not a JSON object with `"stream": true`, or already asks for usage.
    The byte test runs first so a non-stream request never pays for a parse.
    """
    if b'"stream"' not in body:
        return None
    try:
        obj = orjson.loads(body)  # strict: a body only a lenient parse reads is sent unchanged
    except orjson.JSONDecodeError:
        return None
    except RecursionError:  # nested deeper than the parser goes: the upstream's to judge
        return None
    if not isinstance(obj, dict) or obj.get("stream") is not True:
        return None
    options = obj.get("stream_options")
    if options is None:
        obj["stream_options"] = {"include_usage": True}
    elif isinstance(options, dict):
        if options.get("include_usage") is True:
            return None
        if options.get("continuous_usage_stats"):
            # vLLM: with `include_usage` added this puts usage on every chunk, which no
            # stripping could take back out; without it, it does nothing. Sent as the client wrote it.
            return None
        # An explicit false is overridden too: the client still never sees the usage chunk.
        options["include_usage"] = True
    else:
        return None
    try:
        return orjson.dumps(obj)
    except orjson.JSONEncodeError:  # deeper than orjson writes (254 levels; it reads 1024)
        return None


def refuses_stream_options(body: bytes) -> bool:
    """Whether an error answer refuses `stream_options` itself, not merely quotes it.

    Refusals name the field in an error's location (`loc`, Mistral and other pydantic servers)
    or message (OpenAI-style `Unrecognized request argument supplied: stream_options`). vLLM and
    other FastAPI servers echo the whole request under `input` with any validation error: a
    client's own mistake there must not count as a refusal (an outside review).
    """
    if b"stream_options" not in body:
        return False
    try:
        found = orjson.loads(body)
    except (orjson.JSONDecodeError, RecursionError):  # (a refusal's text, or deeper than JSON goes)
        return True  # a text error naming the field
    stack: list[Any] = [found]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            loc = node.get("loc")
            if isinstance(loc, list) and "stream_options" in loc:
                return True
            stack.extend(v for k, v in node.items() if k != "input")
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, str) and "stream_options" in node:
            return True
    return False


_USAGE_NULL = b',"usage":null'
_EMPTY_CHOICES = b'"choices":[]'
_USAGE_OBJECT = b'"usage":{'
# The same markers in JSON written with spaces (`json.dumps`' default: `"usage": null`), as
# some OpenAI-compatible servers send it. Only looked for where the compact ones are not found.
_SPACED_USAGE_NULL = re.compile(rb',\s*"usage"\s*:\s*null')
#: The member written first (`{"usage":null,"id":...}`), as a few servers order it.
_FIRST_USAGE_NULL = re.compile(rb'\{\s*"usage"\s*:\s*null\s*,\s*')
_SPACED_EMPTY_CHOICES = re.compile(rb'"choices"\s*:\s*\[\s*\]')
_SPACED_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')


class UsageChunkStripper:
    """Removes what `include_usage` added to a chat stream, as the chunks pass through.

    Only complete events are released (an event split across network reads is held until its
    blank line arrives), so a marker split across reads is still found. A client cannot use half
    an event, so holding one back delays nothing it could act on. `b',"usage":null'` can only be
    the member OpenAI adds: inside a JSON string every `"` is escaped.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._pending + chunk if self._pending else chunk
        end = last_boundary(data)
        if end < 0:
            self._pending = data
            return b""
        if end < len(data):
            self._pending = data[end:]
            data = data[:end]
        else:
            self._pending = b""
        return _clean(data)

    def flush(self) -> bytes:
        """What is held at the end of the stream (an unterminated last event)."""
        data, self._pending = self._pending, b""
        return _clean(data) if data else b""


def _clean(data: bytes) -> bytes:
    data = data.replace(_USAGE_NULL, b"")
    if b'{"usage":null,' in data:
        data = data.replace(b'{"usage":null,', b"{")
    if _EMPTY_CHOICES in data:
        return _drop_usage_chunks(data)
    if b'"usage"' in data:  # compact JSON has no `"usage"` left but in the usage chunk
        data = _FIRST_USAGE_NULL.sub(b"{", _SPACED_USAGE_NULL.sub(b"", data))
        return _drop_usage_chunks(data, spaced=True)
    return data


def _drop_usage_chunks(data: bytes, spaced: bool = False) -> bytes:
    find = _spaced_find if spaced else _compact_find
    pos = find(data, 0)
    while pos >= 0:
        start, end = event_bounds(data, pos)
        if _is_usage_chunk(data[start:end], spaced):
            data = data[:start] + data[end:]
            pos = find(data, start)
        else:
            pos = find(data, end)
    return data


def _compact_find(data: bytes, start: int) -> int:
    return data.find(_EMPTY_CHOICES, start)


def _spaced_find(data: bytes, start: int) -> int:
    m = _SPACED_EMPTY_CHOICES.search(data, start)
    return -1 if m is None else m.start()


def _is_usage_chunk(event: bytes, spaced: bool = False) -> bool:
    """The event holding `"choices":[]` is the usage chunk if it also holds a usage object.

    Byte tests suffice: outside strings (where quotes are escaped) these markers can only be
    the chunk's own top-level members, as an empty `choices` holds nothing that could nest them.
    """
    if event.count(b"data:") != 1:
        return False
    return _USAGE_OBJECT in event or (spaced and _SPACED_USAGE_OBJECT.search(event) is not None)


# -- the turn a request adds (search) -------------------------------------------------------------

_assistant = role_is("assistant")
#: Responses API input items the model produced (echoed back by the client with each turn),
#: besides assistant messages and `*_call` items; `*_call_output` items are the client's.
#: Generated output in a stream's chunk (`token_marker`): text, reasoning or a refusal that is
#: not empty (the opening chunk's `"content":""` is none; Mistral's content parts are a list of
#: objects), or a tool call (not an empty list).
_CHAT_OUTPUT = re.compile(
    rb'"(?:content|reasoning_content|reasoning|refusal)"\s*:\s*(?:"[^"]|\[\s*\{)'
    rb'|"(?:tool_calls|function_call|audio)"\s*:\s*(?:\[\s*)?\{'
)
_RESPONSES_OUTPUT = re.compile(rb'\.delta"')
_MODEL_ITEMS = frozenset({"reasoning", "mcp_list_tools", "mcp_approval_request"})


def _model_item(item: Any) -> bool:
    if not isinstance(item, dict):
        return False
    kind = item.get("type")
    if isinstance(kind, str) and (kind.endswith("_call") or kind in _MODEL_ITEMS):
        return True
    return item.get("role") == "assistant"


def turn(request: Any) -> Any:
    """Chat Completions: the messages after the last assistant one; Responses: the input items
    after the last one the model produced (with `previous_response_id` the input holds only new
    items already)."""
    if isinstance(request, dict) and "messages" in request:
        return after_last_reply(request, "messages", _assistant)
    return after_last_reply(request, "input", _model_item)


# -- the providers ---------------------------------------------------------------------------------


class OpenAI(Provider):
    """`/openai/...` → `LLMTAP_OPENAI_BASE_URL`. Also the base of every OpenAI-shaped route."""

    name = "openai"
    pricing_id: str | None = "openai"

    def __init__(self, stream_usage: bool = True) -> None:
        self.stream_usage = stream_usage

    def base_url(self, settings: Settings) -> str | None:
        return settings.openai_base_url

    def rewrite_request(
        self, method: str, path: str, body: bytes, query: str = ""
    ) -> tuple[bytes, StreamFilter] | None:
        if not self.stream_usage or method != "POST" or not path.endswith("completions"):
            return None
        injected = inject_stream_usage(body)
        return None if injected is None else (injected, UsageChunkStripper())

    def refuses_rewrite(self, status: int, body: bytes) -> bool:
        return refuses_stream_options(body)

    def usage_from_body(self, body: Any) -> Usage:
        return usage_from_body(body)

    def token_marker(self, path: str) -> re.Pattern[bytes] | None:
        # Every Responses event of generated output is a `*.delta` (text, refusal, reasoning
        # summary, tool arguments); `response.created` / `in_progress` come at once. A chat
        # stream opens with the role and an empty content, sent before any output (a reasoning
        # model thinks after it); output is text (or reasoning, or a refusal) that is not
        # empty, or a tool call. Legacy completions' first chunk is text.
        if path.endswith("/responses"):
            return _RESPONSES_OUTPUT
        return _CHAT_OUTPUT if path.endswith("/chat/completions") else None

    def reassemble_stream(self, raw: bytes) -> StreamResult | None:
        return reassemble_stream(raw)

    def stream_summary(self, raw: bytes) -> StreamResult | None:
        return stream_summary(raw)

    def turn(self, request: Any) -> Any:
        return turn(request)

    def end_user(self, request: Any) -> str | None:
        # `user` is being replaced by `safety_identifier` (and `prompt_cache_key`, not a user).
        return text_member(request, "user") or text_member(request, "safety_identifier")

    def usage_from_request(self, path: str, request: Any) -> Usage | None:
        """Speech (`/audio/speech`) answers audio bytes and no usage; tts-1 and tts-1-hd bill
        each character of its `input`."""
        text = request.get("input") if isinstance(request, dict) else None
        if path.endswith("/audio/speech") and isinstance(text, str):
            return Usage(source="estimated", input_characters=len(text))
        return None

    def usage_from_text(self, path: str, request: Any, answer: bytes) -> Usage | None:
        """A transcription as subtitles (`response_format=srt|vtt`) has no usage: whisper-1
        bills the audio's seconds, read here from the last cue's end (rev17: unpriced). It can
        be shorter than the audio by a trailing silence: "estimated". Only a form that asked for
        subtitles, and only a whole timing line (rev18b: "-->" in a text answer priced a day)."""
        if not path.endswith(("/audio/transcriptions", "/audio/translations")):
            return None
        asked = request.get("response_format") if isinstance(request, dict) else None
        if not isinstance(asked, str) or asked.lower() not in ("srt", "vtt"):
            return None
        found = _CUE_END.findall(answer[-4096:])
        if not found:
            return None
        h, m, sec, ms = found[-1]
        seconds = int(h or 0) * 3600 + int(m) * 60 + int(sec) + int(ms) / 1000
        return Usage(source="estimated", audio_seconds=math.ceil(seconds)) if seconds > 0 else None


#: A subtitle cue's timing line, its end time caught: SRT `00:01:02,500`, WebVTT `00:01:02.500`
#: or `01:02.500`, cue settings after it.
_TIME = rb"(?:(\d{1,3}):)?(\d{2}):(\d{2})[,.](\d{3})"
_CUE_END = re.compile(
    rb"^(?:\d{1,3}:)?\d{2}:\d{2}[,.]\d{3}[ \t]+-->[ \t]+" + _TIME + rb"(?:[ \t][^\r\n]*)?\r?$", re.MULTILINE
)


class OpenAICompatible(OpenAI):
    """A named upstream from `LLMTAP_UPSTREAMS` (vLLM, Ollama, Groq, OpenRouter ...).

    The wire is OpenAI's, the prices are not: it is priced with the price table's provider of
    the same id (`groq`, `openrouter` ...) and left unpriced when the table has no such provider,
    never at OpenAI's prices.
    """

    def __init__(self, name: str, url: str | None = None, stream_usage: bool = True) -> None:
        super().__init__(stream_usage and not sends_stream_usage(url))
        self.name = name
        self.pricing_id = name
        self.url = url

    def base_url(self, settings: Settings) -> str | None:
        return self.url

    def model(self, path: str, request: Any, response: Any) -> str | None:
        """The model that answered, else the one asked for: an aggregator's answer names the
        model it routed to (OpenRouter's `openrouter/auto`, its fallbacks from `models`), which
        is the one billed; a self-hosted server names the one it serves."""
        return response_model(response, "model") or super().model(path, request, response)


#: Upstream hosts whose streams carry usage whether asked or not (OpenRouter: `include_usage`
#: "has no effect"): asking and stripping there took from clients a chunk they always get.
_SENDS_STREAM_USAGE = ("openrouter.ai",)


def sends_stream_usage(url: str | None) -> bool:
    host = (urlsplit(url).hostname or "") if url else ""
    return any(host == h or host.endswith("." + h) for h in _SENDS_STREAM_USAGE)
