"""Body storage: inline bodies go to the body store, the record keeps references.

Runs first in the chain so the row the store writes never carries body bytes. Where a body goes
and under which key is `llmtap.bodies.offload`'s decision: here every inline body is moved
(`to_store(above=-1)`), one `put_many` per batch (one thread hop for files, concurrent uploads
for S3). Idempotent: keys are derived from the record (tenant, request id, start date, part) and
the bytes, so a redelivered record rewrites the same keys with the same bytes, a second request
reusing the id writes other keys (its row is refused; the first request's body stays), and a
body that already carries a reference is left alone. Any request id can name a body
(`key_segment` encodes it).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from llmtap.bodies import offload
from llmtap.bodies.base import BodyStore
from llmtap.cooperate import SLICE
from llmtap.handlers.base import Handler, Item
from llmtap.record import Body
from llmtap.store.search import SCOPE_REQUEST, SEARCH_BYTES, Scope, record_text


class BodyHandler(Handler):
    name = "bodies"

    def __init__(
        self, bodies: BodyStore, search_bytes: int = SEARCH_BYTES, search_scope: Scope = SCOPE_REQUEST
    ) -> None:
        self.bodies = bodies
        # The search text costs more than anything else in a worker on real answers (the index
        # pays per distinct trigram): `search_bytes = 0` skips it, reads of stored bodies too;
        # `search_scope = "turn"` leaves out the earlier messages a conversation resends.
        self.search_bytes = search_bytes
        self.search_scope = search_scope

    async def handle(self, items: Sequence[Item]) -> None:
        if self.search_bytes > 0:
            await self._search_texts(items)
        # TransientError on an outage: the batch is retried, the records left as they were.
        await offload.to_store(self.bodies, [i.record for i in items], above=-1)

    async def _search_texts(self, items: Sequence[Item]) -> None:
        """Each record's searchable text, while the bytes are here: inline bodies as they are,
        bodies the gateway already put in the body store (large ones) read back once."""
        stored: list[tuple[int, Body, str]] = []
        for n, item in enumerate(items):
            for attr, _ in offload.PARTS:
                body = getattr(item.record, attr)
                if body is not None and body.data is None and body.ref is not None:
                    stored.append((n, body, body.ref))
        fetched = await asyncio.gather(*(self.bodies.get(ref) for _, _, ref in stored))
        extra: dict[int, list[tuple[Body, bytes]]] = {}
        for (n, body, _), data in zip(stored, fetched, strict=True):
            if data is not None:
                extra.setdefault(n, []).append((body, data))
        for n, item in enumerate(items):
            if n % SLICE == SLICE - 1:  # the costliest Python per record: let requests run
                await asyncio.sleep(0)
            r = item.record
            raw = [
                (b, b.data)
                for b in (r.request_body, r.response_body, r.response_events)
                if b is not None and b.data is not None
            ]
            item.search_text = record_text(r, raw + extra.get(n, []), self.search_bytes, self.search_scope)
