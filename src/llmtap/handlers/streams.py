"""Streams the gateway left to the worker: their message rebuilt from the events, first in the chain.

A whole stream (OpenAI chat ending in `[DONE]` after its usage chunk, Anthropic's ending in
`message_delta` and `message_stop`, Gemini's ending with a finish reason and its usage) costs the
gateway two or three event parses for its usage and model (`Provider.stream_summary`) instead of
a reassembly of every event; its record travels with the events and no `response_body`. Here
the message is rebuilt with the provider's `reassemble_stream`, as the gateway does for every
other stream, and the full result is the record's word on usage, error and outcome too
(`StreamResult.settle`), so the stored record is the one the gateway would have built
(`tests/test_stream_deferral.py`, `tests/test_record_golden.py`). A record the gateway built
whole, or whose response was omitted, passes through untouched, but for one decision made here
for every stream: one that ended with an error event gets the outcome `upstream_error`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from llmtap.bodies.offload import inline_body
from llmtap.cooperate import SLICE
from llmtap.handlers.base import Handler, Item
from llmtap.providers import provider_for
from llmtap.providers.common import dumps
from llmtap.record import LogRecord, body_bytes
from llmtap.redact import redact_text

log = logging.getLogger("llmtap.worker")


def deferred(record: LogRecord) -> bool:
    """The gateway shipped this stream's events for the worker to reassemble."""
    events = record.response_events
    return (
        record.streamed
        and record.response_body is None
        and events is not None
        and events.data is not None
        and not record.omit_response
    )


def settle_error(record: LogRecord) -> None:
    """A 2xx stream that ended with an error event did not answer: its outcome says so, so
    that stats, alerts and OpenTelemetry count it as an error as they count a 5xx."""
    if record.streamed and record.error and record.outcome == "completed" and (record.status or 0) < 400:
        record.outcome = "upstream_error"


def finish(record: LogRecord, inline_body_bytes: int) -> None:
    """Rebuild a deferred stream's message into `response_body`, with the usage, error and
    outcome of the full reassembly."""
    events = record.response_events
    raw = None if events is None else body_bytes(events)
    if events is None or raw is None:
        return
    fmt = provider_for(record.provider, record.path)
    result = fmt.reassemble_stream(raw)
    if result is None or result.message is None:
        return  # nothing to rebuild: the events stay the record's response, as the gateway does
    # The model as the gateway reads a whole stream: a named upstream's answer names the model
    # that answered (the gateway saw only the first chunk's); OpenAI's the one asked for.
    asked = {"model": record.model} if record.model else None
    model = fmt.model(record.path, asked, result.message) or record.model
    data = dumps(result.message)
    body = inline_body(
        data,
        size=len(data),
        truncated=events.truncated,
        content_type="application/json",
        limit=inline_body_bytes,
    )
    usage, outcome, error = result.settle(record.outcome, record.error)
    # All computed before anything is set: a failure leaves the record as the gateway sent it.
    record.response_body = body
    record.usage, record.outcome, record.model = usage, outcome, model
    record.error = redact_text(error)[:2000] if error else None


class StreamHandler(Handler):
    """Finishes deferred streams. One whose message cannot be rebuilt (a reassembly bug) is not
    failed: the gateway's record is complete without it (usage from the stream's ends, the
    events as its response), so it is stored as sent rather than dead-lettered."""

    name = "streams"

    def __init__(self, inline_body_bytes: int) -> None:
        self.inline = inline_body_bytes

    async def handle(self, items: Sequence[Item]) -> None:
        failed: dict[str, int] = {}
        for n, item in enumerate(items):
            if deferred(item.record):
                try:
                    finish(item.record, self.inline)
                except Exception as e:
                    failed[type(e).__name__] = failed.get(type(e).__name__, 0) + 1
            settle_error(item.record)
            if n % SLICE == SLICE - 1:
                await asyncio.sleep(0)
        if failed:
            # Error types only: a message could quote the bodies.
            log.warning("streams: %s; stored with their events and no message", failed)
