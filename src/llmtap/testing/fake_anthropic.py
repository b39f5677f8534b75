"""The fake upstream's Anthropic Messages API (`/v1/messages`, `/v1/messages/count_tokens`).
Shares reply planning, knobs and transport with `fake_upstream`."""

from __future__ import annotations

from typing import Final

from aiohttp import web

from llmtap.testing.fake_upstream import (
    _DEC,
    _ENC,
    _JSON_HEADERS,
    _NO_KNOBS,
    _SSE_HEADERS,
    JSONDict,
    _anthropic_usage,
    _decode_json,
    _echo_headers,
    _fragments,
    _int_header,
    _Knobs,
    _new_id,
    _plan_anthropic,
    _rate_limit_headers,
    _receive,
    _Reply,
    _send_json,
    _with_stream_error,
    _write_events,
)

# ---------------------------------------------------------------------------------------------
# Anthropic.

_ANTHROPIC_ERRORS: Final[dict[int, tuple[str, str]]] = {
    400: ("invalid_request_error", "Invalid request (forced by x-fake-status)."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    502: ("api_error", "Bad gateway"),
    503: ("api_error", "Service unavailable"),
    529: ("overloaded_error", "Overloaded"),
}


def _anthropic_error(
    status: int,
    message: str | None = None,
    *,
    err_type: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    d_type, d_message = _ANTHROPIC_ERRORS.get(status, ("api_error", "Internal server error"))
    rid = _new_id("req_")
    body = {
        "type": "error",
        "error": {"type": err_type or d_type, "message": message or d_message},
        "request_id": rid,
    }
    out = {**_JSON_HEADERS, "request-id": rid, **(headers or {})}
    return web.Response(status=status, body=_ENC.encode(body), headers=out)


def _anthropic_gate(request: web.Request) -> web.Response | None:
    """Credential + version checks like the real API; accepts ``x-api-key`` or ``Authorization: Bearer``."""
    h = request.headers
    auth = h.get("Authorization", "")
    if not h.get("x-api-key", "").strip() and not (auth.startswith("Bearer ") and auth[7:].strip()):
        return _anthropic_error(401, "x-api-key header is required")
    if not h.get("anthropic-version", "").strip():
        return _anthropic_error(
            400, "anthropic-version: header is required", err_type="invalid_request_error"
        )
    status = _int_header(h, "x-fake-status")
    if status is not None and status >= 400:
        extra = _rate_limit_headers(request, "anthropic") if status == 429 else None
        return _anthropic_error(status, headers=extra)
    return None


def _anthropic_parse(body: bytes, request: web.Request) -> JSONDict | web.Response:
    try:
        req = _decode_json(body, request.headers)
    except ValueError:
        return _anthropic_error(400, "There was an issue with the JSON body of your request: invalid JSON.")
    if not isinstance(req, dict):
        return _anthropic_error(400, "Request body must be a JSON object.")
    for field in ("model", "messages"):
        if field not in req:
            return _anthropic_error(400, f"{field}: Field required")
    return req


def _sse(event: str, data: JSONDict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + _ENC.encode(data) + b"\n\n"


_ANTHROPIC_STREAM_ERROR: Final = _sse(
    "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
)


async def anthropic_messages(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages``: a ``message`` object, or the full SSE event sequence when streaming."""
    body, _ = await _receive(request)
    early = _anthropic_gate(request)
    if early is not None:
        return early
    req = _anthropic_parse(body, request)
    if isinstance(req, web.Response):
        return req
    if "max_tokens" not in req:
        return _anthropic_error(400, "max_tokens: Field required")
    model = str(req["model"])
    plan = _plan_anthropic(req, _Knobs.parse(request.headers))
    headers = {**_JSON_HEADERS, "request-id": _new_id("req_")}
    _echo_headers(request, body, headers)
    mid = _new_id("msg_")
    stop_reason = "tool_use" if plan.tool_name else ("max_tokens" if plan.truncated else "end_turn")
    tool_id = _new_id("toolu_") if plan.tool_name else ""
    if req.get("stream") is True:
        headers.update(_SSE_HEADERS)
        full_delta = request.headers.get("x-fake-delta-usage", "").lower() == "full"
        chunks = _int_header(request.headers, "x-fake-chunks")
        events = _anthropic_stream_events(mid, model, plan, stop_reason, tool_id, full_delta, chunks)
        return await _write_events(
            request, headers, _with_stream_error(request, events, _ANTHROPIC_STREAM_ERROR)
        )
    content: list[JSONDict]
    if plan.tool_name:
        content = [
            {"type": "tool_use", "id": tool_id, "name": plan.tool_name, "input": _DEC.decode(plan.tool_args)}
        ]
    else:
        content = [{"type": "text", "text": plan.text}]
    out = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": _anthropic_usage(plan),
    }
    return await _send_json(request, 200, _ENC.encode(out), headers)


def _anthropic_stream_events(
    mid: str,
    model: str,
    plan: _Reply,
    stop_reason: str,
    tool_id: str,
    full_delta_usage: bool,
    chunks: int | None,
) -> list[bytes]:
    """The exact SSE event sequence Anthropic sends for one streamed message."""
    message: JSONDict = {
        "id": mid,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _anthropic_usage(plan, output_tokens=1),
    }
    events = [_sse("message_start", {"type": "message_start", "message": message})]
    if plan.tool_name:
        block: JSONDict = {"type": "tool_use", "id": tool_id, "name": plan.tool_name, "input": {}}
        events.append(
            _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        )
        events.append(b'event: ping\ndata: {"type": "ping"}\n\n')
        for frag in ["", *_fragments(plan.tool_args, chunks)]:
            delta = {"type": "input_json_delta", "partial_json": frag}
            events.append(
                _sse("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta})
            )
    else:
        block = {"type": "text", "text": ""}
        events.append(
            _sse("content_block_start", {"type": "content_block_start", "index": 0, "content_block": block})
        )
        events.append(b'event: ping\ndata: {"type": "ping"}\n\n')
        prefix = (
            b"event: content_block_delta\n"
            b'data: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":'
        )
        for i, word in enumerate(plan.words):
            events.append(prefix + _ENC.encode(word if i == 0 else " " + word) + b"}}\n\n")
    events.append(_sse("content_block_stop", {"type": "content_block_stop", "index": 0}))
    usage: JSONDict = {"output_tokens": plan.output_tokens}
    if full_delta_usage:
        usage = {
            "input_tokens": plan.prompt_tokens,
            "cache_creation_input_tokens": plan.cache_creation_tokens,
            "cache_read_input_tokens": plan.cached_tokens,
            "output_tokens": plan.output_tokens,
        }
    events.append(
        _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                "usage": usage,
            },
        )
    )
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events


async def anthropic_count_tokens(request: web.Request) -> web.StreamResponse:
    """``POST /v1/messages/count_tokens``: the same prompt count the messages endpoint reports."""
    body, _ = await _receive(request)
    early = _anthropic_gate(request)
    if early is not None:
        return early
    req = _anthropic_parse(body, request)
    if isinstance(req, web.Response):
        return req
    plan = _plan_anthropic(req, _NO_KNOBS)
    headers = {**_JSON_HEADERS, "request-id": _new_id("req_")}
    _echo_headers(request, body, headers)
    return web.Response(body=_ENC.encode({"input_tokens": plan.prompt_tokens}), headers=headers)
