"""Retention: delete records and their bodies older than `LLMTAP_RETENTION_DAYS`, in the background.

Runs in `llmtap server` (and so in `llmtap up`): one place per deployment that already holds the
store and the body store. The cutoff is rounded down to midnight UTC, because the file body
store packs a tenant's bodies of one day together and removes whole packs. Rows go first, then
the bodies they referenced: a crash in between leaves orphan body files (disk, not wrong
answers), never rows whose bodies are gone. Several servers running it at once is harmless.

The same task empties the webhook delivery log: delivered and given-up deliveries finished more
than `LLMTAP_WEBHOOK_KEEP_DAYS` ago are deleted in bounded batches (one short transaction each, so
the deliverer and the worker's outbox writes never wait long); pending ones are never touched,
however old. This runs whether or not `LLMTAP_RETENTION_DAYS` is set.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import UTC, datetime, timedelta

from llmtap.bodies.base import BodyStore
from llmtap.errors import NotDeleted
from llmtap.store.base import Store
from llmtap.webhooks.db import WebhookDB, now_us

log = logging.getLogger("llmtap.retention")


def cutoff_for(days: int, now: datetime | None = None) -> datetime:
    now = now or datetime.now(UTC)
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=days)


#: Rounds a body that could not be deleted is tried again before it is given up on (and said
#: so): a key S3 refuses for good (object lock, a deny policy) must not be retried for ever.
OWED_ROUNDS = 24


async def purge(
    store: Store,
    bodies: BodyStore,
    cutoff: datetime,
    *,
    batch: int = 10_000,
    owed: dict[str, int] | None = None,
) -> int:
    """Delete everything created before `cutoff`; returns how many body refs were removed.

    The rows go first (their refs come back with them), so bodies the body store failed to
    delete are named by nothing any more: they are kept in `owed` (ref -> rounds the store
    refused it) and deleted before the next round's rows (they stayed for ever); one refused
    `OWED_ROUNDS` times is given up on. An outage counts no round.
    A failure there never holds back the rows. `owed` lives in the caller's memory: after a
    restart the day-folder sweep at the end of a round takes what it held."""
    owed = {} if owed is None else owed
    removed = 0
    if owed:
        refs = list(owed)
        try:
            await bodies.delete_many(refs)
        except NotDeleted as e:  # the others went; only the refused ones count a round
            refused = set(e.refs)
            given_up = 0
            for ref in refs:
                if ref not in refused:
                    del owed[ref]
                    removed += 1
                elif (tries := owed[ref] + 1) >= OWED_ROUNDS:
                    del owed[ref]
                    given_up += 1
                else:
                    owed[ref] = tries
            if given_up:
                log.error(
                    "retention: gave up deleting %d bodies refused %d rounds in a row (e.g. %s): %s",
                    given_up, OWED_ROUNDS, e.refs[0], e,
                )  # fmt: skip
            log.warning("retention: %d bodies of purged records still to delete: %s", len(owed), e)
        except Exception as e:  # an outage: nothing is counted, all are tried again
            log.warning("retention: %d bodies of purged records still to delete: %s", len(owed), e)
        else:
            removed += len(refs)
            owed.clear()
    while True:
        refs = await store.delete_older_than(cutoff, limit=batch)
        if not refs:
            # Bodies no row names (a reused id's second body) go with their day. A day of
            # margin: bodies written before day folders were UTC days (ingested times with an
            # offset) may sit in the folder of the day before their record's.
            try:
                swept = await bodies.delete_days_before(cutoff.date() - timedelta(days=1))
            except NotDeleted as e:  # keys S3 refuses for good (a lock): the rows still went
                log.warning("retention: %s", e)
                return removed
            if swept:
                log.info("retention: removed %d day folders of bodies before %s", swept, cutoff.date())
            return removed
        try:
            await bodies.delete_many(refs)
        except NotDeleted as e:
            owed.update(dict.fromkeys(e.refs, 1))
            raise
        except BaseException:
            for ref in refs:
                owed.setdefault(ref, 0)
            raise
        removed += len(refs)


async def purge_deliveries(db: WebhookDB, keep_days: float, *, batch: int = 5_000) -> int:
    """Delete delivered and given-up deliveries finished more than `keep_days` ago, `batch` rows
    per transaction; returns how many."""
    before = now_us() - int(keep_days * 86_400 * 1_000_000)
    total = 0
    while True:
        n = await db.purge_deliveries(before, batch)
        total += n
        if n < batch:
            return total
        await asyncio.sleep(0)  # between batches, whoever waits for the database goes first


class RetentionTask:
    """Purges once shortly after start, then every `interval` seconds: records and bodies when
    `days` is set, the webhook delivery log when `webhook_keep_days` is."""

    def __init__(
        self,
        store: Store,
        bodies: BodyStore,
        days: int | None,
        *,
        webhook_keep_days: float | None = None,
        interval: float = 3600.0,
        first_delay: float = 10.0,
    ) -> None:
        self.store = store
        self.bodies = bodies
        self.days = days
        self.webhook_keep_days = webhook_keep_days
        self.interval = interval
        self.first_delay = first_delay
        self._task: asyncio.Task[None] | None = None
        self._owed: dict[str, int] = {}  # refs of purged rows whose bodies are still to delete

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
            await self.run_once()
            await asyncio.sleep(self.interval)

    async def run_once(self) -> None:
        """One round; an outage is logged and the round tried again at the next interval."""
        if self.days:
            cutoff = cutoff_for(self.days)
            try:
                n = await purge(self.store, self.bodies, cutoff, owed=self._owed)
                if n:
                    log.info("retention: removed records older than %s (%d bodies)", cutoff.date(), n)
            except Exception as e:  # an outage: try again next round
                log.warning("retention: purge failed, retrying later: %s: %s", type(e).__name__, e)
        if self.webhook_keep_days:
            try:
                db = self.store.webhooks()
            except NotImplementedError:  # a store without an outbox
                return
            try:
                n = await purge_deliveries(db, self.webhook_keep_days)
                if n:
                    log.info("retention: removed %d finished webhook deliveries", n)
            except Exception as e:
                log.warning(
                    "retention: webhook delivery purge failed, retrying later: %s: %s", type(e).__name__, e
                )
