"""Server-sent events: split a captured byte stream into (event name, data) pairs.

Used off the latency path (record building) on the raw bytes the gateway relayed. Follows the
WHATWG framing rules that matter for LLM providers: events end at a blank line, any of
CRLF / LF / CR ends a line, several `data:` lines join with LF, comments (`:`) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import msgspec

from llmtap.record import Outcome, Usage


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
        # Fast paths: OpenAI's `data: {...}` and Anthropic's `event: x\ndata: {...}`.
        nl = block.count(b"\n")
        if nl == 0:
            if block.startswith(b"data: "):
                yield None, block[6:]
                continue
        elif nl == 1 and block.startswith(b"event: "):
            name, _, line = block.partition(b"\n")
            if line.startswith(b"data: "):
                yield name[7:].decode("utf-8", "replace").strip(), line[6:]
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


def data_payloads(data: bytes) -> list[bytes]:
    """The data of every event, when event names do not matter (OpenAI's format).

    Fast path for streams made only of single-line `data: ...` events (one split and one
    comprehension); anything else goes through `iter_events`.
    """
    if b"\r" not in data and data.startswith(b"data: "):
        blocks = data.split(b"\n\n")
        if data.count(b"\n") == 2 * (len(blocks) - 1):  # no block holds a line break of its own
            return [b[6:] for b in blocks if b.startswith(b"data: ")]
    return [payload for _, payload in iter_events(data)]


def edge_events(
    data: bytes, last: int
) -> tuple[tuple[str | None, bytes], list[tuple[str | None, bytes]]] | None:
    """The first event and the last `last` events of a stream, for shortcuts that read only a
    stream's ends (`Provider.stream_summary`); None unless the stream ends with a blank line and
    each of those blocks is one event (no comment, no empty block among them).

    The last events may include the first one in a short stream.
    """
    if b"\r" in data:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not data.endswith(b"\n\n"):
        return None
    first_end = data.find(b"\n\n") + 2
    first = list(iter_events(data[:first_end]))
    start = len(data) - 2
    for _ in range(last):
        start = data.rfind(b"\n\n", 0, start)
        if start < 0:
            break
    tail = list(iter_events(data[start + 2 if start >= 0 else 0 :]))
    if len(first) != 1 or len(tail) != last:
        return None
    return first[0], tail


#: A blank line: two line ends in a row, where a line ends at CRLF, LF or a CR alone (a CR
#: followed by LF is one CRLF, never a CR and then an LF).
_BLANK = re.compile(rb"(?:\r\n|\r(?!\n)|\n)(?:\r\n|\r(?!\n)|\n)")


def last_boundary(data: bytes) -> int:
    """Offset just past the last complete event in `data` (-1 if none is complete)."""
    if data.endswith(b"\n\n"):  # the usual case: a read ends where an event ends
        return len(data)
    if b"\r" not in data:
        i = data.rfind(b"\n\n")
        return i + 2 if i >= 0 else -1
    end, n = -1, len(data)
    for m in _BLANK.finditer(data):
        if m.end() == n and data[-1] == 0x0D and b"\r\n" in data:
            break  # CRLF framing: a last CR the next read may join to a LF is not yet an end
        end = m.end()
    return end


def event_bounds(data: bytes, pos: int) -> tuple[int, int]:
    """(start, end) of the event of complete-event bytes `data` that contains offset `pos`;
    `end` includes the event's blank line."""
    if b"\r" not in data:
        a = data.rfind(b"\n\n", 0, pos)
        i = data.find(b"\n\n", pos)
        return (a + 2 if a >= 0 else 0), (i + 2 if i >= 0 else len(data))
    start = 0
    for m in _BLANK.finditer(data, 0, pos):
        start = m.end()
    nxt = _BLANK.search(data, pos)
    return start, (nxt.end() if nxt else len(data))


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
    """What a provider's stream reassembler found: the message, its usage, model and error.

    `complete` says the stream reached the provider's own end marker (`data: [DONE]`,
    `message_stop`, `response.completed`): the client had everything, whatever happened to the
    connection afterwards. `final` says its usage came in the event that carries the final
    counts (OpenAI's usage chunk, Anthropic's `message_delta`): a stream cut after it is still
    priced, on the counts the provider bills. `marked` says the format ends every whole stream
    with that marker (a Responses API stream, `response.completed` or another end): without it
    the stream was cut, however its body was framed.
    """

    __slots__ = ("complete", "error", "final", "marked", "message", "model", "usage")

    def __init__(
        self,
        message: dict[str, Any] | None,
        usage: Usage,
        model: str | None,
        error: str | None,
        complete: bool = False,
        final: bool = False,
        marked: bool = False,
    ) -> None:
        self.message = message
        self.usage = usage
        self.model = model
        self.error = error
        self.complete = complete
        self.final = final
        self.marked = marked

    def settle(self, outcome: Outcome, error: str | None) -> tuple[Usage, Outcome, str | None]:
        """The record's usage, outcome and error once this result is known (gateway and worker
        alike, so a stream reassembled in either ends the same)."""
        usage = self.usage
        if not self.complete and not self.final and usage.source == "provider":
            # Counts seen before the stream broke off, not the provider's final ones.
            usage = msgspec.structs.replace(usage, source="partial")
        if self.complete and outcome == "client_disconnected":
            # The client left after the provider's end marker (SDKs stop reading at `[DONE]`):
            # it had the whole stream.
            outcome, error = "completed", None
        return usage, outcome, error or self.error
