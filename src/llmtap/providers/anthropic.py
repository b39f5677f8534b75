"""Anthropic wire format: usage and stream reassembly (Messages API). Runs off the latency path.

Token convention (so costs and totals compare across providers): Anthropic reports the uncached
input (`input_tokens`), cache reads (`cache_read_input_tokens`) and cache writes
(`cache_creation_input_tokens`) as three disjoint counts. The record follows OpenAI, where
cached tokens are a *part* of the prompt:

    prompt_tokens      = input_tokens + cache_read_input_tokens + cache_creation_input_tokens
    cached_tokens      = cache_read_input_tokens
    cache_write_tokens = cache_creation_input_tokens
    cache_write_1h_tokens = cache_creation.ephemeral_1h_input_tokens (part of the writes)
    speed, inference_geo  = speed, inference_geo when not `standard` / `global` (priced apart)
    completion_tokens  = output_tokens
    total_tokens       = prompt_tokens + completion_tokens

so uncached input = prompt_tokens - cached_tokens - cache_write_tokens.

Streams: `message_start` carries the input counts (and a placeholder `output_tokens`);
`message_delta` carries the final, cumulative `output_tokens` (and, on newer API versions, the
input counts again). Later values win.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import orjson

from llmtap.providers.base import Provider, text_member
from llmtap.providers.common import after_last_reply, error_message, loads, role_is, scrub_stream, token_count
from llmtap.providers.sse import StreamResult, edge_events, iter_events
from llmtap.record import Usage

#: A stream's generated output (`token_marker`): text, thinking or tool input.
_OUTPUT = re.compile(rb'"content_block_delta"')

if TYPE_CHECKING:
    from llmtap.config import Settings

__all__ = ["Anthropic", "error_message", "parse_usage", "reassemble_stream", "usage_from_body"]

_TOOL_BLOCKS = frozenset({"tool_use", "server_tool_use", "mcp_tool_use"})


def parse_usage(u: Any) -> Usage:
    """An Anthropic `usage` object as a `Usage` (see the module docstring for the mapping)."""
    if not isinstance(u, dict):
        return Usage()
    inp = token_count(u.get("input_tokens"))
    read = token_count(u.get("cache_read_input_tokens"))
    write = token_count(u.get("cache_creation_input_tokens"))
    out = token_count(u.get("output_tokens"))
    if inp is None and out is None:
        return Usage()
    prompt = inp + (read or 0) + (write or 0) if inp is not None else None
    total = prompt + out if prompt is not None and out is not None else None
    # `cache_creation` splits the writes by TTL; 1-hour writes cost more than 5-minute ones.
    ttl = u.get("cache_creation")
    write_1h = token_count(ttl.get("ephemeral_1h_input_tokens")) if isinstance(ttl, dict) else None
    tier = u.get("service_tier")
    tools = u.get("server_tool_use")
    searches = token_count(tools.get("web_search_requests")) if isinstance(tools, dict) else None
    # Fast mode and US-only inference price the same tokens higher (`llmtap.pricing`).
    speed = _label(u.get("speed"), "standard")
    geo = _label(u.get("inference_geo"), "global")
    return Usage(
        source="provider",
        prompt_tokens=prompt,
        completion_tokens=out,
        total_tokens=total,
        cached_tokens=read,
        cache_write_tokens=write,
        cache_write_1h_tokens=write_1h or None,
        service_tier=tier if isinstance(tier, str) and tier else None,
        web_search_requests=searches or None,
        speed=speed,
        inference_geo=geo,
    )


def _label(value: Any, usual: str) -> str | None:
    """A reported mode other than the usual one (None for that, or for nothing), kept short:
    it comes from the upstream, and only says which prices apply."""
    if not isinstance(value, str) or not value or value == usual:
        return None
    return value[:64]


def usage_from_body(body: Any) -> Usage:
    if isinstance(body, dict):
        return parse_usage(body.get("usage"))
    return Usage()


def reassemble_stream(raw: bytes) -> StreamResult | None:
    """`_reassemble`, its text scrubbed: events are read keeping lone surrogates, so an emoji
    split over two deltas is whole again once they are joined (`common.loads`)."""
    return scrub_stream(_reassemble(raw), raw)


def _reassemble(raw: bytes) -> StreamResult | None:
    """Rebuild the `message` a Messages stream stands for; None if `raw` holds no JSON events.

    Text, thinking and tool-use blocks are assembled from their deltas (tool `input` parsed from
    the joined `input_json_delta` fragments; left as the raw string if the stream was cut
    mid-JSON); `stop_reason`/`stop_sequence` and usage come from `message_delta`.
    """
    message: dict[str, Any] | None = None
    blocks: dict[int, dict[str, Any]] = {}
    parts: dict[int, list[str]] = {}
    usage: dict[str, Any] = {}
    error: str | None = None
    seen = False
    complete = final = False

    for event, data in iter_events(raw):
        try:
            obj = loads(data, keep_surrogates=True)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(obj, dict):
            continue
        seen = True
        kind = obj.get("type") or event
        if kind == "content_block_delta":
            idx = _index(obj)
            delta = obj.get("delta")
            if not isinstance(delta, dict):
                continue
            dt = delta.get("type")
            if dt == "text_delta":
                parts.setdefault(idx, []).append(str(delta.get("text", "")))
            elif dt == "input_json_delta":
                parts.setdefault(idx, []).append(str(delta.get("partial_json", "")))
            elif dt == "thinking_delta":
                parts.setdefault(idx, []).append(str(delta.get("thinking", "")))
            elif dt == "signature_delta":
                block = blocks.setdefault(idx, {"type": "thinking"})
                block["signature"] = str(delta.get("signature", ""))  # whole: a second replaces it (SDK)
            elif dt == "citations_delta":
                block = blocks.setdefault(idx, {"type": "text"})
                cites = block.get("citations")
                if not isinstance(cites, list):  # null on the start, as the SDK accepts
                    cites = block["citations"] = []
                cites.append(delta.get("citation"))
        elif kind == "message_start":
            msg = obj.get("message")
            if isinstance(msg, dict):
                message = dict(msg)
                if isinstance(msg.get("usage"), dict):
                    usage.update(msg["usage"])
        elif kind == "content_block_start":
            start = obj.get("content_block")
            if isinstance(start, dict):
                blocks[_index(obj)] = dict(start)
        elif kind == "message_delta":
            delta = obj.get("delta")
            if isinstance(delta, dict):
                if message is None:
                    message = {"type": "message", "role": "assistant"}
                # As the SDK: the stop members are set as they come, a null other (`container`)
                # does not erase `message_start`'s.
                message.update({k: v for k, v in delta.items() if v is not None or k.startswith("stop_")})
            u = obj.get("usage")
            if isinstance(u, dict):
                usage.update({k: v for k, v in u.items() if v is not None})
                final = True  # the closing delta's counts are the message's: billed as they are
        elif kind == "message_stop":
            complete = True
        elif kind == "error":
            error = error_message(obj) or "stream error"

    if not seen:
        return None
    if message is None:
        message = {"type": "message", "role": "assistant"}
    content: list[dict[str, Any]] = []
    for idx in sorted(set(blocks) | set(parts), key=lambda i: i if isinstance(i, int) else 0):
        block = blocks.get(idx) or {"type": "text"}
        joined = "".join(parts.get(idx, ()))
        btype = block.get("type")
        if isinstance(btype, str) and btype in _TOOL_BLOCKS:
            if joined:
                try:
                    block["input"] = loads(joined)
                except orjson.JSONDecodeError:
                    block["input"] = joined
        elif btype == "thinking":
            block["thinking"] = str(block.get("thinking") or "") + joined
        elif idx in parts:
            block["text"] = str(block.get("text") or "") + joined
        content.append(block)
    message["content"] = content
    if usage:
        message["usage"] = usage
    model = message.get("model")
    return StreamResult(
        message, parse_usage(usage or None), model if isinstance(model, str) else None, error, complete, final
    )


def _index(obj: dict[str, Any]) -> Any:
    """An event's block index; a non-int (a list, a dict: no key) counts as 0, as the sort
    counts one, rather than raise and cost the record its message."""
    idx = obj.get("index", 0)
    return idx if isinstance(idx, int) else 0


def _event(data: bytes, kind: str) -> dict[str, Any] | None:
    try:
        obj = loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and obj.get("type") == kind else None


def stream_summary(raw: bytes) -> StreamResult | None:
    """A Messages stream's usage and model from `message_start` and the closing `message_delta`
    and `message_stop`; None for any other shape (the gateway then reassembles it). The worker
    reassembles the message later and has the last word on usage and errors."""
    ends = edge_events(raw, 2)
    if ends is None:
        return None
    (_, first), [(_, delta_data), (_, stop_data)] = ends
    start = _event(first, "message_start")
    delta = _event(delta_data, "message_delta")
    if start is None or delta is None or _event(stop_data, "message_stop") is None:
        return None
    usage: dict[str, Any] = {}
    msg = start.get("message")
    if isinstance(msg, dict) and isinstance(msg.get("usage"), dict):
        usage.update(msg["usage"])
    u = delta.get("usage")
    if isinstance(u, dict):
        usage.update({k: v for k, v in u.items() if v is not None})
    model = msg.get("model") if isinstance(msg, dict) else None
    return StreamResult(
        None, parse_usage(usage or None), model if isinstance(model, str) else None, None, True
    )


_ASSISTANT = role_is("assistant")


class Anthropic(Provider):
    """`/anthropic/...` → `LLMTAP_ANTHROPIC_BASE_URL` (Messages API)."""

    name = "anthropic"
    pricing_id: str | None = "anthropic"

    def base_url(self, settings: Settings) -> str | None:
        return settings.anthropic_base_url

    def usage_from_body(self, body: Any) -> Usage:
        return usage_from_body(body)

    def token_marker(self, path: str) -> re.Pattern[bytes] | None:
        # Text, thinking or tool input; `message_start` comes at once.
        return _OUTPUT if path.endswith("/messages") else None

    def reassemble_stream(self, raw: bytes) -> StreamResult | None:
        return reassemble_stream(raw)

    def stream_summary(self, raw: bytes) -> StreamResult | None:
        return stream_summary(raw)

    def turn(self, request: Any) -> Any:
        """The messages after the last assistant one (`system` and `tools` are resent)."""
        return after_last_reply(request, "messages", _ASSISTANT)

    def end_user(self, request: Any) -> str | None:
        return text_member(request, "metadata", "user_id")
