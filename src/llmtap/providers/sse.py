"""Server-sent events: split a captured byte stream into (event name, data) pairs.

Used off the latency path (record building) on the raw bytes the gateway relayed. Follows the
WHATWG framing rules that matter for LLM providers: events end at a blank line, any of
CRLF / LF / CR ends a line, several `data:` lines join with LF, comments (`:`) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from llmtap.record import Usage


def iter_events(data: bytes) -> Iterator[tuple[str | None, bytes]]:
    """Yield `(event, data)` for every event that carries data, in stream order.

    A trailing event without its blank line (a cut stream) is still yielded: its data may be
    complete even though the terminator never came, and the JSON parse that follows rejects it
    if it is not.
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    for block in data.split(b"\n\n"):
        if not block:
            continue
        event: str | None = None
        lines: list[bytes] = []
        for line in block.split(b"\n"):
            if line.startswith(b"data:"):
                value = line[5:]
                lines.append(value[1:] if value.startswith(b" ") else value)
            elif line.startswith(b"event:"):
                event = line[6:].strip().decode("utf-8", "replace")
        if lines:
            yield event, lines[0] if len(lines) == 1 else b"\n".join(lines)


def last_boundary(data: bytes) -> int:
    """Offset just past the last complete event in `data` (-1 if none is complete)."""
    i = data.rfind(b"\n\n")
    end = i + 2 if i >= 0 else -1
    j = data.rfind(b"\r\n\r\n")
    if j >= 0 and j + 4 > end:
        end = j + 4
    return end


def split_events(data: bytes) -> list[bytes]:
    """Split complete events, each keeping its own terminator (so `b"".join` restores `data`)."""
    out: list[bytes] = []
    pos, n = 0, len(data)
    while pos < n:
        i = data.find(b"\n\n", pos)
        j = data.find(b"\r\n\r\n", pos)
        if i < 0 and j < 0:
            out.append(data[pos:])
            break
        if j >= 0 and (i < 0 or j < i):
            end = j + 4
        else:
            end = i + 2
        out.append(data[pos:end])
        pos = end
    return out


class StreamResult:
    """What a provider's stream reassembler found: the message, its usage, model and error."""

    __slots__ = ("error", "message", "model", "usage")

    def __init__(
        self,
        message: dict[str, Any],
        usage: Usage,
        model: str | None,
        error: str | None,
    ) -> None:
        self.message = message
        self.usage = usage
        self.model = model
        self.error = error
