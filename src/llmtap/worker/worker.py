"""The log worker: consume batches from the queue, run the handler chain, acknowledge.

What each failure becomes:

- a message that is not a record we can read (garbage, unknown version) → dead-lettered at once
  with `RecordError`'s reason; the rest of the batch goes on;
- `TransientError` from the chain (store, body store or webhook down) → nothing is acknowledged,
  the same batch is retried with exponential backoff (0.1 s doubling to 30 s, with jitter) while
  the queue's leases are kept alive by its heartbeat; so an outage only delays;
- another exception on a multi-record batch → the batch is bisected until the record(s) that
  raise are isolated (handlers are idempotent, so re-running the good ones is harmless);
- a record that fails (raises alone, or `Item.fail`) → retried with backoff up to
  `worker_max_attempts`, then dead-lettered with the reason (e.g. "cost: ValueError: ...");
- a message that kills the worker *process* → redelivered with `delivery_count > 1`, handled
  alone with a persisted attempt count, dead-lettered after `worker_max_attempts` deliveries
  ("delivered N times without ack: ...") while the records around it are stored.

Then everything stored or dead-lettered is acknowledged in one call. Each partition's records
go through the chain in publish order, and the queue hands out nothing more of a partition
until this batch is acknowledged, so ordering holds across batches too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from llmtap.config import Settings
from llmtap.errors import BackendUnavailable, RecordError, TransientError
from llmtap.handlers.base import Chain, Item
from llmtap.record import LogRecord, decode
from llmtap.runtime import OnBackends, SharedBackends, open_when_back

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.queue.base import Delivery, Queue
    from llmtap.store.base import Store

log = logging.getLogger("llmtap.worker")

PROCESSED = Counter("llmtap_worker_records_processed_total", "Records that went through the whole chain")
DEAD_LETTERED = Counter(
    "llmtap_worker_records_dead_lettered_total", "Records moved to the dead-letter place", ["cause"]
)
RETRIES = Counter(
    "llmtap_worker_retries_total",
    "Retries: of a whole batch after an outage (transient) or of a failing record (record)",
    ["kind"],
)
BATCH_SECONDS = Histogram(
    "llmtap_worker_batch_seconds",
    "From consuming a batch to acknowledging it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

BACKOFF_START = 0.1
BACKOFF_CAP = 5.0  # an outage ends when the backend is back; do not sleep far past it
PROGRESS_EVERY = 10.0  # seconds between progress lines at info level


def _jitter(delay: float) -> float:
    """Full jitter in [delay/2, delay]: workers that failed together do not retry together."""
    return delay * (0.5 + random.random() / 2)


async def _isolate(chain: Chain, items: list[Item]) -> None:
    """Run the chain; on an unexpected error bisect until the failing records are pinned down."""
    live = [i for i in items if i.ok]
    if not live:
        return
    try:
        await chain.run(live)
    except TransientError:
        raise
    except Exception as e:
        still = [i for i in live if i.ok]
        if len(still) <= 1:
            for i in still:  # the chain fails single items itself; this is a last resort
                i.fail(f"{type(e).__name__}: {e}")
            return
        mid = len(still) // 2
        await _isolate(chain, still[:mid])
        await _isolate(chain, still[mid:])


async def process_records(chain: Chain, records: Sequence[LogRecord]) -> list[Item]:
    """Run records through the chain once; returns one `Item` per record, in order.

    Items with `error` set could not be processed (the caller retries or dead-letters them).
    Raises `TransientError` when a backend is down: then nothing can be assumed done.
    Used by the worker and by the server's `POST /api/v1/ingest`.
    """
    items = [Item(r) for r in records]
    await _isolate(chain, items)
    return items


@dataclass(slots=True)
class WorkerStats:
    batches: int = 0
    processed: int = 0
    dead_lettered: int = 0
    transient_retries: int = 0
    record_retries: int = 0


class _Abandon(Exception):
    """Stopping during an outage: leave the batch unacknowledged for redelivery."""


class WorkerService(OnBackends):
    """`llmtap worker`: a `runtime.Service` that drains the queue into the store.

    Store, body store and chain come from `backends` (shared, the caller's to close) or from a
    `SharedBackends` of its own over `store`/`bodies`/`chain` (objects given are used as they are,
    the rest opened from settings and closed at stop). The queue, given or not, is the worker's:
    a consumer connection is never shared.
    """

    name = "worker"

    def __init__(
        self,
        settings: Settings,
        *,
        queue: Queue | None = None,
        store: Store | None = None,
        bodies: BodyStore | None = None,
        chain: Chain | None = None,
        backends: SharedBackends | None = None,
    ) -> None:
        self.settings = settings
        self.linger = settings.worker_linger_ms / 1000.0
        if queue is None:
            from llmtap.queue.base import open_queue

            queue = open_queue(settings)
        self.queue = queue
        self._use_backends(settings, backends, store=store, bodies=bodies, chain=chain)
        self.stats = WorkerStats()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._progress_at = time.monotonic()
        self._progress_mark = (0, 0)

    # -- lifecycle ----------------------------------------------------------------------------
    async def start(self) -> list[str]:
        """Connect and start consuming; during an outage, start anyway and wait for it to end.

        A stack restarted during a queue or store outage must come up without an outside
        supervisor (like the gateway's fallback mode): the banner says what is down, the log
        says when it is back (one line per change), and work begins then. A wrong setting
        (`ConfigError`) still stops start-up.
        """
        self._stopping.clear()
        self._stack = self._start_stack()
        try:
            await self._open()
        except BackendUnavailable as e:
            self._task = asyncio.create_task(self._open_then_run(str(e)), name="llmtap-worker")
            return [f"worker    WAITING: {e} (consuming starts when it is back)"]
        except BaseException:
            await self._stack.aclose()
            raise
        self._task = asyncio.create_task(self._run(), name="llmtap-worker")
        return [f"worker    consuming {self.queue.description} → {self.backends.store_description()}"]

    async def _open(self) -> None:
        """The backends, then the queue; a failed queue connection is closed again, for a retry."""
        await self.backends.start_chain()
        try:
            await self.queue.connect("consumer")  # last: take partitions only once able to work
        except BaseException:
            with contextlib.suppress(Exception):
                await self.queue.close()
            raise
        # Closed first at stop: releases our partitions, so another worker takes them at once.
        self._stack.push_async_callback(self.queue.close)

    async def _open_then_run(self, reason: str) -> None:
        opened = await open_when_back(
            "worker",
            reason,
            self._open,
            self._pause,
            self._stopping.is_set,
            start=BACKOFF_START,
            cap=BACKOFF_CAP,
        )
        if not opened:
            return
        store = self.backends.store_description()
        log.warning("worker: backends are back; consuming %s → %s", self.queue.description, store)
        await self._run()

    async def stop(self) -> None:
        self._stopping.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.settings.shutdown_timeout)
            except TimeoutError:
                log.warning("worker: stop deadline passed; the current batch is left for redelivery")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            except Exception:
                log.exception("worker loop failed")
        await self._unwind()  # the queue, then the backends if they are ours

    # -- the loop -----------------------------------------------------------------------------
    async def _run(self) -> None:
        delay = BACKOFF_START
        while not self._stopping.is_set():
            try:
                deliveries = await self.queue.consume(self.settings.worker_batch_size, timeout=0.5)
            except Exception as e:  # the loop must outlive any failure, or the worker idles silently
                if isinstance(e, BackendUnavailable):
                    log.warning("worker: queue unavailable, retrying in %.1fs: %s", delay, e)
                else:
                    log.exception("worker: consuming failed, retrying in %.1fs", delay)
                await self._pause(_jitter(delay))
                delay = min(delay * 2, BACKOFF_CAP)
                continue
            delay = BACKOFF_START
            if deliveries:
                await self._handle_batch(deliveries)
                if len(deliveries) * 4 < self.settings.worker_batch_size and self.linger > 0:
                    # A small batch means we are ahead of the producers: wait a little so the
                    # next batch is bigger. Every batch costs commits and fsyncs (queue ack,
                    # store write, body pack) whatever its size, so this trades a few tens of
                    # milliseconds of log lag for several times less CPU per record.
                    await self._pause(self.linger)
            self._progress()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake up when asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)

    async def _handle_batch(self, deliveries: list[Delivery]) -> None:
        """Process one batch to the end (acknowledged), retrying whatever goes wrong.

        Unacknowledged deliveries block their partitions in this consumer, so a batch is never
        dropped: it is finished, or abandoned at stop (then the queue redelivers it).
        """
        t0 = time.monotonic()
        delay = BACKOFF_START
        dead: set[tuple[int, int]] = set()  # dead-lettered in an earlier try of this batch
        begun: dict[tuple[int, int], int] = {}  # attempts counted in an earlier try of this batch
        while True:
            try:
                await self._process(deliveries, dead, begun)
                break
            except _Abandon:
                log.info("worker: stopping during an outage; %d records left for redelivery", len(deliveries))
                return
            except Exception as e:  # a bug, or the queue failing on ack/dead-letter: same batch again
                if self._stopping.is_set():
                    log.warning("worker: stopping; batch left for redelivery after: %s", e)
                    return
                if isinstance(e, BackendUnavailable):  # an outage (ack during a broker restart)
                    log.warning("worker: queue unavailable, retrying the batch in %.1fs: %s", delay, e)
                else:
                    log.exception("worker: batch failed, retrying in %.1fs", delay)
                await self._pause(_jitter(delay))
                delay = min(delay * 2, BACKOFF_CAP)
        self.stats.batches += 1
        BATCH_SECONDS.observe(time.monotonic() - t0)

    async def _process(
        self, deliveries: list[Delivery], dead: set[tuple[int, int]], begun: dict[tuple[int, int], int]
    ) -> None:
        """Redelivered messages one by one (each may be what killed the last worker), then the rest.

        A message handed out before without an ack may have crashed the worker *process* (a
        segfault, the OOM killer): no exception to catch, so it would come back forever and
        hold its partition. Handled alone, with a persisted count of attempts begun, it is
        dead-lettered after `worker_max_attempts` deliveries while the records around it are
        stored. Per partition the redelivered messages precede new ones, so order holds.
        """
        todo = [d for d in deliveries if (d.partition, d.offset) not in dead]
        suspects = [d for d in todo if d.delivery_count > 1]
        for d in suspects:
            if (d.partition, d.offset) in begun:  # a re-run of this batch: counted already
                n = begun[(d.partition, d.offset)]
            else:
                n = begun[(d.partition, d.offset)] = await self.queue.begin_attempt(d)
            if n >= self.settings.worker_max_attempts:
                reason = f"delivered {n} times without ack: the worker died while processing it"
                await self._dead_letter(d, reason, "crash", dead)
                log.warning("worker: message %s/%s dead-lettered: %s", d.partition, d.offset, reason)
                continue
            try:
                await self._process_batch([d], dead)
            except _Abandon:
                with contextlib.suppress(Exception):
                    await self.queue.forget_attempt(d)  # stopping is not the message's fault
                raise
        rest = [d for d in todo if d.delivery_count <= 1]
        if rest:
            await self._process_batch(rest, dead)

    async def _dead_letter(self, d: Delivery, reason: str, cause: str, dead: set[tuple[int, int]]) -> None:
        await self.queue.dead_letter(d, reason)
        dead.add((d.partition, d.offset))  # a re-run of the batch (ack failed) must not repeat it
        self._count_dead(cause)

    async def _process_batch(self, deliveries: list[Delivery], dead: set[tuple[int, int]]) -> None:
        work: list[tuple[Delivery, LogRecord]] = []
        done: list[Delivery] = []
        for d in deliveries:
            try:
                work.append((d, decode(d.value)))
            except RecordError as e:
                await self._dead_letter(d, str(e), "decode", dead)
                log.warning("worker: message %s/%s dead-lettered: %s", d.partition, d.offset, e)
        attempts = [0] * len(work)
        pending = list(range(len(work)))
        transient = BACKOFF_START
        while pending:
            try:
                items = await process_records(self.chain, [work[i][1] for i in pending])
            except TransientError as e:
                if self._stopping.is_set():
                    raise _Abandon from e
                self.stats.transient_retries += 1
                RETRIES.labels("transient").inc()
                log.warning("worker: %s; retrying %d records in %.1fs", e, len(pending), transient)
                await self._pause(_jitter(transient))
                transient = min(transient * 2, BACKOFF_CAP)
                continue
            transient = BACKOFF_START
            failed: list[int] = []
            for idx, item in zip(pending, items, strict=True):
                if item.ok:
                    done.append(work[idx][0])
                    continue
                attempts[idx] += 1
                if attempts[idx] >= self.settings.worker_max_attempts:
                    assert item.error is not None
                    await self._dead_letter(work[idx][0], item.error, "handler", dead)
                    log.warning("worker: record %s dead-lettered: %s", item.record.id, item.error)
                else:
                    failed.append(idx)
            pending = failed
            if pending and self._stopping.is_set():
                raise _Abandon  # no time to retry: redelivered later, with fresh attempts
            if pending:
                self.stats.record_retries += len(pending)
                RETRIES.labels("record").inc(len(pending))
                await self._pause(_jitter(min(BACKOFF_CAP, BACKOFF_START * 2 ** (max(attempts) - 1))))
        if done:
            await self.queue.ack(done)
            self.stats.processed += len(done)
            PROCESSED.inc(len(done))

    def _count_dead(self, cause: str) -> None:
        self.stats.dead_lettered += 1
        DEAD_LETTERED.labels(cause).inc()

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_EVERY:
            return
        processed, dead = self.stats.processed, self.stats.dead_lettered
        p0, d0 = self._progress_mark
        if processed != p0 or dead != d0:
            rate = (processed - p0) / (now - self._progress_at)
            log.info(
                "worker: %d records stored (%.0f/s), %d dead-lettered in the last %.0fs",
                processed - p0,
                rate,
                dead - d0,
                now - self._progress_at,
            )
        self._progress_at, self._progress_mark = now, (processed, dead)
