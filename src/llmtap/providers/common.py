"""What the OpenAI and Anthropic formats share."""

from __future__ import annotations

from typing import Any


def error_message(body: Any) -> str | None:
    """`error.message` of an error body or stream error event (both providers nest it the same
    way); the error's type or code when it has no message."""
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):
            msg = err.get("message")
            return str(msg) if msg is not None else str(err.get("type") or err.get("code") or "error")
    return None
