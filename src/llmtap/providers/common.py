"""What the OpenAI and Anthropic formats share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from llmtap.limits import MAX_TOKENS


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
