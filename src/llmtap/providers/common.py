"""What the OpenAI and Anthropic formats share."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

from llmtap.limits import MAX_TOKENS

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def loads(data: bytes | str) -> Any:
    """JSON as the client's own parser reads it: orjson first; what it refuses but Python's
    `json` and JavaScript's `JSON.parse` take (a lone surrogate escape such as `\\ud83d`, a
    byte that is not UTF-8 inside a string) is read leniently, with U+FFFD in place of what
    cannot be text; a body with a byte-order mark, or in UTF-16, as JSON too. Raises
    `orjson.JSONDecodeError` when the data is not JSON at all.

    An upstream that splits an emoji's surrogate pair over two stream events, or answers one
    bad byte, must not cost a record its usage, its model or its reassembled message."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    try:
        try:
            obj = json.loads(data)  # bytes: a BOM, UTF-16 and UTF-32 are recognised (RFC 8259 §8.1)
        except UnicodeDecodeError:
            obj = json.loads(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
    except (ValueError, RecursionError):
        raise orjson.JSONDecodeError("not JSON", "", 0) from None
    return _scrub(obj)


def _scrub(v: Any) -> Any:
    """Lone surrogates (which no store or encoder takes) as U+FFFD, in keys and values."""
    if isinstance(v, str):
        return _LONE_SURROGATE.sub("\ufffd", v)
    if isinstance(v, list):
        return [_scrub(x) for x in v]
    if isinstance(v, dict):
        return {_scrub(k): _scrub(x) for k, x in v.items()}
    return v


def error_message(body: Any) -> str | None:
    """`error.message` of an error body or stream error event (both providers nest it the same
    way); the error's type or code when it has no message."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
            return str(msg) if msg is not None else str(err.get("type") or err.get("code") or "error")
        if isinstance(err, str):  # `{"error": "..."}`: Ollama, some proxies
            return err
        if body.get("object") == "error" and body.get("message") is not None:  # vLLM, Mistral
            msg = body["message"]
            return msg if isinstance(msg, str) else orjson.dumps(msg).decode()
    return None


def after_last_reply(request: Any, key: str, is_reply: Callable[[Any], bool]) -> Any:
    """The messages a request adds to its conversation: those after the model's last reply in
    `request[key]`; the whole request when it holds no earlier reply (a first turn, or an API
    without history).

    The last message is always new, whatever its role (an Anthropic assistant prefill), so the
    search for a reply starts before it.
    """
    items = request.get(key) if isinstance(request, dict) else None
    if not isinstance(items, list):
        return request
    for i in range(len(items) - 2, -1, -1):
        if is_reply(items[i]):
            return items[i + 1 :]
    return request


def role_is(role: str) -> Callable[[Any], bool]:
    """A message test for `after_last_reply`: the message's `role` is `role`."""
    return lambda m: isinstance(m, dict) and m.get("role") == role


def token_count(value: Any) -> int | None:
    """A provider's token count as the record keeps it: an int from 0 to `MAX_TOKENS`, else
    None (unknown)."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None
