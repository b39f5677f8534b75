"""Where a body goes: inline in the record, or in the body store, and under which key.

The one rule, with one limit (`LLMTAP_INLINE_BODY_BYTES`, 64 KiB by default): a body travels
inline in a queue message only if its inline bytes (zstd-compressed from `COMPRESS_MIN_BYTES`
on) are at most the limit; a larger body is written to the body store first, under `key`, and the
record carries the reference. A record has at most three bodies and bounded metadata
(`llmtap.limits`, ~150 KB), so with base64 a message stays under about 4 * limit + 150 KB (≈ 410 KB
by default), far below Kafka's 1 MB default `message.max.bytes` (keep the limit under ~200 KiB).

Who asks, and when:

- the gateway's record builder: `inline_body` (compress or not);
- the publisher, before a batch goes to a sink: `to_store(above=limit)`; only the records that
  `fits` may go to the queue or the ingest endpoint;
- the spool replayer, before spooled records go into the queue: `to_store(above=limit)` again;
- the worker's body handler: `to_store(above=-1)`, every inline body, so rows never carry
  body bytes (`key` makes a redelivered record rewrite the same keys).

When the body store is down, a record holding a body above the limit is not put in any message
(not the broker's, not the ingest endpoint's), not truncated and not held in memory: it goes,
its body inline, to the gateway's fsynced disk spool (bounded by `LLMTAP_SPOOL_MAX_BYTES`),
the local place that keeps it until the body store is back. The spool replayer then writes the
body to the body store and publishes the record with the reference; while the body store is
still down it leaves the segment untouched (nothing published twice, nothing lost). The
other records of the batch go on to the queue as usual. A user sees the record once the body
store is back — when the worker, which writes every body there, can store rows again anyway.

Readers (the API, the webhook deliverer) get a body's bytes back with `read`, whichever of the
two places it is in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from llmtap.bodies.base import body_key
from llmtap.cooperate import SLICE
from llmtap.record import Body, LogRecord, compress, decompress

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore

log = logging.getLogger("llmtap.bodies")

#: Bodies smaller than this travel uncompressed (`encoding="identity"`): zstd's per-frame cost
#: (~5 µs) buys almost nothing on a few hundred bytes.
COMPRESS_MIN_BYTES = 1024

#: The record's body fields and the part name each has in its body-store key.
PARTS = (("request_body", "request"), ("response_body", "response"), ("response_events", "events"))


def inline_body(data: bytes, *, size: int, truncated: bool, content_type: str | None, limit: int) -> Body:
    """A captured body as a record first carries it: inline, compressed unless it is small.

    Whether it may stay inline is decided later (`fits`, `to_store`), off the record builder,
    so the decision holds on every path the record takes.
    """
    if len(data) < COMPRESS_MIN_BYTES and len(data) <= limit:
        return Body(content_type=content_type, size=size, truncated=truncated, data=data)
    z = compress(data)
    return Body(content_type=content_type, size=size, truncated=truncated, encoding="zstd", data=z)


def key(record: LogRecord, part: str, data: bytes) -> str:
    """The body-store key of one of the record's bodies (`bodies.base.body_key`)."""
    return body_key(record.tenant, record.id, record.started_at, part, data)


def fits(record: LogRecord, limit: int) -> bool:
    """No body of the record is inline above the limit: it may travel in a queue message."""
    for attr, _ in PARTS:
        body: Body | None = getattr(record, attr)
        if body is not None and body.data is not None and len(body.data) > limit:
            return False
    return True


async def to_store(bodies: BodyStore, records: Sequence[LogRecord], *, above: int) -> int:
    """Write the records' inline bodies larger than `above` bytes (all of them with -1) to the
    body store in one `put_many`, then make the records carry the references. Returns how many.

    All or nothing: when the body store raises (`TransientError` on an outage) the records are
    left as they were. Idempotent: a body already stored keeps its reference.
    """
    puts: list[tuple[str, bytes]] = []
    swaps: list[tuple[LogRecord, str, Body]] = []
    for n, r in enumerate(records):
        for attr, part in PARTS:
            body: Body | None = getattr(r, attr)
            if body is None or body.data is None or body.ref is not None or len(body.data) <= above:
                continue
            puts.append((key(r, part, body.data), body.data))
            swaps.append((r, attr, body))
        if n % SLICE == SLICE - 1:
            await asyncio.sleep(0)
    if not puts:
        return 0
    refs = await bodies.put_many(puts)  # the store decides the ref (the file store packs them)
    for (r, attr, body), ref in zip(swaps, refs, strict=True):
        setattr(r, attr, msgspec.structs.replace(body, data=None, ref=ref))
    return len(puts)


async def read(bodies: BodyStore, body: Body) -> bytes | None:
    """The original bytes of a body, inline or in the body store; None when they are gone
    (retention, a damaged object). Raises `TransientError` when the body store is down."""
    raw = await bodies.get(body.ref) if body.ref is not None else body.data
    if raw is None or body.encoding != "zstd":
        return raw
    try:
        return decompress(raw)
    except Exception:  # a damaged body must not make the whole record unreadable
        log.warning("body %s is not valid zstd", body.ref or "(inline)")
        return None
