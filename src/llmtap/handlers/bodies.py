"""Body storage: inline bodies go to the body store, the record keeps references.

Runs first in the chain so the row the store writes never carries body bytes. One `put_many`
per batch (one thread hop for files, concurrent uploads for S3). Idempotent: keys are derived
from the record (tenant, request id, start date, part) and the bytes, so a redelivered record
rewrites the same keys with the same bytes, a second request reusing the id writes other keys
(its row is refused; the first request's body stays), and a body that already carries a
reference is left alone. Any request id can name a body (`key_segment` encodes it).
"""

from __future__ import annotations

from collections.abc import Sequence

from llmtap.bodies.base import BodyStore, body_key
from llmtap.handlers.base import Handler, Item
from llmtap.record import Body, LogRecord

_PARTS = (("request_body", "request"), ("response_body", "response"), ("response_events", "events"))


class BodyHandler(Handler):
    name = "bodies"

    def __init__(self, bodies: BodyStore) -> None:
        self.bodies = bodies

    async def handle(self, items: Sequence[Item]) -> None:
        puts: list[tuple[str, bytes]] = []
        swaps: list[tuple[LogRecord, str, Body, str]] = []
        for item in items:
            r = item.record
            pending = [
                (attr, part, body)
                for attr, part in _PARTS
                if (body := getattr(r, attr)) is not None and body.ref is None and body.data is not None
            ]
            if not pending:
                continue
            for attr, part, body in pending:
                assert body.data is not None
                key = body_key(r.tenant, r.id, r.started_at, part, body.data)
                puts.append((key, body.data))
                swaps.append((r, attr, body, key))
        if not puts:
            return
        refs = await self.bodies.put_many(puts)  # TransientError on an outage: batch retried
        for (r, attr, body, _), key in zip(swaps, refs, strict=True):
            setattr(
                r,
                attr,
                Body(
                    content_type=body.content_type,
                    size=body.size,
                    truncated=body.truncated,
                    encoding=body.encoding,
                    ref=key,
                ),
            )
