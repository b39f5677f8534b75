"""Retention: delete records and their bodies older than `LLMTAP_RETENTION_DAYS`, in the background.

Runs in `llmtap server` (and so in `llmtap up`): one place per deployment that already holds the
store and the body store. The cutoff is rounded down to midnight UTC, because the file body
store packs a tenant's bodies of one day together and removes whole packs. Rows go first, then
the bodies they referenced: a crash in between leaves orphan body files (disk, not wrong
answers), never rows whose bodies are gone. Several servers running it at once is harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from llmtap.bodies.base import BodyStore
from llmtap.store.base import Store

log = logging.getLogger("llmtap.retention")


def cutoff_for(days: int, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=days)


async def purge(store: Store, bodies: BodyStore, cutoff: datetime, *, batch: int = 10_000) -> int:
    """Delete everything created before `cutoff`; returns how many body refs were removed."""
    removed = 0
    while True:
        refs = await store.delete_older_than(cutoff, limit=batch)
        if not refs:
            return removed
        await bodies.delete_many(refs)
        removed += len(refs)


class RetentionTask:
    """Purges once shortly after start, then every `interval` seconds."""

    def __init__(
        self,
        store: Store,
        bodies: BodyStore,
        days: int,
        *,
        interval: float = 3600.0,
        first_delay: float = 10.0,
    ) -> None:
        self.store = store
        self.bodies = bodies
        self.days = days
        self.interval = interval
        self.first_delay = first_delay
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="llmtap-retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        await asyncio.sleep(self.first_delay)
        while True:
            cutoff = cutoff_for(self.days)
            try:
                n = await purge(self.store, self.bodies, cutoff)
                if n:
                    log.info("retention: removed records older than %s (%d bodies)", cutoff.date(), n)
            except Exception as e:  # an outage: try again next round
                log.warning("retention: purge failed, retrying later: %s: %s", type(e).__name__, e)
            await asyncio.sleep(self.interval)
