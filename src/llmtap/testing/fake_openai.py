"""The fake upstream's OpenAI API: chat completions (and Azure OpenAI's URLs for them), the
Responses API, embeddings, transcriptions, speech, image generations, models. Shares reply
planning, knobs and transport with `fake_upstream`."""

from __future__ import annotations

import itertools
from typing import Any, Final

from aiohttp import web

from llmtap.testing.fake_anthropic import _anthropic_gate
from llmtap.testing.fake_upstream import (
    _ENC,
    _JSON_HEADERS,
    _SSE_HEADERS,
    SYSTEM_FINGERPRINT,
    JSONDict,
    _decode_json,
    _echo_headers,
    _embedding,
    _embedding_inputs,
    _embedding_tokens,
    _fragments,
    _int_header,
    _Knobs,
    _limit,
    _new_id,
    _openai_usage,
    _plan_openai_chat,
    _plan_openai_responses,
    _pretty,
    _rate_limit_headers,
    _receive,
    _Reply,
    _responses_usage,
    _send_json,
    _with_stream_error,
    _write_events,
)

# ---------------------------------------------------------------------------------------------
# OpenAI.

_OPENAI_ERROR_DEFAULTS: Final[dict[int, tuple[str, str, str | None]]] = {
    400: ("invalid_request_error", "Invalid request (forced by x-fake-status).", None),
    401: (
        "invalid_request_error",
        "Incorrect API key provided: sk-fake***. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        "invalid_api_key",
    ),
    403: (
        "request_forbidden",
        "Country, region, or territory not supported",
        "unsupported_country_region_territory",
    ),
    404: (
        "invalid_request_error",
        "The model does not exist or you do not have access to it.",
        "model_not_found",
    ),
    413: ("invalid_request_error", "Request too large.", None),
    429: (
        "requests",
        "Rate limit reached for requests per min (RPM): Limit 10000, Used 10000, Requested 1. "
        "Please try again in 7s.",
        "rate_limit_exceeded",
    ),
    500: ("server_error", "The server had an error while processing your request. Sorry about that!", None),
    502: ("server_error", "Bad gateway.", None),
    503: ("server_error", "The engine is currently overloaded, please try again later.", None),
}


def _openai_error(
    status: int,
    message: str | None = None,
    *,
    err_type: str | None = None,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    d_type, d_message, d_code = _OPENAI_ERROR_DEFAULTS.get(status, ("server_error", "Error.", None))
    body = {
        "error": {
            "message": message or d_message,
            "type": err_type or d_type,
            "param": param,
            "code": code if code is not None or message is not None else d_code,
        }
    }
    out = {**_JSON_HEADERS, "x-request-id": _new_id("req_"), **(headers or {})}
    return web.Response(status=status, body=_pretty(body), headers=out)


def _openai_gate(request: web.Request) -> web.Response | None:
    """Auth + forced-status checks, in the order the real API applies them."""
    auth = request.headers.get("Authorization", "")
    if not auth.startswith("Bearer ") or not auth[7:].strip():
        return _openai_error(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
            "username) if you're accessing the API from your browser and are prompted for a username and "
            "password. You can obtain an API key from https://platform.openai.com/account/api-keys.",
            err_type="invalid_request_error",
        )
    status = _int_header(request.headers, "x-fake-status")
    if status is not None and status >= 400:
        extra = _rate_limit_headers(request, "openai") if status == 429 else None
        return _openai_error(status, headers=extra)
    return None


def _openai_parse(body: bytes, request: web.Request) -> JSONDict | web.Response:
    try:
        req = _decode_json(body, request.headers)
    except ValueError:
        return _openai_error(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
            "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
            "valid JSON. If you have trouble figuring out how to fix this, please make sure you are using "
            "the latest version of your client library.)",
        )
    if not isinstance(req, dict):
        return _openai_error(400, "Invalid type for request body: expected an object.", param="body")
    return req


async def openai_chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: non-stream JSON or SSE ``chat.completion.chunk`` stream.
    ``x-fake-served-model`` names another model in the answer (an aggregator's routing)."""
    return await _chat(request, served=request.headers.get("x-fake-served-model"))


#: What the fake's Azure deployments serve (a deployment name is not a model; responses say
#: which model answered). ``x-fake-served-model`` overrides it.
AZURE_SERVED_MODEL: Final = "gpt-4o-mini-2024-07-18"
_AZURE_PROMPT_FILTER: Final = (
    b'data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":'
    b'[{"prompt_index":0,"content_filter_results":{"hate":{"filtered":false,"severity":"safe"}}}]}\n\n'
)


async def azure_chat_completions(request: web.Request) -> web.StreamResponse:
    """Azure OpenAI chat: ``/openai/deployments/{d}/chat/completions?api-version=`` or
    ``/openai/v1/chat/completions``. Auth by ``api-key`` (or a bearer token); the response's
    ``model`` is the served model, and a stream starts with Azure's ``prompt_filter_results``
    chunk (empty id and model)."""
    if "deployment" in request.match_info and not request.query.get("api-version"):
        await _receive(request)
        return web.Response(
            status=404,
            body=b'{"error":{"code":"404","message": "Resource not found"}}',
            headers=_JSON_HEADERS,
        )
    served = request.headers.get("x-fake-served-model", AZURE_SERVED_MODEL)
    return await _chat(request, served=served, deployment=request.match_info.get("deployment"))


async def _openai_request(
    request: web.Request, no_model: str, param: str | None = None
) -> tuple[bytes, dict[str, Any], str, float] | web.StreamResponse:
    """Receive, auth-gate and parse an OpenAI request with a model: (raw body, parsed, model,
    received at),
    or the error response the API gives (`no_model` is that endpoint's own wording)."""
    body, created = await _receive(request)
    early = _openai_gate(request)
    if early is not None:
        return early
    req = _openai_parse(body, request)
    if isinstance(req, web.Response):
        return req
    model = req.get("model")
    if not isinstance(model, str) or not model:
        return _openai_error(400, no_model, param=param) if param else _openai_error(400, no_model)
    return body, req, model, created


async def _chat(
    request: web.Request, served: str | None = None, deployment: str | None = None
) -> web.StreamResponse:
    body, created = await _receive(request)
    if served is not None and request.headers.get("api-key"):  # Azure's own key header
        forced = _int_header(request.headers, "x-fake-status")
        early = _openai_error(forced) if forced is not None and forced >= 400 else None
    else:
        early = _openai_gate(request)
    if early is not None:
        return early
    req = _openai_parse(body, request)
    if isinstance(req, web.Response):
        return req
    model = req.get("model") or deployment
    if not isinstance(model, str) or not model:
        return _openai_error(400, "you must provide a model parameter")
    if not isinstance(req.get("messages"), list):
        return _openai_error(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    stream = req.get("stream") is True
    stream_options = req.get("stream_options")
    if stream_options is not None and not stream:
        return _openai_error(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    plan = _plan_openai_chat(req, _Knobs.parse(request.headers))
    if served is not None:
        model = served
    headers = {**_JSON_HEADERS, "x-request-id": _new_id("req_"), "openai-processing-ms": "1"}
    _echo_headers(request, body, headers)
    cid = _new_id("chatcmpl-")
    finish = "tool_calls" if plan.tool_name else ("length" if plan.truncated else "stop")
    if stream:
        include_usage = isinstance(stream_options, dict) and stream_options.get("include_usage") is True
        headers.update(_SSE_HEADERS)
        chunks = _int_header(request.headers, "x-fake-chunks")
        events = _openai_stream_events(
            cid, int(created), model, plan, finish, include_usage, chunks, _tier(req)
        )
        if served is not None:
            events.insert(0, _AZURE_PROMPT_FILTER)
        return await _write_events(
            request, headers, _with_stream_error(request, events, _OPENAI_STREAM_ERROR)
        )
    message: JSONDict = {
        "role": "assistant",
        "content": None if plan.tool_name else plan.text,
        "refusal": None,
    }
    if plan.tool_name:
        message["tool_calls"] = [
            {
                "id": _new_id("call_"),
                "type": "function",
                "function": {"name": plan.tool_name, "arguments": plan.tool_args},
            }
        ]
    message["annotations"] = []
    out = {
        "id": cid,
        "object": "chat.completion",
        "created": int(created),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _openai_usage(plan),
        "service_tier": _tier(req),
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    return await _send_json(request, 200, _pretty(out), headers)


_OPENAI_STREAM_ERROR: Final = (
    b"data: "
    + _ENC.encode(
        {
            "error": {
                "message": "The server had an error while processing your request. Sorry about that!",
                "type": "server_error",
                "param": None,
                "code": None,
            }
        }
    )
    + b"\n\n"
)


def _tier(req: JSONDict) -> str:
    """The `service_tier` OpenAI reports: the requested `flex` or `priority`, else `default`."""
    tier = req.get("service_tier")
    return tier if tier in ("flex", "priority") else "default"


def _openai_stream_events(
    cid: str,
    created: int,
    model: str,
    plan: _Reply,
    finish: str,
    include_usage: bool,
    chunks: int | None,
    tier: str = "default",
) -> list[bytes]:
    """The exact SSE byte sequence OpenAI sends for one streamed chat completion."""
    head: JSONDict = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "service_tier": tier,
        "system_fingerprint": SYSTEM_FINGERPRINT,
    }
    tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"

    def chunk(delta: JSONDict, finish_reason: str | None = None) -> bytes:
        obj = {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            obj["usage"] = None
        return b"data: " + _ENC.encode(obj) + b"\n\n"

    events: list[bytes] = []
    if plan.tool_name:
        events.append(
            chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": _new_id("call_"),
                            "type": "function",
                            "function": {"name": plan.tool_name, "arguments": ""},
                        }
                    ],
                    "refusal": None,
                }
            )
        )
        for frag in _fragments(plan.tool_args, chunks):
            events.append(chunk({"tool_calls": [{"index": 0, "function": {"arguments": frag}}]}))
    else:
        events.append(chunk({"role": "assistant", "content": "", "refusal": None}))
        # Content deltas dominate big streams: splice the pre-encoded prefix instead of re-encoding.
        prefix = b"data: " + _ENC.encode(head)[:-1] + b',"choices":[{"index":0,"delta":{"content":'
        suffix = b'},"logprobs":null,"finish_reason":null}]' + tail
        for i, word in enumerate(plan.words):
            events.append(prefix + _ENC.encode(word if i == 0 else " " + word) + suffix)
    events.append(chunk({}, finish))
    if include_usage:
        usage_chunk = {**head, "choices": [], "usage": _openai_usage(plan)}
        events.append(b"data: " + _ENC.encode(usage_chunk) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


async def openai_responses(request: web.Request) -> web.StreamResponse:
    """``POST /v1/responses``: a ``response`` object, or its SSE event stream (``event:`` lines,
    ``sequence_number``, ending with ``response.completed``, or ``response.incomplete`` when
    ``max_output_tokens`` cut the reply). Output items: a ``reasoning`` item when there are
    reasoning tokens, ``x-fake-web-searches`` ``web_search_call`` items, then the message."""
    got = await _openai_request(request, "Missing required parameter: 'model'.", param="model")
    if isinstance(got, web.StreamResponse):
        return got
    body, req, model, created = got
    knobs = _Knobs.parse(request.headers)
    plan = _plan_openai_responses(req, knobs)
    rid = _new_id("resp_")
    headers = {**_JSON_HEADERS, "x-request-id": _new_id("req_"), "openai-processing-ms": "1"}
    _echo_headers(request, body, headers)
    items = _responses_items(plan, knobs.web_searches)
    final = _response_object(rid, int(created), model, req, plan, items)
    if req.get("stream") is not True:
        return await _send_json(request, 200, _pretty(final), headers)
    headers.update(_SSE_HEADERS)
    events = _responses_stream_events(final, items, plan)
    after = _int_header(request.headers, "x-fake-stream-error")
    error = _responses_stream_error(min(max(after or 0, 0), len(events)))
    return await _write_events(request, headers, _with_stream_error(request, events, error))


def _responses_items(plan: _Reply, web_searches: int) -> list[JSONDict]:
    """The completed output items, in the order OpenAI emits them."""
    items: list[JSONDict] = []
    if plan.reasoning_tokens:
        items.append({"id": _new_id("rs_"), "type": "reasoning", "summary": []})
    for n in range(web_searches):
        items.append(
            {
                "id": _new_id("ws_"),
                "type": "web_search_call",
                "status": "completed",
                "action": {"type": "search", "query": f"search {n + 1}"},
            }
        )
    items.append(
        {
            "id": _new_id("msg_"),
            "type": "message",
            "status": "incomplete" if plan.truncated else "completed",
            "content": [{"type": "output_text", "annotations": [], "logprobs": [], "text": plan.text}],
            "role": "assistant",
        }
    )
    return items


def _response_object(
    rid: str, created: int, model: str, req: JSONDict, plan: _Reply, output: list[JSONDict]
) -> JSONDict:
    """The final ``response`` object (``Response`` in the SDK's types), as a non-stream body."""
    instructions = req.get("instructions")
    reasoning = req.get("reasoning")
    return {
        "id": rid,
        "object": "response",
        "created_at": created,
        "status": "incomplete" if plan.truncated else "completed",
        "background": False,
        "completed_at": None if plan.truncated else created,
        "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if plan.truncated else None,
        "instructions": instructions if isinstance(instructions, str) else None,
        "max_output_tokens": _limit(req.get("max_output_tokens")),
        "max_tool_calls": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": req.get("previous_response_id"),
        "prompt_cache_key": None,
        "reasoning": {
            "effort": reasoning.get("effort") if isinstance(reasoning, dict) else None,
            "summary": None,
        },
        "safety_identifier": None,
        "service_tier": _tier(req),
        "store": req.get("store") is not False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": "auto",
        "tools": req.get("tools") if isinstance(req.get("tools"), list) else [],
        "top_logprobs": 0,
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": _responses_usage(plan),
        "user": None,
        "metadata": req.get("metadata") if isinstance(req.get("metadata"), dict) else {},
    }


def _sse_event(kind: str, payload: JSONDict) -> bytes:
    return b"event: " + kind.encode() + b"\ndata: " + _ENC.encode(payload) + b"\n\n"


def _responses_stream_events(final: JSONDict, items: list[JSONDict], plan: _Reply) -> list[bytes]:
    """The exact SSE sequence OpenAI sends for one streamed response."""
    seq = itertools.count()
    events: list[bytes] = []

    def emit(kind: str, **fields: Any) -> None:
        events.append(_sse_event(kind, {"type": kind, "sequence_number": next(seq), **fields}))

    pending = {
        **final,
        "status": "in_progress",
        "completed_at": None,
        "incomplete_details": None,
        "output": [],
        "usage": None,
    }
    emit("response.created", response=pending)
    emit("response.in_progress", response=pending)
    for index, item in enumerate(items):
        kind = item["type"]
        if kind == "message":
            iid = item["id"]
            text = plan.text
            emit(
                "response.output_item.added",
                output_index=index,
                item={**item, "status": "in_progress", "content": []},
            )
            empty_part = {"type": "output_text", "annotations": [], "logprobs": [], "text": ""}
            where = {"item_id": iid, "output_index": index, "content_index": 0}
            emit("response.content_part.added", **where, part=empty_part)
            for i, word in enumerate(plan.words):
                emit("response.output_text.delta", **where, delta=word if i == 0 else " " + word, logprobs=[])
            emit("response.output_text.done", **where, text=text, logprobs=[])
            emit("response.content_part.done", **where, part={**empty_part, "text": text})
        elif kind == "web_search_call":
            emit(
                "response.output_item.added",
                output_index=index,
                item={"id": item["id"], "type": kind, "status": "in_progress", "action": {"type": "search"}},
            )
            for phase in ("in_progress", "searching", "completed"):
                emit(f"response.web_search_call.{phase}", output_index=index, item_id=item["id"])
        else:
            emit("response.output_item.added", output_index=index, item=item)
        emit("response.output_item.done", output_index=index, item=item)
    emit("response.incomplete" if plan.truncated else "response.completed", response=final)
    return events


def _responses_stream_error(sequence_number: int) -> bytes:
    """OpenAI's in-stream ``error`` event (``x-fake-stream-error``)."""
    return _sse_event(
        "error",
        {
            "type": "error",
            "sequence_number": sequence_number,
            "code": "server_error",
            "message": "The server had an error while processing your request. Sorry about that!",
            "param": None,
        },
    )


async def openai_embeddings(request: web.Request) -> web.StreamResponse:
    """``POST /v1/embeddings``: float lists, or base64 float32 (the openai SDK's default request)."""
    got = await _openai_request(request, "you must provide a model parameter")
    if isinstance(got, web.StreamResponse):
        return got
    body, req, model, _ = got
    inputs = _embedding_inputs(req)
    if not inputs:
        return _openai_error(
            400, "'input' is a required property", param="input", code="missing_required_parameter"
        )
    dims = _limit(req.get("dimensions")) or (3072 if "large" in model else 1536)
    as_b64 = req.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        text = item if isinstance(item, str) else " ".join(map(str, item)) if isinstance(item, list) else ""
        floats, b64 = _embedding(text, max(1, dims))
        data.append({"object": "embedding", "index": index, "embedding": b64 if as_b64 else floats})
    tokens = sum(_embedding_tokens(i) for i in inputs)
    out = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    headers = {**_JSON_HEADERS, "x-request-id": _new_id("req_"), "openai-processing-ms": "1"}
    _echo_headers(request, body, headers)
    return await _send_json(request, 200, _ENC.encode(out), headers)


# -- audio and images: typed event streams whose last event carries the usage ----------------------


def _form(body: bytes, content_type: str) -> dict[str, bytes]:
    """A multipart/form-data body's fields by name (files as their bytes)."""
    import email.parser
    import email.policy

    head = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    fields: dict[str, bytes] = {}
    for part in msg.iter_parts() if msg.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            payload = part.get_payload(decode=True)
            fields[name] = payload if isinstance(payload, bytes) else b""
    return fields


def _data_event(payload: JSONDict) -> bytes:
    return b"data: " + _ENC.encode(payload) + b"\n\n"


async def openai_transcriptions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/transcriptions`` (multipart: ``file``, ``model``, ``stream``): the text
    (the fake hears the file's bytes as words), token usage as gpt-4o-transcribe reports it
    (whisper-1: seconds); streamed as ``transcript.text.delta`` events and a
    ``transcript.text.done`` that carries the usage."""
    body, _ = await _receive(request)
    early = _openai_gate(request)
    if early is not None:
        return early
    fields = _form(body, request.headers.get("Content-Type", ""))
    model = fields.get("model", b"").decode("utf-8", "replace")
    if not model or "file" not in fields:
        missing = "model" if not model else "file"
        return _openai_error(400, f"you must provide a {missing} parameter", param=missing)
    audio = fields["file"]
    text = "Hello there, this is the fake transcript."
    audio_tokens = max(1, len(audio) // 100)
    text_tokens = _embedding_tokens(fields.get("prompt", b"").decode("utf-8", "replace"))
    usage: JSONDict
    if model == "whisper-1":
        usage = {"type": "duration", "seconds": max(1, len(audio) // 16000)}
    else:
        out_tokens = _embedding_tokens(text)
        usage = {
            "type": "tokens",
            "input_tokens": audio_tokens + text_tokens,
            "input_token_details": {"text_tokens": text_tokens, "audio_tokens": audio_tokens},
            "output_tokens": out_tokens,
            "total_tokens": audio_tokens + text_tokens + out_tokens,
        }
    headers = {**_JSON_HEADERS, "x-request-id": _new_id("req_")}
    if fields.get("stream", b"").lower() != b"true":
        return await _send_json(request, 200, _ENC.encode({"text": text, "usage": usage}), headers)
    events = [
        _data_event({"type": "transcript.text.delta", "delta": word, "logprobs": None})
        for word in (w if i == 0 else " " + w for i, w in enumerate(text.split(" ")))
    ]
    events.append(
        _data_event({"type": "transcript.text.done", "text": text, "logprobs": None, "usage": usage})
    )
    return await _write_events(request, {**_SSE_HEADERS, "x-request-id": headers["x-request-id"]}, events)


#: One 1x1 PNG, the fake's every image.
_PNG_B64: Final = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


async def openai_images(request: web.Request) -> web.StreamResponse:
    """``POST /v1/images/generations``: gpt-image-1's answer (``b64_json``, token usage with
    text and image input details); streamed (``stream: true``) as ``partial_images``
    ``image_generation.partial_image`` events and an ``image_generation.completed`` that carries
    the usage."""
    got = await _openai_request(request, "you must provide a model parameter")
    if isinstance(got, web.StreamResponse):
        return got
    _, req, _, created = got
    prompt = req.get("prompt") if isinstance(req.get("prompt"), str) else ""
    text_tokens = _embedding_tokens(prompt)
    out_tokens = 272  # a low-quality square image
    usage = {
        "total_tokens": text_tokens + out_tokens,
        "input_tokens": text_tokens,
        "output_tokens": out_tokens,
        "input_tokens_details": {"text_tokens": text_tokens, "image_tokens": 0},
    }
    meta = {"background": "opaque", "output_format": "png", "quality": "low", "size": "1024x1024"}
    headers = {"x-request-id": _new_id("req_")}
    if req.get("stream") is not True:
        out = {"created": int(created), "data": [{"b64_json": _PNG_B64}], "usage": usage, **meta}
        return await _send_json(request, 200, _ENC.encode(out), {**_JSON_HEADERS, **headers})
    partials = _limit(req.get("partial_images")) or 0
    events = [
        _sse_event(
            "image_generation.partial_image",
            {
                "type": "image_generation.partial_image",
                "b64_json": _PNG_B64,
                "created_at": int(created),
                "partial_image_index": i,
                **meta,
            },
        )
        for i in range(min(partials, 3))
    ]
    events.append(
        _sse_event(
            "image_generation.completed",
            {
                "type": "image_generation.completed",
                "b64_json": _PNG_B64,
                "created_at": int(created),
                "usage": usage,
                **meta,
            },
        )
    )
    return await _write_events(request, {**_SSE_HEADERS, **headers}, events)


async def openai_speech(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/speech``: audio bytes (``audio/mpeg``), or with ``stream_format: "sse"``
    ``speech.audio.delta`` events (base64 audio) and a ``speech.audio.done`` that carries the
    token usage gpt-4o-mini-tts reports."""
    got = await _openai_request(request, "you must provide a model parameter")
    if isinstance(got, web.StreamResponse):
        return got
    _, req, _, _ = got
    text = req.get("input") if isinstance(req.get("input"), str) else ""
    audio = bytes(range(256)) * max(1, _embedding_tokens(text))  # not MP3: bytes that are no text
    headers = {"x-request-id": _new_id("req_")}
    if req.get("stream_format") != "sse":
        return web.Response(status=200, body=audio, headers={**headers, "Content-Type": "audio/mpeg"})
    import base64

    events = [
        _data_event({"type": "speech.audio.delta", "audio": base64.b64encode(audio[i : i + 512]).decode()})
        for i in range(0, len(audio), 512)
    ]
    in_tokens = _embedding_tokens(text)
    usage = {
        "input_tokens": in_tokens,
        "output_tokens": len(audio) // 64,
        "total_tokens": in_tokens + len(audio) // 64,
    }
    events.append(_data_event({"type": "speech.audio.done", "usage": usage}))
    return await _write_events(request, {**_SSE_HEADERS, **headers}, events)


OPENAI_MODELS: Final = (
    "gpt-4o",
    "gpt-4o-mini",
    "gpt-4.1",
    "gpt-4.1-mini",
    "o3-mini",
    "o4-mini",
    "text-embedding-3-small",
    "text-embedding-3-large",
)
ANTHROPIC_MODELS: Final = ("claude-sonnet-4-5", "claude-haiku-4-5", "claude-opus-4-1")


def _is_anthropic_request(request: web.Request) -> bool:
    h = request.headers
    return "anthropic-version" in h or "x-api-key" in h


async def list_models(request: web.Request) -> web.StreamResponse:
    """``GET /v1/models``: OpenAI's list format, or Anthropic's when Anthropic headers are present."""
    body, _ = await _receive(request)
    if _is_anthropic_request(request):
        early = _anthropic_gate(request)
        if early is not None:
            return early
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": "2025-01-01T00:00:00Z"}
            for m in ANTHROPIC_MODELS
        ]
        out: JSONDict = {
            "data": data,
            "has_more": False,
            "first_id": data[0]["id"],
            "last_id": data[-1]["id"],
        }
        headers = {**_JSON_HEADERS, "request-id": _new_id("req_")}
        _echo_headers(request, body, headers)
        return web.Response(body=_ENC.encode(out), headers=headers)
    early = _openai_gate(request)
    if early is not None:
        return early
    out = {
        "object": "list",
        "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "system"} for m in OPENAI_MODELS
        ],
    }
    headers = {**_JSON_HEADERS, "x-request-id": _new_id("req_")}
    _echo_headers(request, body, headers)
    return web.Response(body=_pretty(out), headers=headers)
