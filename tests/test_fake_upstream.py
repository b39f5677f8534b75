"""The fake upstream must be indistinguishable from the real providers to the official SDKs.

Every other gateway test trusts it, so these tests point the real ``openai`` / ``anthropic`` clients
straight at it and check parsing, usage, errors, truncation and the test-control headers.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx2
import openai
import pytest

from fake_thread import FakeUpstream
from llmtap.testing.fake_upstream import (
    PROMPT_OVERHEAD,
    REASONING_TOKENS,
    expected_usage,
    reply_text,
)

MESSAGES: list[Any] = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "hello there general kenobi"},
]
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "weather for a city",
            "parameters": {"type": "object", "properties": {"text": {"type": "string"}}},
        },
    }
]
ANTHROPIC_TOOLS: list[Any] = [
    {"name": "get_weather", "description": "weather", "input_schema": {"type": "object"}}
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream() as server:
        yield server


@pytest.fixture()
def oai(fake: FakeUpstream) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(api_key="sk-test", base_url=f"{fake.url}/v1", max_retries=0, timeout=10)
    yield client
    client.close()


@pytest.fixture()
def claude(fake: FakeUpstream) -> Iterator[anthropic.Anthropic]:
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url=fake.url, max_retries=0, timeout=10)
    yield client
    client.close()


def raw(
    fake: FakeUpstream,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP round trip, for checks the SDKs would hide (absent keys, raw bytes, truncation)."""
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead as exc:
            data = b"<<incomplete>>" + bytes(exc.partial)
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
    finally:
        conn.close()


def openai_usage(prompt: int, completion: int, cached: int = 0, reasoning: int = 0) -> dict[str, Any]:
    """The usage object OpenAI sends, with fixed counts: the expected values are written here,
    not computed by the fake's own `expected_usage` (which could never disagree with itself)."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": reasoning,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def anthropic_usage(input_tokens: int, output: int, *, read: int = 0, write: int = 0) -> dict[str, Any]:
    """Anthropic's usage object (input excludes cache reads and writes), fixed counts."""
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": write,
        "cache_read_input_tokens": read,
        "cache_creation": {"ephemeral_5m_input_tokens": write, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output,
        "service_tier": "standard",
    }


def sse_data(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


# ---------------------------------------------------------------------------------------------- OpenAI


def test_chat_non_stream_parses_and_usage_matches(oai: openai.OpenAI) -> None:
    req: dict[str, Any] = {"model": "gpt-4o-mini", "messages": MESSAGES}
    completion = oai.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == "echo: hello there general kenobi"
    assert completion.choices[0].message.content == reply_text("openai", req)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == openai_usage(6 + PROMPT_OVERHEAD, 5)
    assert completion.usage.prompt_tokens == 6 + PROMPT_OVERHEAD
    assert completion.usage.completion_tokens == 5


def test_chat_max_tokens_truncates_with_length(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=2)
    assert completion.choices[0].message.content == "echo: hello"
    assert completion.choices[0].finish_reason == "length"


def test_chat_stream_without_include_usage(oai: openai.OpenAI, fake: FakeUpstream) -> None:
    chunks = list(oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "echo: hello there general kenobi"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.usage is None for c in chunks)
    # On the wire the key must be absent (not null) when include_usage was not requested.
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True}).encode()
    status, headers, data = raw(fake, "POST", "/v1/chat/completions", body, {"Authorization": "Bearer k"})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = sse_data(data)
    assert events[-1] == "[DONE]" and data.endswith(b"data: [DONE]\n\n")
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_chat_stream_with_include_usage(oai: openai.OpenAI) -> None:
    req: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chunks = list(oai.chat.completions.create(**req))
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == openai_usage(6 + PROMPT_OVERHEAD, 5)
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-2].choices[0].finish_reason == "stop"


def test_chat_stream_helper_final_completion(oai: openai.OpenAI) -> None:
    with oai.chat.completions.stream(
        model="gpt-4o",
        messages=MESSAGES,
        stream_options={"include_usage": True},
    ) as stream:
        final = stream.get_final_completion()
    assert final.choices[0].message.content == "echo: hello there general kenobi"
    assert final.usage is not None and final.usage.total_tokens == final.usage.prompt_tokens + 5


def test_tool_calls_non_stream(oai: openai.OpenAI) -> None:
    completion = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, tools=TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"text": "hello there general kenobi"}
    assert completion.usage is not None
    assert completion.usage.model_dump(exclude_none=True) == openai_usage(6 + PROMPT_OVERHEAD, 9)


def test_tool_calls_stream_helper(oai: openai.OpenAI) -> None:
    with oai.chat.completions.stream(model="gpt-4o", messages=MESSAGES, tools=TOOLS) as stream:
        names = [e.name for e in stream if e.type == "tool_calls.function.arguments.done"]
        final = stream.get_final_completion()
    assert names == ["get_weather"]
    calls = final.choices[0].message.tool_calls
    assert calls is not None and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"text": "hello there general kenobi"}
    assert final.choices[0].finish_reason == "tool_calls"


def test_tool_result_turn_answers_with_text(oai: openai.OpenAI) -> None:
    messages = [
        *MESSAGES,
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    completion = oai.chat.completions.create(model="gpt-4o", messages=messages, tools=TOOLS)
    assert completion.choices[0].message.content == "tool result: sunny"
    assert completion.choices[0].finish_reason == "stop"


def test_reasoning_and_cached_tokens(oai: openai.OpenAI) -> None:
    headers = {"x-fake-cached-tokens": "40"}
    req: dict[str, Any] = {"model": "o4-mini", "messages": MESSAGES}
    completion = oai.chat.completions.create(**req, extra_headers=headers)
    usage = completion.usage
    assert usage is not None and usage.completion_tokens_details and usage.prompt_tokens_details
    assert usage.completion_tokens_details.reasoning_tokens == REASONING_TOKENS
    assert usage.prompt_tokens_details.cached_tokens == 40
    assert usage.model_dump(exclude_none=True) == openai_usage(
        6 + PROMPT_OVERHEAD + 40, 5 + REASONING_TOKENS, 40, REASONING_TOKENS
    )
    plain = oai.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert plain.usage is not None and plain.usage.completion_tokens_details is not None
    assert plain.usage.completion_tokens_details.reasoning_tokens == 0


def test_embeddings_default_base64_and_float(oai: openai.OpenAI, fake: FakeUpstream) -> None:
    fake.clear()
    result = oai.embeddings.create(model="text-embedding-3-small", input=["hello world", "bye"])
    assert json.loads(base64.b64decode(fake.requests()[-1]["body_b64"]))["encoding_format"] == "base64"
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 1536
    assert all(isinstance(v, float) for v in result.data[0].embedding)
    assert result.usage.prompt_tokens == 3
    assert result.usage.model_dump() == {"prompt_tokens": 3, "total_tokens": 3}
    floats = oai.embeddings.create(
        model="text-embedding-3-small", input="hello world", encoding_format="float", dimensions=8
    )
    assert len(floats.data[0].embedding) == 8
    again = oai.embeddings.create(model="text-embedding-3-small", input="hello world", dimensions=8)
    assert again.data[0].embedding == floats.data[0].embedding  # base64 and float agree


def test_models_list(oai: openai.OpenAI, claude: anthropic.Anthropic) -> None:
    assert "gpt-4o-mini" in [m.id for m in oai.models.list()]
    assert all(m.type == "model" for m in claude.models.list())


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, openai.BadRequestError),
        (401, openai.AuthenticationError),
        (429, openai.RateLimitError),
        (500, openai.InternalServerError),
    ],
)
def test_openai_errors_map_to_sdk_exceptions(oai: openai.OpenAI, status: int, exc: type[Exception]) -> None:
    with pytest.raises(exc) as info:
        oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={"x-fake-status": str(status)},
        )
    err = info.value
    assert isinstance(err, openai.APIStatusError) and err.status_code == status
    assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    if status == 429:
        assert err.response.headers["retry-after"] == "7"
        assert err.response.headers["x-ratelimit-remaining-requests"] == "0"
        assert err.code == "rate_limit_exceeded"


def test_openai_missing_auth_and_bad_json(fake: FakeUpstream) -> None:
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES}).encode()
    status, _, data = raw(fake, "POST", "/v1/chat/completions", body)
    assert status == 401
    assert json.loads(data)["error"]["type"] == "invalid_request_error"
    fake.clear()
    garbage = b'{"model": "gpt-4o", "messages": [\x00\xff nope'
    status, _, data = raw(fake, "POST", "/v1/chat/completions", garbage, {"Authorization": "Bearer k"})
    assert status == 400
    assert json.loads(data)["error"]["type"] == "invalid_request_error"
    assert base64.b64decode(fake.requests()[-1]["body_b64"]) == garbage


def test_openai_stream_options_without_stream_is_rejected(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream_options={"include_usage": True},
        )


def test_openai_cut_stream_raises(oai: openai.OpenAI, fake: FakeUpstream) -> None:
    received: list[str] = []
    with pytest.raises(openai.APIConnectionError):
        for chunk in oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            extra_headers={"x-fake-cut-after": "3"},
        ):
            received.append(chunk.choices[0].delta.content or "")
    assert received == ["", "echo:", " hello"]
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True}).encode()
    headers = {"Authorization": "Bearer k", "x-fake-cut-after": "3"}
    _, _, data = raw(fake, "POST", "/v1/chat/completions", body, headers)
    assert data.startswith(b"<<incomplete>>") and b"[DONE]" not in data


def test_openai_cut_non_stream_raises(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIConnectionError):
        oai.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            extra_headers={"x-fake-cut-after": "50"},
        )


def test_openai_in_stream_error_event(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.APIError, match="server had an error"):
        list(
            oai.chat.completions.create(
                model="gpt-4o",
                messages=MESSAGES,
                stream=True,
                extra_headers={"x-fake-stream-error": "2"},
            )
        )


# -------------------------------------------------------------------------------- OpenAI Responses API

RESPONSES_INPUT: list[Any] = [
    {"role": "user", "content": [{"type": "input_text", "text": "what is the weather"}]}
]
# "be brief" (2) + "what is the weather" (4) + PROMPT_OVERHEAD; reply "echo: what is the weather" (5).
RESPONSES_PROMPT, RESPONSES_REPLY = 2 + 4 + PROMPT_OVERHEAD, 5
RESPONSES_KNOBS = {"x-fake-cached-tokens": "40", "x-fake-reasoning-tokens": "30", "x-fake-web-searches": "2"}


def responses_usage(
    prompt: int, output: int, cached: int = 0, reasoning: int = 0, write: int = 0
) -> dict[str, Any]:
    """A Responses API usage object with fixed counts (input includes cache reads and writes)."""
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": write},
        "output_tokens": output,
        "output_tokens_details": {"reasoning_tokens": reasoning},
        "total_tokens": prompt + output,
    }


KNOBBED_USAGE = responses_usage(RESPONSES_PROMPT + 40, RESPONSES_REPLY + 30, cached=40, reasoning=30)


def test_responses_non_stream_parses_and_validates(oai: openai.OpenAI, fake: FakeUpstream) -> None:
    from openai.types.responses import Response

    r = oai.responses.create(
        model="gpt-5", instructions="be brief", input=RESPONSES_INPUT, extra_headers=RESPONSES_KNOBS
    )
    assert r.object == "response" and r.status == "completed" and r.model == "gpt-5"
    assert r.output_text == "echo: what is the weather"
    assert [o.type for o in r.output] == ["reasoning", "web_search_call", "web_search_call", "message"]
    assert r.usage is not None
    assert r.usage.model_dump(exclude_none=True) == KNOBBED_USAGE
    req = {"model": "gpt-5", "instructions": "be brief", "input": RESPONSES_INPUT}
    assert expected_usage("openai-responses", req, RESPONSES_KNOBS) == KNOBBED_USAGE
    assert reply_text("openai-responses", req) == r.output_text
    # The wire body passes the SDK's own types with validation (the client above only constructs).
    body = json.dumps({"model": "gpt-5", "input": "hello there"}).encode()
    status, headers, data = raw(fake, "POST", "/v1/responses", body, {"Authorization": "Bearer k"})
    assert status == 200 and headers["content-type"] == "application/json"
    strict = Response.model_validate(json.loads(data))
    assert strict.output_text == "echo: hello there" and [o.type for o in strict.output] == ["message"]
    assert strict.usage is not None
    assert strict.usage.model_dump(exclude_none=True) == responses_usage(2 + PROMPT_OVERHEAD, 3)
    # Cache writes (x-fake-cache-creation-tokens) are part of input_tokens; o* models reason.
    w = oai.responses.create(
        model="o4-mini", input="hello there", extra_headers={"x-fake-cache-creation-tokens": "7"}
    )
    assert w.usage is not None and w.usage.model_dump(exclude_none=True) == responses_usage(
        2 + PROMPT_OVERHEAD + 7, 3 + REASONING_TOKENS, reasoning=REASONING_TOKENS, write=7
    )


def test_responses_max_output_tokens_is_incomplete(oai: openai.OpenAI) -> None:
    r = oai.responses.create(model="gpt-5", input="one two three four", max_output_tokens=2)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output_text == "echo: one"


RESPONSES_STREAM_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",  # reasoning
    "response.output_item.done",
    "response.output_item.added",  # web_search_call
    "response.web_search_call.in_progress",
    "response.web_search_call.searching",
    "response.web_search_call.completed",
    "response.output_item.done",
    "response.output_item.added",  # message
    "response.content_part.added",
    *["response.output_text.delta"] * RESPONSES_REPLY,
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def test_responses_stream_event_sequence(oai: openai.OpenAI, fake: FakeUpstream) -> None:
    from openai.types.responses import ResponseStreamEvent
    from pydantic import TypeAdapter

    knobs = {**RESPONSES_KNOBS, "x-fake-web-searches": "1"}
    events = list(
        oai.responses.create(
            model="gpt-5", instructions="be brief", input=RESPONSES_INPUT, stream=True, extra_headers=knobs
        )
    )
    assert [e.type for e in events] == RESPONSES_STREAM_TYPES
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert "".join(deltas) == "echo: what is the weather"
    created, completed = events[0], events[-1]
    assert created.type == "response.created" and created.response.status == "in_progress"
    assert created.response.usage is None and created.response.output == []
    assert completed.type == "response.completed" and completed.response.status == "completed"
    assert completed.response.output_text == "echo: what is the weather"
    assert completed.response.usage is not None
    assert completed.response.usage.model_dump(exclude_none=True) == KNOBBED_USAGE
    # On the wire: `event: <type>` then its JSON, each event valid under the SDK's own union type.
    body = json.dumps(
        {"model": "gpt-5", "input": RESPONSES_INPUT, "instructions": "be brief", "stream": True}
    )
    status, headers, data = raw(
        fake, "POST", "/v1/responses", body.encode(), {"Authorization": "Bearer k", **knobs}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    adapter: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
    blocks = data.decode().split("\n\n")
    assert blocks[-1] == ""
    kinds = []
    for block in blocks[:-1]:
        event_line, data_line = block.split("\n")
        kind = event_line.removeprefix("event: ")
        payload = json.loads(data_line.removeprefix("data: "))
        assert payload["type"] == kind
        adapter.validate_python(payload)
        kinds.append(kind)
    assert kinds == RESPONSES_STREAM_TYPES


def test_responses_stream_helper_and_errors(oai: openai.OpenAI) -> None:
    with oai.responses.stream(model="gpt-5", input="hello there") as stream:
        final = stream.get_final_response()
    assert final.output_text == "echo: hello there"
    assert final.usage is not None and final.usage.output_tokens == 3
    with pytest.raises(openai.RateLimitError) as info:
        oai.responses.create(model="gpt-5", input="hi", extra_headers={"x-fake-status": "429"})
    assert info.value.code == "rate_limit_exceeded"
    events = list(
        oai.responses.create(
            model="gpt-5", input="hi", stream=True, extra_headers={"x-fake-stream-error": "3"}
        )
    )
    assert [e.type for e in events][-1] == "error" and events[-1].sequence_number == 3
    assert len(events) == 4
    with pytest.raises(openai.APIConnectionError):
        list(
            oai.responses.create(
                model="gpt-5", input="hi", stream=True, extra_headers={"x-fake-cut-after": "4"}
            )
        )


def test_chunks_delay_and_response_bytes(oai: openai.OpenAI) -> None:
    req: dict[str, Any] = {
        "model": "gpt-4o",
        "messages": MESSAGES,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"x-fake-chunks": "20", "x-fake-chunk-delay-ms": "5"}
    start = time.monotonic()
    chunks = list(oai.chat.completions.create(**req, extra_headers=headers))
    assert time.monotonic() - start >= 0.1
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) == 20
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.model_dump(exclude_none=True) == openai_usage(6 + PROMPT_OVERHEAD, 20)
    start = time.monotonic()
    oai.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_headers={"x-fake-delay-ms": "200"})
    assert time.monotonic() - start >= 0.2
    big = oai.chat.completions.with_raw_response.create(
        model="gpt-4o",
        messages=MESSAGES,
        extra_headers={"x-fake-response-bytes": "1000000"},
    )
    assert abs(len(big.content) - 1_000_000) < 2000
    assert big.parse().choices[0].message.content.startswith("echo: hello")  # type: ignore[union-attr]


def test_echo_headers_and_request_log(fake: FakeUpstream) -> None:
    status, _, _ = raw(fake, "DELETE", "/_fake/requests")
    assert status == 200
    body = b'{"model":"gpt-4o","messages":[{"role":"user","content":"hi"}]}'
    headers = {"Authorization": "Bearer k", "X-Custom": "v", "x-fake-echo-headers": "1"}
    status, resp_headers, _ = raw(fake, "POST", "/v1/chat/completions?trace=1", body, headers)
    assert status == 200
    assert resp_headers["x-fake-body-sha256"] == hashlib.sha256(body).hexdigest()
    assert {"authorization", "x-custom", "x-fake-echo-headers"} <= set(
        resp_headers["x-fake-received-headers"].split(",")
    )
    _, _, log = raw(fake, "GET", "/_fake/requests")
    (entry,) = json.loads(log)["requests"]
    assert (
        entry["method"] == "POST" and entry["path"] == "/v1/chat/completions" and entry["query"] == "trace=1"
    )
    assert ["X-Custom", "v"] in entry["headers"]
    assert base64.b64decode(entry["body_b64"]) == body
    status, _, data = raw(fake, "POST", "/v1/unknown", b"{}", {"Authorization": "Bearer k"})
    assert status == 404 and "Invalid URL" in json.loads(data)["error"]["message"]


def test_client_abort_is_counted_quietly(fake: FakeUpstream) -> None:
    fake.clear()
    body = json.dumps({"model": "gpt-4o", "messages": MESSAGES, "stream": True}).encode()
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=10)
    headers = {"Authorization": "Bearer k", "x-fake-chunk-delay-ms": "50"}
    conn.request("POST", "/v1/chat/completions", body=body, headers=headers)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read1(10)
    conn.close()
    deadline = time.monotonic() + 5
    while fake.client_aborts == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert fake.client_aborts == 1


# ------------------------------------------------------------------------------------------- Anthropic


def test_messages_non_stream(claude: anthropic.Anthropic) -> None:
    req: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "system": "be brief",
        "messages": MESSAGES[1:],
    }
    message = claude.messages.create(**req)
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == "echo: hello there general kenobi" == reply_text("anthropic", req)
    assert message.stop_reason == "end_turn"
    assert message.usage.model_dump(exclude_none=True) == anthropic_usage(6 + PROMPT_OVERHEAD, 5)
    assert message.usage.input_tokens == 6 + PROMPT_OVERHEAD and message.usage.output_tokens == 5


def test_messages_stream_helper(claude: anthropic.Anthropic) -> None:
    req: dict[str, Any] = {"model": "claude-haiku-4-5", "max_tokens": 3, "messages": MESSAGES[1:]}
    headers = {"x-fake-cached-tokens": "30", "x-fake-cache-creation-tokens": "5"}
    with claude.messages.stream(**req, extra_headers=headers) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert final.content[0].type == "text" and final.content[0].text == "echo: hello there"
    assert final.stop_reason == "max_tokens"
    assert final.usage.model_dump(exclude_none=True) == anthropic_usage(12, 3, read=30, write=5)
    assert final.usage.cache_read_input_tokens == 30 and final.usage.cache_creation_input_tokens == 5


def test_messages_raw_event_sequence(fake: FakeUpstream) -> None:
    body = json.dumps(
        {"model": "claude-haiku-4-5", "max_tokens": 50, "stream": True, "messages": MESSAGES[1:]}
    ).encode()
    headers = {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    status, resp_headers, data = raw(fake, "POST", "/v1/messages", body, headers)
    assert status == 200 and resp_headers["content-type"].startswith("text/event-stream")
    names = [line[7:] for line in data.decode().split("\n") if line.startswith("event: ")]
    assert names == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 5,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    datas = [json.loads(d) for d in sse_data(data)]
    assert datas[0]["message"]["usage"]["output_tokens"] == 1
    assert datas[-2]["usage"] == {"output_tokens": 5}
    assert datas[-2]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_messages_tool_use(claude: anthropic.Anthropic) -> None:
    req: dict[str, Any] = {
        "model": "claude-haiku-4-5",
        "max_tokens": 100,
        "messages": MESSAGES[1:],
        "tools": ANTHROPIC_TOOLS,
    }
    message = claude.messages.create(**req)
    assert message.stop_reason == "tool_use"
    block = message.content[0]
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.input == {"text": "hello there general kenobi"}
    with claude.messages.stream(**req) as stream:
        final = stream.get_final_message()
    streamed = final.content[0]
    assert streamed.type == "tool_use" and streamed.name == "get_weather"
    assert streamed.input == {"text": "hello there general kenobi"}
    assert final.usage.output_tokens == 9


@pytest.mark.parametrize(
    ("status", "exc"),
    [
        (400, anthropic.BadRequestError),
        (401, anthropic.AuthenticationError),
        (429, anthropic.RateLimitError),
        (500, anthropic.InternalServerError),
        (529, anthropic.OverloadedError),
    ],
)
def test_anthropic_errors_map_to_sdk_exceptions(
    claude: anthropic.Anthropic, status: int, exc: type[Exception]
) -> None:
    with pytest.raises(exc) as info:
        claude.messages.create(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=MESSAGES[1:],
            extra_headers={"x-fake-status": str(status)},
        )
    err = info.value
    assert isinstance(err, anthropic.APIStatusError) and err.status_code == status
    assert isinstance(err.body, dict) and err.body["type"] == "error"
    if status == 429:
        assert err.response.headers["retry-after"] == "7"


def test_anthropic_header_checks(fake: FakeUpstream) -> None:
    body = json.dumps({"model": "claude-haiku-4-5", "max_tokens": 5, "messages": MESSAGES[1:]}).encode()
    status, _, data = raw(fake, "POST", "/v1/messages", body, {"anthropic-version": "2023-06-01"})
    assert status == 401 and json.loads(data)["error"]["type"] == "authentication_error"
    status, _, data = raw(fake, "POST", "/v1/messages", body, {"x-api-key": "k"})
    assert status == 400 and json.loads(data)["error"]["type"] == "invalid_request_error"
    status, _, _ = raw(
        fake, "POST", "/v1/messages", body, {"x-api-key": "k", "anthropic-version": "2023-06-01"}
    )
    assert status == 200


def test_anthropic_cut_stream_raises(claude: anthropic.Anthropic) -> None:
    # This anthropic SDK lets the transport error escape un-wrapped from a truncated stream.
    with (
        pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)),
        claude.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=MESSAGES[1:],
            extra_headers={"x-fake-cut-after": "4"},
        ) as stream,
    ):
        stream.get_final_message()


def test_anthropic_in_stream_error_event(claude: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.APIStatusError, match="overloaded_error"):
        with claude.messages.stream(
            model="claude-haiku-4-5",
            max_tokens=10,
            messages=MESSAGES[1:],
            extra_headers={"x-fake-stream-error": "3"},
        ) as stream:
            stream.get_final_message()


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_entry_point_prints_url() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    proc = subprocess.Popen(
        [sys.executable, "-m", "llmtap.cli", "fake-upstream", "--port", "0"],
        stdout=subprocess.PIPE,
        text=True,
        env={"PYTHONPATH": str(src), "PATH": "/usr/bin:/bin"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("fake upstream listening on http://127.0.0.1:")
        port = int(line.rsplit(":", 1)[1])
        client = openai.OpenAI(api_key="k", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        assert client.chat.completions.create(model="gpt-4o", messages=MESSAGES).choices
        client.close()
    finally:
        proc.terminate()
        proc.wait(10)
