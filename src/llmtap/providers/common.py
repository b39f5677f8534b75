"""What the OpenAI and Anthropic formats share."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import orjson

from llmtap.limits import MAX_TOKENS
from llmtap.providers.sse import StreamResult

_SURROGATE = re.compile("[\ud800-\udfff]")
#: What orjson says of JSON it refuses that Python's `json` and `JSON.parse` read: a lone
#: surrogate escape, a byte that is not UTF-8, a byte-order mark (UTF-16 reads as "not UTF-8").
#: Anything else (a body cut short, NaN, HTML) is refused as before: a lenient second parse of
#: a 10 MB cut answer would cost the gateway's loop a second for nothing (review).
_LENIENT = ("surrogate", "UTF-8", "byte order mark")
#: Python's parser takes ~25x orjson's time (1 s for 10 MB of numbers) on the gateway's event
#: loop: above this, such a body is not read as JSON (its record keeps the bytes, as before).
_LENIENT_MAX = 1024 * 1024


def dumps(obj: Any) -> bytes:
    """JSON of a message rebuilt from a stream: orjson, else Python's `json` for the integers
    orjson refuses (past 64 bits: msgspec's typed chunks keep them whole). A stream whose
    `created` was 2**64 cost its record model, tokens, user and bodies (fuzz2). Raises
    ValueError for one nested too deep for either (a tool's `[[[...]]]`): a RecursionError says
    the interpreter's stack, not the data, failed, and a caller should not have to know it."""
    try:
        return orjson.dumps(obj)
    except TypeError:
        try:
            return json.dumps(obj, default=str).encode()
        except RecursionError:
            raise ValueError("nested too deep for JSON") from None


def loads(data: bytes | str, *, keep_surrogates: bool = False) -> Any:
    """JSON as the client's own parser reads it: orjson first; what it refuses only for its
    text (a lone surrogate escape such as `\\ud83d`, a byte that is not UTF-8, a byte-order
    mark, UTF-16) is read by Python's `json`, with U+FFFD in place of what cannot be text.
    Raises `orjson.JSONDecodeError` when orjson refused it for anything else.

    An upstream that sends one bad byte, or an emoji's surrogate pair split over two stream
    events, must not cost a record its usage, model or message. `keep_surrogates` leaves lone
    surrogates in place for a reassembler, which joins the events' text and then `scrub`s it
    (so the two halves become the emoji again). Never for bodies sent on: this parse is not
    byte-faithful (the gateway forwards what it cannot parse strictly unchanged)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as e:
        if len(data) > _LENIENT_MAX or not any(word in str(e) for word in _LENIENT):
            raise
    try:
        try:
            obj = json.loads(data)  # bytes: a BOM, UTF-16 and UTF-32 are recognised (RFC 8259 §8.1)
        except UnicodeDecodeError:
            obj = json.loads(data.decode("utf-8", "replace") if isinstance(data, bytes) else data)
    except (ValueError, RecursionError):
        raise orjson.JSONDecodeError("not JSON", "", 0) from None
    return obj if keep_surrogates else scrub(obj)


def _fixed(text: str) -> str:
    """Surrogate pairs joined, lone surrogates (which no store or encoder takes) as U+FFFD."""
    if _SURROGATE.search(text) is None:
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def scrub(obj: Any) -> Any:
    """`obj` with every string `_fixed`, keys too; lists and dicts in place. A loop, not
    recursion: JSON nested as deep as a parser reads it must not raise here (review)."""
    if isinstance(obj, str):
        return _fixed(obj)
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            for i, v in enumerate(x):
                if isinstance(v, str):
                    x[i] = _fixed(v)
                elif isinstance(v, list | dict):
                    stack.append(v)
        elif isinstance(x, dict):
            for k, v in list(x.items()):
                if isinstance(v, str):
                    x[k] = v = _fixed(v)
                elif isinstance(v, list | dict):
                    stack.append(v)
                if isinstance(k, str) and _SURROGATE.search(k):
                    del x[k]
                    x[_fixed(k)] = v
    return obj


def scrub_stream(result: StreamResult | None, raw: bytes) -> StreamResult | None:
    """A reassembled stream's `StreamResult` with its text `scrub`bed when the events held a
    `\\uD8xx`-style escape (a byte test first: streams without one pay nothing)."""
    if result is None or (b"\\ud" not in raw and b"\\uD" not in raw):
        return result
    result.message = scrub(result.message)
    result.model = scrub(result.model) if isinstance(result.model, str) else result.model
    result.error = scrub(result.error) if isinstance(result.error, str) else result.error
    return result


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
