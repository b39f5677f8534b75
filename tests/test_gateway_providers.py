"""Usage extraction and stream reassembly on the providers' real wire formats.

The event texts below are written the way OpenAI and Anthropic send them (field order, compact
JSON, `data: [DONE]`, `event:` lines, pings), including the awkward parts: tool-call arguments
split across chunks, several tool calls, thinking blocks with signatures, CRLF framing.
"""

from __future__ import annotations

import json
import time
import tracemalloc

import orjson
import pytest

from llmtap.providers import anthropic, openai
from llmtap.providers.common import dumps
from llmtap.providers.sse import data_payloads, iter_events, last_boundary, split_events


def sse(*objs: object) -> bytes:
    return b"".join(b"data: " + json.dumps(o, separators=(",", ":")).encode() + b"\n\n" for o in objs)


def chunk(
    delta: dict[str, object], finish: str | None = None, *, usage_null: bool = False
) -> dict[str, object]:
    c: dict[str, object] = {
        "id": "chatcmpl-AbC",
        "object": "chat.completion.chunk",
        "created": 1730000000,
        "model": "gpt-4o-2024-08-06",
        "system_fingerprint": "fp_1",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage_null:
        c["usage"] = None
    return c


OPENAI_USAGE = {
    "prompt_tokens": 120,
    "completion_tokens": 40,
    "total_tokens": 160,
    "prompt_tokens_details": {"cached_tokens": 64, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 12, "audio_tokens": 0},
}


def openai_tool_stream(usage_null: bool = True) -> bytes:
    tc0 = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    tc1 = {"index": 1, "id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    events = [
        chunk({"role": "assistant", "content": None, "tool_calls": [tc0]}, usage_null=usage_null),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"ci'}}]}, usage_null=usage_null),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Par'}}]}, usage_null=usage_null),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}, usage_null=usage_null),
        chunk({"tool_calls": [tc1]}, usage_null=usage_null),
        chunk(
            {"tool_calls": [{"index": 1, "function": {"arguments": '{"tz":"CET"}'}}]}, usage_null=usage_null
        ),
        chunk({}, "tool_calls", usage_null=usage_null),
    ]
    out = sse(*events)
    if usage_null:
        usage_chunk = {k: v for k, v in chunk({}).items() if k != "choices"}
        usage_chunk["choices"] = []
        usage_chunk["usage"] = OPENAI_USAGE
        out += sse(usage_chunk)
    return out + b"data: [DONE]\n\n"


# -- OpenAI ---------------------------------------------------------------------------------------


def test_openai_chat_stream_text_and_usage() -> None:
    words = ["Hello", " there", ",", " friend"]
    body = sse(chunk({"role": "assistant", "content": "", "refusal": None}, usage_null=True))
    body += sse(*(chunk({"content": w}, usage_null=True) for w in words))
    body += sse(chunk({}, "stop", usage_null=True))
    body += sse(
        {**{k: v for k, v in chunk({}).items() if k != "choices"}, "choices": [], "usage": OPENAI_USAGE}
    )
    body += b"data: [DONE]\n\n"
    res = openai.reassemble_stream(body)
    assert res is not None
    msg = res.message
    assert msg["object"] == "chat.completion"
    assert msg["id"] == "chatcmpl-AbC" and msg["model"] == "gpt-4o-2024-08-06"
    assert msg["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello there, friend"},
            "finish_reason": "stop",
        }
    ]
    assert msg["usage"] == OPENAI_USAGE
    u = res.usage
    assert (u.source, u.prompt_tokens, u.completion_tokens, u.total_tokens) == ("provider", 120, 40, 160)
    assert (u.cached_tokens, u.reasoning_tokens) == (64, 12)
    assert res.model == "gpt-4o-2024-08-06"
    assert res.error is None


def test_openai_tool_calls_assembled_from_fragments() -> None:
    res = openai.reassemble_stream(openai_tool_stream())
    assert res is not None
    (choice,) = res.message["choices"]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    calls = choice["message"]["tool_calls"]
    assert [c["id"] for c in calls] == ["call_1", "call_2"]
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris"}
    assert json.loads(calls[1]["function"]["arguments"]) == {"tz": "CET"}


def test_openai_stream_without_usage_is_missing_not_zero() -> None:
    body = sse(chunk({"role": "assistant", "content": "hi"}), chunk({}, "stop")) + b"data: [DONE]\n\n"
    res = openai.reassemble_stream(body)
    assert res is not None
    assert res.usage.source == "missing"
    assert res.usage.prompt_tokens is None and res.usage.total_tokens is None
    assert res.message["usage"] is None


def test_openai_stream_error_event() -> None:
    err = {
        "error": {"message": "The server had an error", "type": "server_error", "param": None, "code": None}
    }
    res = openai.reassemble_stream(sse(chunk({"role": "assistant", "content": "a"}), err))
    assert res is not None and res.error == "The server had an error"


def test_openai_crlf_framing_and_multiline_data() -> None:
    body = sse(chunk({"content": "x"}), chunk({"content": "y"}, "stop")).replace(b"\n", b"\r\n")
    res = openai.reassemble_stream(body)
    assert res is not None
    assert res.message["choices"][0]["message"]["content"] == "xy"
    assert list(iter_events(b'event: a\r\ndata: {"x":\r\ndata: 1}\r\n\r\n: comment\n\n')) == [
        ("a", b'{"x":\n1}')
    ]


def test_openai_legacy_completions_stream() -> None:
    base = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "gpt-3.5-turbo-instruct"}
    body = sse(
        {**base, "choices": [{"text": "Hel", "index": 0, "logprobs": None, "finish_reason": None}]},
        {**base, "choices": [{"text": "lo", "index": 0, "logprobs": None, "finish_reason": "length"}]},
        {**base, "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    )
    res = openai.reassemble_stream(body + b"data: [DONE]\n\n")
    assert res is not None
    assert res.message["object"] == "text_completion"
    assert res.message["choices"][0]["text"] == "Hello"
    assert res.usage.total_tokens == 5


def test_openai_responses_api_stream() -> None:
    final = {
        "id": "resp_1",
        "object": "response",
        "model": "gpt-4.1",
        "status": "completed",
        "output": [{"type": "message", "content": [{"type": "output_text", "text": "Hi!"}]}],
        "usage": {
            "input_tokens": 30,
            "input_tokens_details": {"cached_tokens": 10},
            "output_tokens": 5,
            "output_tokens_details": {"reasoning_tokens": 2},
            "total_tokens": 35,
        },
    }
    body = b"".join(
        b"event: " + name.encode() + b"\ndata: " + json.dumps(obj).encode() + b"\n\n"
        for name, obj in [
            (
                "response.created",
                {"type": "response.created", "response": {**final, "status": "in_progress"}},
            ),
            ("response.output_text.delta", {"type": "response.output_text.delta", "delta": "Hi!"}),
            ("response.completed", {"type": "response.completed", "response": final}),
        ]
    )
    res = openai.reassemble_stream(body)
    assert res is not None
    assert res.message == final
    u = res.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens, u.cached_tokens, u.reasoning_tokens) == (
        30,
        5,
        35,
        10,
        2,
    )


def responses_events(*objs: dict[str, object]) -> bytes:
    return b"".join(
        b"event: " + str(o["type"]).encode() + b"\ndata: " + json.dumps(o).encode() + b"\n\n" for o in objs
    )


#: A Responses API stream's `response` while it runs (`response.created`, `.in_progress`).
PENDING_RESPONSE = {
    "id": "resp_1",
    "object": "response",
    "model": "gpt-4.1",
    "status": "in_progress",
    "output": [],
}


def test_a_responses_stream_that_never_ended_keeps_its_items_deltas() -> None:
    """rev28c: with no `response.completed` the record held `response.in_progress`'s empty
    output; the client had a function call's arguments, a refusal and a reasoning summary."""
    pending = PENDING_RESPONSE
    fc = {
        "id": "fc_1",
        "type": "function_call",
        "status": "in_progress",
        "arguments": "",
        "call_id": "call_1",
    }
    fc["name"] = "get_weather"
    msg = {"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
    rs = {"id": "rs_1", "type": "reasoning", "summary": []}
    at = {"item_id": "msg_1", "output_index": 2, "content_index": 0}
    summary = {"item_id": "rs_1", "output_index": 0, "summary_index": 0}
    body = responses_events(
        {"type": "response.created", "sequence_number": 0, "response": pending},
        {"type": "response.in_progress", "sequence_number": 1, "response": pending},
        {"type": "response.output_item.added", "output_index": 0, "item": rs},
        {
            "type": "response.reasoning_summary_part.added",
            **summary,
            "part": {"type": "summary_text", "text": ""},
        },
        {"type": "response.reasoning_summary_text.delta", **summary, "delta": "The user"},
        {"type": "response.reasoning_summary_text.delta", **summary, "delta": " asks."},
        {"type": "response.output_item.added", "output_index": 1, "item": fc},
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "fc_1",
            "output_index": 1,
            "delta": '{"ci',
        },
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "fc_1",
            "output_index": 1,
            "delta": 'ty":1}',
        },
        {"type": "response.output_item.added", "output_index": 2, "item": msg},
        {"type": "response.content_part.added", **at, "part": {"type": "refusal", "refusal": ""}},
        {"type": "response.refusal.delta", **at, "delta": "I can"},
        {"type": "response.refusal.delta", **at, "delta": "not."},
        {"type": "response.output_item.added", "output_index": 3, "item": {**msg, "id": "msg_2"}},
        {
            "type": "response.output_text.delta",
            "item_id": "msg_2",
            "output_index": 3,
            "content_index": 0,
            "delta": "Hi",
        },
    )
    res = openai.reassemble_stream(body)
    assert res is not None and not res.complete
    assert res.message == {
        **pending,
        "output": [
            {**rs, "summary": [{"type": "summary_text", "text": "The user asks."}]},
            {**fc, "arguments": '{"city":1}'},
            {**msg, "content": [{"type": "refusal", "refusal": "I cannot."}]},
            {**msg, "id": "msg_2", "content": [{"type": "output_text", "text": "Hi", "annotations": []}]},
        ],
    }
    # An item finished is taken whole from its `.done` event; an `error` event ends the stream.
    fc_done = {**fc, "status": "completed", "arguments": '{"city":"Paris"}'}
    ended = responses_events(
        {"type": "response.in_progress", "sequence_number": 1, "response": pending},
        {"type": "response.output_item.added", "output_index": 0, "item": fc},
        {
            "type": "response.function_call_arguments.delta",
            "item_id": "fc_1",
            "output_index": 0,
            "delta": "{",
        },
        {"type": "response.output_item.done", "output_index": 0, "item": fc_done},
        {"type": "error", "code": "server_error", "message": "The server had an error", "param": None},
    )
    res = openai.reassemble_stream(ended)
    assert res is not None and res.error == "The server had an error"
    assert res.message == {**pending, "output": [fc_done]}


def test_a_cut_responses_streams_deltas_are_appended_to_what_its_item_or_part_held() -> None:
    """rev29c: a cut stream stored only the deltas, not the text the `output_item.added` item or
    the `content_part.added` part already held (the SDK does `text += delta`); a `.done` event
    still replaces the whole."""
    pending = PENDING_RESPONSE
    call = {"id": "fc_1", "type": "function_call", "call_id": "c1", "name": "f", "arguments": '{"a":'}
    msg = {"id": "msg_1", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    rs = {"id": "rs_1", "type": "reasoning", "summary": []}
    at = {"output_index": 1, "content_index": 0}
    summary = {"output_index": 2, "summary_index": 0}

    def events(*done: dict[str, object]) -> bytes:
        return responses_events(
            {"type": "response.in_progress", "response": pending},
            {"type": "response.output_item.added", "output_index": 0, "item": call},
            {"type": "response.function_call_arguments.delta", "output_index": 0, "delta": "1}"},
            {"type": "response.output_item.added", "output_index": 1, "item": msg},
            {"type": "response.content_part.added", **at, "part": {"type": "output_text", "text": "Hel"}},
            {"type": "response.output_text.delta", **at, "delta": "lo"},
            {"type": "response.content_part.added", **at, "content_index": 1, "part": {"type": "refusal"}},
            {"type": "response.refusal.delta", **at, "content_index": 1, "delta": "No"},
            {"type": "response.output_item.added", "output_index": 2, "item": rs},
            {
                "type": "response.reasoning_summary_part.added",
                **summary,
                "part": {"type": "summary_text", "text": "A"},
            },
            {"type": "response.reasoning_summary_text.delta", **summary, "delta": "B"},
            *done,
        )

    res = openai.reassemble_stream(events())
    assert res is not None and res.message["output"] == [
        {**call, "arguments": '{"a":1}'},
        {**msg, "content": [{"type": "output_text", "text": "Hello"}, {"type": "refusal", "refusal": "No"}]},
        {**rs, "summary": [{"type": "summary_text", "text": "AB"}]},
    ]
    res = openai.reassemble_stream(
        events(
            {"type": "response.output_text.done", **at, "text": "Hello!"},
            {"type": "response.function_call_arguments.done", "output_index": 0, "arguments": '{"a":2}'},
        )
    )
    assert res is not None and res.message["output"][:2] == [
        {**call, "arguments": '{"a":2}'},
        {**msg, "content": [{"type": "output_text", "text": "Hello!"}, {"type": "refusal", "refusal": "No"}]},
    ]


@pytest.mark.parametrize("end", ["response.failed", "response.incomplete"])
def test_a_failed_or_incomplete_responses_stream_without_output_keeps_its_items(end: str) -> None:
    """stop 56: a stream that ended with `response.failed` or `.incomplete` whose `response`
    carries no output (or `[]`) was stored without the text the client had from its events."""
    pending = PENDING_RESPONSE
    msg = {"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    status = end.split(".")[1]
    for ended in ({**pending, "status": status}, {**pending, "status": status, "output": []}):
        if end == "response.failed":
            ended = {**ended, "error": {"code": "server_error", "message": "The model failed"}}
        body = responses_events(
            {"type": "response.created", "response": pending},
            {"type": "response.output_item.added", "output_index": 0, "item": msg},
            {"type": "response.output_text.delta", **at, "delta": "Half an"},
            {"type": "response.output_text.delta", **at, "delta": " answer"},
            {"type": end, "response": ended},
        )
        res = openai.reassemble_stream(body)
        assert res is not None and res.complete and res.marked
        part = {"type": "output_text", "text": "Half an answer", "annotations": []}
        assert res.message == {**ended, "output": [{**msg, "content": [part]}]}
        assert (res.error is not None) == (end == "response.failed")
    # an end that carries its output is stored as it came
    done = {**msg, "status": "completed", "content": [{"type": "output_text", "text": "Whole"}]}
    body = responses_events(
        {"type": "response.created", "response": pending},
        {"type": "response.output_item.added", "output_index": 0, "item": msg},
        {"type": "response.output_text.delta", **at, "delta": "Who"},
        {"type": end, "response": {**pending, "status": status, "output": [done]}},
    )
    res = openai.reassemble_stream(body)
    assert res is not None and res.message["output"] == [done]


def test_a_completed_responses_stream_keeps_none_of_its_item_events() -> None:
    """rev29c: every item event was kept, parsed, until the stream's end, which only a cut stream
    reads: a rebuild's peak memory doubled (a 100k-delta stream 77 MB against 44). A completed
    stream's peak is again what its bytes and their slices take; a cut one still has its text."""
    pending = PENDING_RESPONSE
    msg = {"id": "msg_1", "type": "message", "status": "in_progress", "content": [], "role": "assistant"}
    at = {"item_id": "msg_1", "output_index": 0, "content_index": 0}
    start = [
        {"type": "response.in_progress", "response": pending},
        {"type": "response.output_item.added", "output_index": 0, "item": msg},
        *(
            {"type": "response.output_text.delta", **at, "delta": " word", "logprobs": []}
            for _ in range(2000)
        ),
    ]
    part = {"type": "output_text", "text": " word" * 2000, "annotations": []}
    done = {**msg, "status": "completed", "content": [part]}
    completed = responses_events(
        *start,
        {"type": "response.output_item.done", "output_index": 0, "item": done},
        {"type": "response.completed", "response": {**pending, "status": "completed", "output": [done]}},
    )
    tracemalloc.start()
    try:
        res = openai.reassemble_stream(completed)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert res is not None and res.message["output"] == [done]
    assert peak < 3 * len(completed)  # 2.4x; 4.9x with the events kept
    res = openai.reassemble_stream(responses_events(*start))
    assert res is not None and res.message["output"] == [{**msg, "content": [part]}]


def test_openai_non_stream_and_embeddings_usage() -> None:
    u = openai.usage_from_body({"object": "chat.completion", "usage": OPENAI_USAGE})
    assert (u.source, u.prompt_tokens, u.completion_tokens, u.total_tokens) == ("provider", 120, 40, 160)
    assert (u.cached_tokens, u.reasoning_tokens) == (64, 12)
    e = openai.usage_from_body(
        {"object": "list", "data": [], "usage": {"prompt_tokens": 8, "total_tokens": 8}}
    )
    assert (e.source, e.prompt_tokens, e.completion_tokens, e.total_tokens) == ("provider", 8, None, 8)
    assert openai.usage_from_body({"object": "list"}).source == "missing"
    assert openai.usage_from_body([1, 2]).source == "missing"
    assert openai.usage_from_body({"usage": {"prompt_tokens": True}}).prompt_tokens is None


def test_openai_error_message() -> None:
    assert openai.error_message({"error": {"message": "Rate limit reached", "type": "requests"}}) == (
        "Rate limit reached"
    )
    assert openai.error_message({"ok": 1}) is None
    # OpenAI-compatible servers' own shapes (the record's error was None for them)
    vllm = {
        "object": "error",
        "message": "The model `x` does not exist.",
        "type": "NotFoundError",
        "code": 404,
    }
    assert openai.error_message(vllm) == "The model `x` does not exist."
    assert openai.error_message({"error": "model 'x' not found"}) == "model 'x' not found"  # Ollama
    mistral = {"object": "error", "message": {"detail": [{"msg": "Extra inputs are not permitted"}]}}
    assert "Extra inputs are not permitted" in (openai.error_message(mistral) or "")


# -- the stream-usage rewrite ------------------------------------------------------------------------


def test_inject_stream_usage() -> None:
    assert openai.inject_stream_usage(b'{"model":"m","messages":[]}') is None
    assert openai.inject_stream_usage(b'{"model":"m","stream":false}') is None
    assert openai.inject_stream_usage(b'{"stream":true,"stream_options":{"include_usage":true}}') is None
    assert openai.inject_stream_usage(b'{"stream": true, broken') is None
    assert openai.inject_stream_usage(b'["stream"]') is None
    out = openai.inject_stream_usage(
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"\xc3\xa9"}]}'
    )
    assert out is not None
    assert orjson.loads(out) == {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "é"}],
        "stream_options": {"include_usage": True},
    }
    out = openai.inject_stream_usage(
        b'{"stream":true,"stream_options":{"include_usage":false,"include_obfuscation":false}}'
    )
    assert out is not None
    assert orjson.loads(out)["stream_options"] == {"include_usage": True, "include_obfuscation": False}
    # vLLM's per-chunk usage: asked for alone it does nothing, with `include_usage` it would put
    # usage on every chunk the client gets (an outside check): the request goes as written
    assert (
        openai.inject_stream_usage(b'{"stream":true,"stream_options":{"continuous_usage_stats":true}}')
        is None
    )


def test_stripper_restores_the_plain_stream_at_every_split() -> None:
    with_usage = openai_tool_stream(usage_null=True)
    plain = openai_tool_stream(usage_null=False)
    assert with_usage != plain
    # every two-piece split, including splits inside markers and inside the "\n\n"
    for cut in range(len(with_usage) + 1):
        s = openai.UsageChunkStripper()
        out = s.feed(with_usage[:cut]) + s.feed(with_usage[cut:]) + s.flush()
        assert out == plain, cut
    # byte by byte
    s = openai.UsageChunkStripper()
    out = b"".join(s.feed(with_usage[i : i + 1]) for i in range(len(with_usage))) + s.flush()
    assert out == plain


def test_stripper_restores_crlf_and_usage_first_streams_at_every_split() -> None:
    """sse-starlette frames events with CRLF: a read ending in `\r\n\r` took the lone CR for
    the blank line and the next read's LF went with the usage chunk (the client got
    `}\r\n\rdata: [DONE]`). A server writing `{"usage":null,...}` first kept it in every chunk."""
    crlf = (
        openai_tool_stream(usage_null=True).replace(b"\n", b"\r\n"),
        openai_tool_stream(usage_null=False).replace(b"\n", b"\r\n"),
    )
    first = (
        openai_tool_stream(usage_null=True)
        .replace(b',"usage":null', b"")
        .replace(b"data: {", b'data: {"usage":null,'),
        openai_tool_stream(usage_null=False),
    )
    assert first[0].count(b'{"usage":null,') > 3
    for with_usage, plain in (crlf, first):
        assert with_usage != plain
        for cut in range(len(with_usage) + 1):
            s = openai.UsageChunkStripper()
            assert s.feed(with_usage[:cut]) + s.feed(with_usage[cut:]) + s.flush() == plain, cut


def _spaced(stream: bytes) -> bytes:
    """The same events written by `json.dumps` with its default spacing (`"usage": null`)."""
    out = []
    for line in stream.split(b"\n"):
        if line.startswith(b"data: {"):
            line = b"data: " + json.dumps(json.loads(line[6:])).encode()
        out.append(line)
    return b"\n".join(out)


def test_stripper_restores_a_stream_written_with_spaces() -> None:
    """Some OpenAI-compatible servers write JSON with spaces: the usage chunk we asked for got
    through to the client (a `choices: []` chunk its `chunk.choices[0]` loop failed on)."""
    with_usage, plain = (
        _spaced(openai_tool_stream(usage_null=True)),
        _spaced(openai_tool_stream(usage_null=False)),
    )
    assert b'"usage": null' in with_usage and b'"choices": []' in with_usage
    for cut in range(0, len(with_usage) + 1, 7):
        s = openai.UsageChunkStripper()
        assert s.feed(with_usage[:cut]) + s.feed(with_usage[cut:]) + s.flush() == plain, cut


def test_stripper_keeps_usage_text_inside_content() -> None:
    # a model that *writes* the marker text: inside a JSON string the quotes are escaped
    tricky = sse(chunk({"content": 'say ,"usage":null and "choices":[] please'}, usage_null=True))
    s = openai.UsageChunkStripper()
    out = s.feed(tricky) + s.flush()
    assert out == sse(chunk({"content": 'say ,"usage":null and "choices":[] please'}))


def test_sse_boundaries() -> None:
    assert last_boundary(b"data: a\n\ndata: b") == 9
    assert last_boundary(b"data: a\r\n\r\ndata: b\r\n\r\n") == 22
    assert last_boundary(b"data: a\n") == -1
    assert last_boundary(b"data: a\r\r") == 9  # CR framing: released at once, not a read late
    assert last_boundary(b"data: a\r\n\r\ndata: b\r\n\r") == 11  # CRLF: that last CR may be half
    data = b"data: a\n\ndata: b\r\n\r\ndata: c"
    assert split_events(data) == [b"data: a\n\n", b"data: b\r\n\r\n", b"data: c"]


# -- Anthropic ------------------------------------------------------------------------------------


def ev(name: str, obj: dict[str, object]) -> bytes:
    return (
        b"event: " + name.encode() + b"\ndata: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"
    )


ANTHROPIC_START_USAGE = {
    "input_tokens": 25,
    "cache_creation_input_tokens": 100,
    "cache_read_input_tokens": 2000,
    "output_tokens": 1,
    "service_tier": "standard",
}


def anthropic_stream(delta_usage: dict[str, object]) -> bytes:
    message: dict[str, object] = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": ANTHROPIC_START_USAGE,
    }
    parts = [
        ev("message_start", {"type": "message_start", "message": message}),
        ev(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "thinking", "thinking": ""},
            },
        ),
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": "Let me"},
            },
        ),
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "thinking_delta", "thinking": " think."},
            },
        ),
        ev(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "signature_delta", "signature": "EqQB"},
            },
        ),
        ev("content_block_stop", {"type": "content_block_stop", "index": 0}),
        b'event: ping\ndata: {"type": "ping"}\n\n',
        ev(
            "content_block_start",
            {"type": "content_block_start", "index": 1, "content_block": {"type": "text", "text": ""}},
        ),
        ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": "Checking"}},
        ),
        ev(
            "content_block_delta",
            {"type": "content_block_delta", "index": 1, "delta": {"type": "text_delta", "text": " now."}},
        ),
        ev("content_block_stop", {"type": "content_block_stop", "index": 1}),
        ev(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 2,
                "content_block": {"type": "tool_use", "id": "toolu_01", "name": "get_weather", "input": {}},
            },
        ),
    ]
    for frag in ["", '{"location":', ' "San Fra', 'ncisco, CA"', ', "unit": "c"}']:
        parts.append(
            ev(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 2,
                    "delta": {"type": "input_json_delta", "partial_json": frag},
                },
            )
        )
    parts += [
        ev("content_block_stop", {"type": "content_block_stop", "index": 2}),
        ev(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                "usage": delta_usage,
            },
        ),
        ev("message_stop", {"type": "message_stop"}),
    ]
    return b"".join(parts)


@pytest.mark.parametrize(
    "delta_usage",
    [
        {"output_tokens": 89},
        # newer API versions repeat the (cumulative) input counts in message_delta
        {
            "input_tokens": 25,
            "cache_creation_input_tokens": 100,
            "cache_read_input_tokens": 2000,
            "output_tokens": 89,
        },
    ],
)
def test_anthropic_stream_reassembly_and_usage(delta_usage: dict[str, object]) -> None:
    res = anthropic.reassemble_stream(anthropic_stream(delta_usage))
    assert res is not None
    msg = res.message
    assert msg["id"] == "msg_01" and msg["model"] == "claude-sonnet-4-5"
    assert msg["stop_reason"] == "tool_use" and msg["stop_sequence"] is None
    assert msg["content"] == [
        {"type": "thinking", "thinking": "Let me think.", "signature": "EqQB"},
        {"type": "text", "text": "Checking now."},
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"location": "San Francisco, CA", "unit": "c"},
        },
    ]
    u = res.usage
    assert u.source == "provider"
    # prompt = input + cache read + cache write; total = prompt + output (module docstring)
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (2125, 89, 2214)
    assert (u.cached_tokens, u.cache_write_tokens) == (2000, 100)
    assert res.model == "claude-sonnet-4-5"


def test_anthropic_cut_stream_keeps_partial_tool_input() -> None:
    full = anthropic_stream({"output_tokens": 5})
    cut = full[: full.rindex(b"event:", 0, full.index(b"ncisco"))]  # cut before that event
    res = anthropic.reassemble_stream(cut)
    assert res is not None
    tool = res.message["content"][2]
    assert tool["input"] == '{"location": "San Fra'
    assert res.usage.completion_tokens == 1  # only message_start's placeholder arrived
    assert res.message["stop_reason"] is None


def test_a_stream_cut_after_its_final_usage_is_priced_on_it() -> None:
    """Found by the failed-requests check: a stream cut after the event that carries the final
    counts (OpenAI's usage chunk, Anthropic's `message_delta`) and before its end marker was
    recorded `partial` and left unpriced, though those are the counts the provider bills."""
    whole = openai_tool_stream(usage_null=True)
    cut = whole[: -len(b"data: [DONE]\n\n")]
    got = openai.reassemble_stream(cut)
    assert got is not None and not got.complete
    usage, outcome, _ = got.settle("upstream_cut", "cut")
    assert (usage.source, usage.prompt_tokens, usage.completion_tokens, outcome) == (
        "provider", 120, 40, "upstream_cut"
    )  # fmt: skip
    # Before the usage chunk, or with usage on every chunk (continuous counts), they stay partial.
    before = whole[: whole.index(b'"choices":[]') - 200]
    continuous = sse(
        {**chunk({"content": "a"}), "usage": OPENAI_USAGE}, {**chunk({"content": "b"}), "usage": OPENAI_USAGE}
    )
    usage_first = sse(  # a usage chunk first (prompt only), then content, then the cut
        {**{k: v for k, v in chunk({}).items() if k != "choices"}, "choices": [], "usage": OPENAI_USAGE},
        chunk({"content": "a"}),
    )
    for raw in (before, continuous, usage_first):
        res = openai.reassemble_stream(raw[: raw.rindex(b"\n\n") + 2])
        assert res is not None
        assert res.settle("upstream_cut", "cut")[0].source in ("partial", "missing")
    full = anthropic_stream({"output_tokens": 5})
    stop = full.rindex(b"event: message_stop")
    res = anthropic.reassemble_stream(full[:stop])  # message_delta came, message_stop did not
    assert res is not None and not res.complete
    usage, _, _ = res.settle("upstream_cut", "cut")
    assert (usage.source, usage.completion_tokens) == ("provider", 5)
    res = anthropic.reassemble_stream(full[: full.rindex(b"event: message_delta")])
    assert res is not None and res.settle("upstream_cut", "cut")[0].source == "partial"


def test_anthropic_error_event() -> None:
    body = ev("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    res = anthropic.reassemble_stream(body)
    assert res is not None and res.error == "Overloaded"


def a_events(*objs: dict[str, object]) -> bytes:
    """A Messages stream of `objs`, each named by its `type`."""
    return b"".join(ev(str(o["type"]), o) for o in objs)


A_START = {"type": "message_start", "message": {"id": "m", "role": "assistant", "model": "c", "content": []}}


def a_block(index: object, block: dict[str, object]) -> dict[str, object]:
    return {"type": "content_block_start", "index": index, "content_block": block}


def a_delta(index: object, delta: dict[str, object]) -> dict[str, object]:
    return {"type": "content_block_delta", "index": index, "delta": delta}


def test_an_anthropic_stream_with_odd_blocks_is_rebuilt_not_raised() -> None:
    """rev30c: a text block whose `citations` is null (the SDK accepts it) raised on its
    `citations_delta`; a list or dict `index` (unhashable) or block `type` raised too. A raise
    cost the record its message (and, at the gateway, its usage)."""
    cite = {"type": "char_location", "cited_text": "x"}
    for citations in (None, "s", 5):
        res = anthropic.reassemble_stream(
            a_events(
                A_START,
                a_block(0, {"type": "text", "text": "", "citations": citations}),
                a_delta(0, {"type": "citations_delta", "citation": cite}),
                a_delta(0, {"type": "text_delta", "text": "hi"}),
            )
        )
        assert res is not None
        assert res.message["content"] == [{"type": "text", "text": "hi", "citations": [cite]}]
    for index in ([0], {"i": 0}):
        res = anthropic.reassemble_stream(
            a_events(
                A_START,
                a_block(index, {"type": "text", "text": ""}),
                a_delta(index, {"type": "text_delta", "text": "hi"}),
            )
        )
        assert res is not None and res.message["content"] == [{"type": "text", "text": "hi"}]
    for btype in ([1], {"a": 1}):
        res = anthropic.reassemble_stream(a_events(A_START, a_block(0, {"type": btype})))
        assert res is not None and res.message["content"] == [{"type": btype}]


def test_an_anthropic_stream_is_rebuilt_as_the_sdk_does() -> None:
    """rev30c: a `message_delta` with `container: null` erased `message_start`'s container (the
    SDK sets it only when not null; the stop members as they come); two `signature_delta`s on
    one block were joined (the SDK replaces the signature)."""
    container = {"id": "c1", "expires_at": "2025-01-01T00:00:00Z"}
    start = dict(A_START, message={**A_START["message"], "container": container, "stop_sequence": "x"})
    res = anthropic.reassemble_stream(
        a_events(
            start,
            a_block(0, {"type": "thinking", "thinking": "", "signature": ""}),
            a_delta(0, {"type": "signature_delta", "signature": "AAA"}),
            a_delta(0, {"type": "signature_delta", "signature": "BBB"}),
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None, "container": None},
            },
        )
    )
    assert res is not None
    assert res.message["container"] == container
    assert (res.message["stop_reason"], res.message["stop_sequence"]) == ("end_turn", None)
    assert res.message["content"] == [{"type": "thinking", "thinking": "", "signature": "BBB"}]


def test_anthropic_non_stream_usage() -> None:
    body = {
        "id": "msg_01",
        "type": "message",
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 50,
            "output_tokens": 7,
        },
    }
    u = anthropic.usage_from_body(body)
    assert (u.source, u.prompt_tokens, u.completion_tokens, u.total_tokens) == ("provider", 60, 7, 67)
    assert (u.cached_tokens, u.cache_write_tokens) == (50, 0)
    assert anthropic.usage_from_body({"input_tokens": 12}).source == "missing"  # count_tokens reply
    assert anthropic.error_message({"type": "error", "error": {"type": "x", "message": "bad"}}) == "bad"


def test_data_payloads_fast_and_general_paths_agree() -> None:
    fast = sse({"a": 1}, {"b": "x\\ny"}) + b"data: [DONE]\n\n"
    assert data_payloads(fast) == [b'{"a":1}', b'{"b":"x\\\\ny"}', b"[DONE]"]
    assert data_payloads(fast) == [d for _, d in iter_events(fast)]
    mixed = b'event: e\ndata: {"a":1}\n\n: ping\n\ndata: 2\ndata: 3\n\ndata: {"cut'
    assert data_payloads(mixed) == [b'{"a":1}', b"2\n3", b'{"cut']
    assert data_payloads(fast.replace(b"\n", b"\r\n")) == data_payloads(fast)


def test_stream_end_markers() -> None:
    full = openai_tool_stream()
    res = openai.reassemble_stream(full)
    assert res is not None and res.complete
    res = openai.reassemble_stream(full[: full.index(b"data: [DONE]")])
    assert res is not None and not res.complete
    a = anthropic_stream({"output_tokens": 3})
    res = anthropic.reassemble_stream(a)
    assert res is not None and res.complete
    res = anthropic.reassemble_stream(a[: a.index(b"event: message_stop")])
    assert res is not None and not res.complete


def test_openai_fast_and_general_paths_agree() -> None:
    from llmtap.providers.openai import _all_chunks

    stream = openai_tool_stream()
    assert _all_chunks(stream) is not None  # the one-call path takes a plain stream
    for variant in (
        b": keep-alive\n\n" + stream,  # a comment line
        stream.replace(b"\n\n", b"\r\n\r\n"),  # CRLF framing
        stream[: stream.index(b"data: [DONE]")] + b'data: {"choices": [{"index": "0"}]}\n\n',  # odd types
    ):
        assert _all_chunks(variant) is None
    fast = openai.reassemble_stream(stream)
    slow = openai.reassemble_stream(b": keep-alive\n\n" + stream)
    assert fast is not None and slow is not None
    assert (fast.message, fast.usage, fast.model, fast.error, fast.complete) == (
        slow.message,
        slow.usage,
        slow.model,
        slow.error,
        slow.complete,
    )
    cut = openai.reassemble_stream(stream[: stream.index(b"data: [DONE]") - 30])
    assert cut is not None and not cut.complete and cut.usage.source == "missing"


def test_streamed_function_call_logprobs_annotations_and_audio_on_both_paths() -> None:
    """rev28c: what only some chat streams carry (the legacy `function_call`, `logprobs`,
    `annotations`, `audio`) is rebuilt the same by the one-call decoder and the general path
    (which takes a stream with a comment); a legacy completion's logprobs lists are joined."""
    tok = {"token": "a", "logprob": -1.0, "bytes": [97], "top_logprobs": []}
    events = [
        chunk({"role": "assistant", "content": None, "function_call": {"name": "f", "arguments": ""}}),
        chunk({"function_call": {"arguments": '{"x":'}, "annotations": [{"type": "url_citation"}]}),
        chunk(
            {"function_call": {"arguments": "1}"}, "audio": {"id": "au_1", "data": "AB", "transcript": "a"}}
        ),
        chunk({"audio": {"data": "CD", "transcript": "b", "expires_at": 5}}),
        chunk({}, "function_call"),
    ]
    events[1]["choices"][0]["logprobs"] = {"content": [tok], "refusal": None}  # type: ignore[index]
    events[2]["choices"][0]["logprobs"] = {"content": [tok], "refusal": None}  # type: ignore[index]
    stream = sse(*events) + b"data: [DONE]\n\n"
    want = {
        "index": 0,
        "message": {
            "role": "assistant",
            "content": None,
            "function_call": {"name": "f", "arguments": '{"x":1}'},
            "annotations": [{"type": "url_citation"}],
            "audio": {"id": "au_1", "data": "ABCD", "expires_at": 5, "transcript": "ab"},
        },
        "logprobs": {"content": [tok, tok], "refusal": None},
        "finish_reason": "function_call",
    }
    for raw in (stream, b": keep-alive\n\n" + stream):
        res = openai.reassemble_stream(raw)
        assert res is not None and res.message["choices"] == [want]

    def legacy_chunk(n: int, t: str) -> dict[str, object]:
        lp = {"tokens": [t], "token_logprobs": [-0.5], "top_logprobs": None, "text_offset": [n]}
        choice = {"index": 0, "text": t, "finish_reason": None, "logprobs": lp}
        return {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}

    legacy = [legacy_chunk(n, t) for n, t in enumerate("ab")]
    res = openai.reassemble_stream(sse(*legacy) + b"data: [DONE]\n\n")
    assert res is not None and res.message["choices"][0]["logprobs"] == {
        "tokens": ["a", "b"],
        "token_logprobs": [-0.5, -0.5],
        "top_logprobs": None,
        "text_offset": [0, 1],
    }


#: What a member can hold in odd JSON: nothing, numbers (one past 64 bits), a bool, strings,
#: and lists and objects of mixed members (`"".join` and a dict key both refuse some).
ODD: list[object] = [None, 0, -1, 2**70, 1.5, True, "", "x", [], ["a", 1], [1, 2], [[1]], {}, {"a": 1}]


def test_no_odd_member_of_an_openai_stream_raises_out_of_its_rebuild() -> None:
    """rev29c: `{"audio":{"id":["a",1]}}` raised a TypeError out of the rebuild (every list in the
    audio was joined), as a list or object as a choice's or tool call's `index` did (not a key):
    through the gateway the record lost its bodies and tokens. Each member of a chat stream and
    of a cut Responses stream, on both paths, holding each odd value: a result, and one that is
    JSON. The audio's own pieces are still joined, its other members kept as sent."""
    res = openai.reassemble_stream(sse(chunk({"audio": {"id": ["a", 1], "transcript": "hi"}})))
    assert res is not None and res.message["choices"][0]["message"]["audio"] == {
        "id": ["a", 1],
        "data": "",
        "expires_at": None,
        "transcript": "hi",
    }
    res = openai.reassemble_stream(sse(chunk({"audio": {"transcript": "hi", "extra": [1, 2]}})))
    assert res is not None and res.message["choices"][0]["message"]["audio"]["extra"] == [1, 2]

    call = {"index": 0, "id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    delta = {
        "role": "assistant",
        "content": "a",
        "refusal": "r",
        "reasoning_content": "t",
        "reasoning": "t",
        "tool_calls": [call],
        "function_call": {"name": "f", "arguments": "{}"},
        "annotations": [{"type": "url_citation"}],
        "audio": {"id": "au", "data": "AB", "expires_at": 1, "transcript": "a"},
    }
    lp = {"content": [{"token": "a"}], "refusal": None, "tokens": ["a"]}
    base = {**chunk(delta), "usage": {"prompt_tokens": 1, "completion_tokens": 1}}
    base["choices"][0] |= {"logprobs": lp, "text": "a"}  # type: ignore[index]

    def places(obj: object) -> list[tuple[object, object]]:
        """Every (container, key) in `obj`, depth first."""
        found: list[tuple[object, object]] = []
        keys = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
        for k, v in keys:
            found.append((obj, k))
            found.extend(places(v))
        return found

    pending = {"id": "r", "object": "response", "model": "m", "status": "in_progress", "output": []}
    at = {"output_index": 0, "content_index": 0, "summary_index": 0}
    cut = [
        {"type": "response.in_progress", "response": pending},
        {
            "type": "response.output_item.added",
            **at,
            "item": {"type": "message", "content": [], "summary": []},
        },
        {"type": "response.content_part.added", **at, "part": {"type": "output_text", "text": "a"}},
        {"type": "response.output_text.delta", **at, "delta": "b"},
        {"type": "response.reasoning_summary_part.added", **at, "part": {"type": "summary_text", "text": ""}},
        {"type": "response.reasoning_summary_text.delta", **at, "delta": "s"},
        {"type": "response.output_item.added", "output_index": 1, "item": {"type": "function_call"}},
        {"type": "response.function_call_arguments.delta", "output_index": 1, "delta": "{"},
        {"type": "response.function_call_arguments.done", "output_index": 1, "arguments": "{}"},
        {"type": "response.output_item.done", "output_index": 1, "item": {"type": "function_call"}},
    ]
    for events in ([base, base], cut):
        for n in range(len(places(events))):
            for value in ODD:
                odd = json.loads(json.dumps(events))
                where, key = places(odd)[n]
                where[key] = value  # type: ignore[index]
                stream = sse(*odd)
                for raw in (stream, b": ping\n\n" + stream):
                    res = openai.reassemble_stream(raw)
                    assert res is not None
                    orjson.loads(dumps(res.message))


# -- OpenAI-compatible servers' own spellings (an outside check of vLLM, DeepSeek, Groq ...) ----


def test_deepseek_cache_hits_are_cached_tokens() -> None:
    """DeepSeek reports its cache as `prompt_cache_hit_tokens`, billed at a tenth: read as
    nothing, its answers were priced ~1.9x too high."""
    u = openai.parse_usage(
        {
            "prompt_tokens": 1000,
            "completion_tokens": 20,
            "total_tokens": 1020,
            "prompt_cache_hit_tokens": 900,
            "prompt_cache_miss_tokens": 100,
        }
    )
    assert (u.prompt_tokens, u.cached_tokens) == (1000, 900)
    both_spellings = {
        "prompt_tokens": 1000,
        "prompt_tokens_details": {"cached_tokens": 0},
        "prompt_cache_hit_tokens": 900,
    }
    assert openai.parse_usage(both_spellings).cached_tokens == 900  # an explicit 0 beside the hits
    # OpenAI's own spelling wins where both are present
    both = {**OPENAI_USAGE, "prompt_cache_hit_tokens": 7}
    assert openai.parse_usage(both).cached_tokens == 64


@pytest.mark.parametrize("general", [False, True])
def test_streamed_reasoning_is_kept_under_its_own_name(general: bool) -> None:
    """DeepSeek's `reasoning_content` and OpenRouter's `reasoning` deltas were dropped from a
    stream's rebuilt message (so unsearchable), while the non-stream answer keeps them."""
    events = [
        chunk({"role": "assistant", "content": "", "reasoning_content": "Let me"}),
        chunk({"reasoning_content": " think."}),
        chunk({"content": "42"}, "stop"),
    ]
    body = sse(*events) + b"data: [DONE]\n\n"
    if general:
        body = b": keep-alive\n\n" + body
    res = openai.reassemble_stream(body)
    assert res is not None
    (choice,) = res.message["choices"]
    assert choice["message"] == {"role": "assistant", "content": "42", "reasoning_content": "Let me think."}
    other = openai.reassemble_stream(sse(chunk({"reasoning": "Hmm"}), chunk({"content": "ok"}, "stop")))
    assert other is not None
    assert other.message["choices"][0]["message"]["reasoning"] == "Hmm"


@pytest.mark.parametrize("general", [False, True])
def test_groq_usage_on_the_last_chunk(general: bool) -> None:
    """Groq puts a stream's usage in `x_groq.usage` on the chunk that finishes it."""
    last = chunk({}, "stop")
    last["x_groq"] = {
        "id": "req_1",
        "usage": {"prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35},
    }
    body = sse(chunk({"role": "assistant", "content": "hi"}), last) + b"data: [DONE]\n\n"
    if general:
        body = b": keep-alive\n\n" + body
    res = openai.reassemble_stream(body)
    assert res is not None
    assert (res.usage.source, res.usage.prompt_tokens, res.usage.completion_tokens) == ("provider", 30, 5)
    assert res.final
    # on a chunk that does not finish the stream, the counts are not the last word (a cut there)
    early = chunk({"content": "hi"})
    early["x_groq"] = last["x_groq"]
    cut = openai.reassemble_stream(b": x\n\n" * general + sse(chunk({"role": "assistant"}), early))
    assert cut is not None and cut.usage.prompt_tokens == 30 and not cut.final


def test_a_flat_error_event_mid_stream_is_the_stream_error() -> None:
    """vLLM's older servers end a failing stream with `{"object":"error","message":...}`: it
    read as a Responses API event (a string `type`) and the record said `completed`."""
    err = {
        "object": "error",
        "message": "maximum context length exceeded",
        "type": "BadRequestError",
        "code": 400,
    }
    res = openai.reassemble_stream(sse(chunk({"role": "assistant", "content": "a"}), err))
    assert res is not None and res.error == "maximum context length exceeded"


# -- Gemini ---------------------------------------------------------------------------------------


def gemini_sse(*objs: object) -> bytes:
    """Gemini's framing: `data: <compact JSON>` events ended by CRLF CRLF."""
    return b"".join(b"data: " + json.dumps(o, separators=(",", ":")).encode() + b"\r\n\r\n" for o in objs)


def test_gemini_usage_mapping() -> None:
    from llmtap.providers import gemini

    u = gemini.usage_from_body(
        {
            "usageMetadata": {
                "promptTokenCount": 1000,
                "candidatesTokenCount": 50,
                "cachedContentTokenCount": 600,
                "thoughtsTokenCount": 200,
                "toolUsePromptTokenCount": 30,
                "totalTokenCount": 1280,
            }
        }
    )
    assert (u.source, u.prompt_tokens, u.completion_tokens, u.total_tokens) == ("provider", 1030, 250, 1280)
    assert (u.cached_tokens, u.reasoning_tokens) == (600, 200)
    # A reply of thoughts only: no candidatesTokenCount at all.
    only = gemini.parse_usage({"promptTokenCount": 10, "thoughtsTokenCount": 5, "totalTokenCount": 15})
    assert (only.prompt_tokens, only.completion_tokens, only.total_tokens) == (10, 5, 15)
    assert gemini.usage_from_body({"totalTokens": 7}).source == "missing"  # countTokens is not usage
    assert gemini.model_from_path("/v1beta/models/gemini-2.5-pro:streamGenerateContent") == "gemini-2.5-pro"
    assert gemini.model_from_path("/v1beta/cachedContents") is None


def test_gemini_stream_reassembled() -> None:
    from llmtap.providers import gemini

    head = {"modelVersion": "gemini-2.5-flash", "responseId": "r1"}
    raw = gemini_sse(
        {
            "candidates": [
                {"content": {"parts": [{"text": "plan", "thought": True}], "role": "model"}, "index": 0}
            ],
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            **head,
        },
        {
            "candidates": [{"content": {"parts": [{"text": "Hel"}], "role": "model"}, "index": 0}],
            "usageMetadata": {"promptTokenCount": 9, "totalTokenCount": 9},
            **head,
        },
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": "lo"}, {"functionCall": {"name": "f", "args": {"a": 1}}}]},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 9,
                "candidatesTokenCount": 4,
                "thoughtsTokenCount": 3,
                "totalTokenCount": 16,
            },
            **head,
        },
    )
    res = gemini.reassemble_stream(raw)
    assert res is not None and res.complete and res.model == "gemini-2.5-flash"
    (cand,) = res.message["candidates"]
    assert cand["content"]["parts"] == [
        {"text": "plan", "thought": True},
        {"text": "Hello"},
        {"functionCall": {"name": "f", "args": {"a": 1}}},
    ]
    assert cand["finishReason"] == "STOP"
    assert (res.usage.prompt_tokens, res.usage.completion_tokens, res.usage.reasoning_tokens) == (9, 7, 3)
    # Cut before the last event: no finishReason, so not complete (the record marks it partial).
    cut = gemini.reassemble_stream(raw[: raw.rfind(b"data: ")])
    assert cut is not None and not cut.complete and cut.usage.completion_tokens == 0


def test_gemini_search_queries_are_merged_in_linear_time() -> None:
    """rev30c: a query was looked up in the list of those kept and the list copied per chunk:
    2 chunks of 30,000 queries (0.5 MB) took 27 s of CPU on the worker (0.04 s now). The bound is
    generous: it fails only on the quadratic merge. Duplicates, dicts among them, are kept once."""
    from llmtap.providers import gemini

    def chunk(queries: list[object]) -> dict[str, object]:
        return {"candidates": [{"groundingMetadata": {"webSearchQueries": queries}}]}

    n = 20_000
    chunks = [chunk([f"{p}{i}" for i in range(n)]) for p in "qr"]
    for read in (
        lambda: gemini.reassemble_stream(gemini_sse(*chunks)),
        lambda: gemini.usage_from_body(chunks),  # the chunks as one JSON array (no `alt=sse`)
    ):
        start = time.process_time()
        read()
        assert time.process_time() - start < 3  # quadratic: ~12 s
    res = gemini.reassemble_stream(
        gemini_sse(chunk(["a", {"q": 1, "r": 2}]), chunk([{"r": 2, "q": 1}, "b", "a", [1]]), chunk([[1]]))
    )
    assert res is not None
    meta = res.message["candidates"][0]["groundingMetadata"]
    assert meta["webSearchQueries"] == ["a", {"q": 1, "r": 2}, "b", [1]]


def test_gemini_text_is_joined_in_linear_time() -> None:
    """rev30c: each chunk's text was added to the part's with `+=`, a copy of the text so far:
    4 MB of 60-char chunks took 2-21 s of CPU (OpenAI's rebuild 0.1 s). The pieces are now
    joined once. The bound is generous: it fails only on the quadratic join."""
    from llmtap.providers import gemini

    piece = gemini_sse({"candidates": [{"content": {"parts": [{"text": "a" * 60}]}}]})
    thought = gemini_sse({"candidates": [{"content": {"parts": [{"text": "t" * 60, "thought": True}]}}]})
    n = 16_000_000 // len(piece)
    start = time.process_time()
    res = gemini.reassemble_stream(piece * n + thought * 2 + piece)
    assert time.process_time() - start < 5  # quadratic: 24 s and more (linear: ~0.7)
    assert res is not None
    assert res.message["candidates"][0]["content"]["parts"] == [
        {"text": "a" * 60 * n},
        {"text": "t" * 120, "thought": True},
        {"text": "a" * 60},
    ]


def test_gemini_text_parts_that_carry_a_thought_signature_are_kept_apart() -> None:
    """rev30c: text parts that each carry a `thoughtSignature` were merged into one keeping the
    last signature only (the SDK keeps each part: a signature signs its part)."""
    from llmtap.providers import gemini

    def parts(*ps: dict[str, object]) -> dict[str, object]:
        return {"candidates": [{"content": {"parts": list(ps), "role": "model"}}]}

    res = gemini.reassemble_stream(
        gemini_sse(
            parts({"text": "a", "thoughtSignature": "UzE="}),
            parts({"text": "b", "thoughtSignature": "UzI="}),
            parts({"text": "c"}),
            parts({"text": "d"}),
            parts({"text": "e", "thoughtSignature": "UzM="}),
        )
    )
    assert res is not None
    assert res.message["candidates"][0]["content"]["parts"] == [
        {"text": "a", "thoughtSignature": "UzE="},
        {"text": "b", "thoughtSignature": "UzI="},
        {"text": "cd"},
        {"text": "e", "thoughtSignature": "UzM="},
    ]


def test_an_aggregators_billed_cost_is_the_cost() -> None:
    """OpenRouter reports what it billed (`usage.cost`); the price table's list price missed its
    routing, caching and discounts (an outside check: $0.00021 recorded for a $0.0042 call)."""
    from datetime import UTC, datetime

    from llmtap.pricing import apply_cost
    from llmtap.record import LogRecord

    def priced(usage: dict[str, object], model: str = "openai/gpt-4o-mini") -> LogRecord:
        now = datetime.now(UTC)
        rec = LogRecord(
            id="r1", provider="openrouter", target_url="https://openrouter.ai/api/v1/chat/completions",
            method="POST", path="/v1/chat/completions", model=model, started_at=now, ended_at=now,
            latency_ms=1.0, status=200, usage=openai.parse_usage(usage),
        )  # fmt: skip
        apply_cost(rec)
        return rec

    base = {"prompt_tokens": 1000, "completion_tokens": 100, "total_tokens": 1100}
    rec = priced({**base, "cost": 0.0042})
    assert (rec.cost_usd, rec.cost_nanos, rec.price_version) == (0.0042, 4_200_000, "billed by openrouter")
    # a model the table does not know is priced too
    assert priced({**base, "cost": 0.001}, model="someone/new-model-9000").cost_nanos == 1_000_000
    # with the client's own key, `cost` is the fee; the provider billed the rest to that key
    byok = {**base, "cost": 0.0002, "is_byok": True, "cost_details": {"upstream_inference_cost": 0.004}}
    assert priced(byok).cost_nanos == 4_200_000
    # no figure, or a figure that is none: the price table as before
    table = priced(base).cost_nanos
    assert table == 210_000  # gpt-4o-mini via OpenRouter: input 0.15, output 0.60 per 1M
    for odd in (True, -1, float("nan"), "0.1", 1e12, None):
        assert priced({**base, "cost": odd}).cost_nanos == table, odd
    assert priced({**base, "cost": 0.1, "is_byok": True}).cost_nanos == table  # fee without the rest
    huge = {**base, "cost": 9e5, "is_byok": True, "cost_details": {"upstream_inference_cost": 9e5}}
    assert openai.parse_usage(huge).billed_usd is None  # each a charge, their sum none (ingest refused it)
    assert priced({**base, "cost": 0}).cost_nanos == 0  # a free model


def test_an_anthropic_stream_with_an_emoji_split_over_two_deltas_keeps_the_emoji() -> None:
    """The halves of a surrogate pair in two `text_delta`s: each event alone is JSON only a
    lenient parser reads; joined, they are the emoji the client's SDK shows (review)."""

    def delta(text: bytes) -> bytes:
        return (
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"' + text + b'"}}\n\n'
        )

    raw = anthropic_stream({"output_tokens": 5})
    cut = raw.index(b"event: content_block_stop")
    raw = raw[:cut] + delta(b"a \\ud83d") + delta(b"\\ude00 b") + raw[cut:]
    res = anthropic.reassemble_stream(raw)
    assert res is not None
    assert res.message["content"][0]["thinking"].endswith("a \U0001f600 b"), res.message["content"]


def test_bodies_only_a_lenient_parse_reads_are_sent_on_unchanged_and_never_raise() -> None:
    """The stream-usage rewrite parsed such a request leniently and sent it re-encoded (`NaN`
    as null, a lone surrogate as U+FFFD); a refusal's 700-deep body raised RecursionError from
    the scrub (a 500 and no record, review)."""
    from llmtap.providers.common import loads
    from llmtap.providers.openai import inject_stream_usage, refuses_stream_options

    for body in (
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"hi \\ud83d"}]}',
        b'{"model":"m","stream":true,"temperature":NaN}',
        b'{"model":"m","stream":true,"messages":[{"role":"user","content":"\xff\xfe"}]}',
    ):
        assert inject_stream_usage(body) is None  # sent as the client wrote it
    deep = b'{"error":' * 700 + b'"stream_options \\ud83d"' + b"}" * 700
    assert refuses_stream_options(deep) in (True, False)
    assert isinstance(loads(b'{"a":' * 900 + b'"\\ud83d"' + b"}" * 900), dict)


def test_gemini_keeps_a_chunks_repeated_search_queries_as_a_non_streamed_answer_does() -> None:
    """rev31: 5c95511 merged the first chunk's queries too, so two equal queries became one and
    the stream was billed one search less than the same answer not streamed."""
    from llmtap.providers import gemini

    def chunk(queries: list[object]) -> dict[str, object]:
        return {"candidates": [{"groundingMetadata": {"webSearchQueries": queries}}]}

    one = chunk(["weather paris today", "weather paris today"])
    res = gemini.reassemble_stream(gemini_sse(one))
    assert res is not None
    assert res.message["candidates"][0]["groundingMetadata"]["webSearchQueries"] == [
        "weather paris today",
        "weather paris today",
    ]
    res = gemini.reassemble_stream(gemini_sse(chunk(["a", "a"]), chunk(["a", "b"])))
    assert res is not None
    assert res.message["candidates"][0]["groundingMetadata"]["webSearchQueries"] == ["a", "a", "b"]
