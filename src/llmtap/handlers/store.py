"""Analytics store insert: one `write_batch` per batch.

The store ignores a (tenant, id) it already has, which turns at-least-once delivery into
exactly one row per request. An outage raises `TransientError` (nothing is acknowledged and the
batch is retried); any other error lets the worker bisect the batch to find the bad record.
"""

from __future__ import annotations

from collections.abc import Sequence

from prometheus_client import Counter

from llmtap.handlers.base import Handler, Item
from llmtap.store.base import Store
from llmtap.webhooks.outbox import Endpoint

ROWS = Counter(
    "llmtap_store_rows_written_total",
    "New rows the store took (a record it had already, delivered again, is not one)",
)


class StoreHandler(Handler):
    name = "store"
    #: New rows written by every store handler of this process (`/healthz` of a worker).
    rows_written = 0

    def __init__(self, store: Store, env_endpoint: Endpoint | None = None) -> None:
        self.store = store
        self.env_endpoint = env_endpoint

    async def start(self) -> None:
        # The environment's endpoint exists before the first record, so that record's delivery
        # is written with it (a worker may run without any server).
        if self.env_endpoint is not None:
            await self.store.webhooks().put_endpoint(self.env_endpoint)

    async def handle(self, items: Sequence[Item]) -> None:
        new = await self.store.write_batch([i.record for i in items], [i.search_text for i in items])
        StoreHandler.rows_written += new
        ROWS.inc(new)
