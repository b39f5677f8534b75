"""The log worker: consume batches from the queue, run the handler chain, acknowledge.

What happens to a record that fails is decided in `llmtap.handlers.chain` (`run_with_attempts`
and `RetryPolicy`, the same for the server's ingest drain, which is a `WorkerService` too). This
module applies that policy to what only a consumer sees:

- a message that is not a record we can read (garbage, unknown version) → dead-lettered at once
  with `RecordError`'s reason; the rest of the batch goes on;
- a record the policy gives up → dead-lettered with its reason (e.g. "cost: ValueError: ...");
- a message that kills the worker *process* → redelivered with `delivery_count > 1`, handled
  alone with a persisted attempt count (`Queue.begin_attempt`), dead-lettered after
  `RetryPolicy.crash_reason` says so ("delivered N times without ack: ...") while the records
  around it are stored;
- a consume or an acknowledgement that fails → retried after `RetryPolicy.delay`, the batch's
  leases kept alive by the queue's heartbeat; nothing is acknowledged before the chain succeeded.

Then everything stored or dead-lettered is acknowledged in one call. Each partition's records
go through the chain in publish order, and the queue hands out nothing more of a partition
until this batch is acknowledged, so ordering holds across batches too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from prometheus_client import Counter, Histogram

from llmtap import limits
from llmtap.config import Settings
from llmtap.cooperate import SLICE, Foreground
from llmtap.errors import BackendUnavailable, MessageRefused, RecordError
from llmtap.handlers.chain import OUTAGE_LOG_EVERY, Abandoned, Chain, RetryPolicy, run_with_attempts
from llmtap.record import LogRecord, decode, encode, lightened, stripped
from llmtap.runtime import OnBackends, SharedBackends, open_when_back

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.queue.base import Delivery, Queue
    from llmtap.store.base import Store

log = logging.getLogger("llmtap.worker")

PROCESSED = Counter(
    "llmtap_worker_records_processed_total",
    "Records that went through the whole chain (one delivered again counts again; the store keeps one row:"
    " llmtap_store_rows_written_total)",
)
DEAD_LETTERED = Counter(
    "llmtap_worker_records_dead_lettered_total", "Records moved to the dead-letter place", ["cause"]
)
RETRIES = Counter(
    "llmtap_worker_retries_total",
    "Retries: of a whole batch after an outage (transient) or of a failing record (record)",
    ["kind"],
)
DEFERRED = Counter(
    "llmtap_worker_deferred_seconds_total",
    "Seconds the worker waited for the gateway's requests to leave the event loop some time (llmtap up)",
)
BATCH_SECONDS = Histogram(
    "llmtap_worker_batch_seconds",
    "From consuming a batch to acknowledging it",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

PROGRESS_EVERY = 10.0  # seconds between progress lines at info level
STALL_WARN_EVERY = 30.0  # seconds a batch may run before the worker says it is still waiting


@dataclass(slots=True)
class WorkerStats:
    batches: int = 0
    processed: int = 0
    dead_lettered: int = 0
    transient_retries: int = 0
    record_retries: int = 0


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
        policy: RetryPolicy | None = None,
        foreground: Foreground | None = None,
    ) -> None:
        """`foreground`: the requests of a gateway sharing this event loop (`llmtap up`), which
        this worker lets go first while they keep the loop busy (`llmtap.cooperate.Foreground`)."""
        self.settings = settings
        self.foreground = foreground
        self.policy = policy if policy is not None else RetryPolicy.from_settings(settings)
        self.linger = settings.worker_linger_ms / 1000.0
        self.pipeline = settings.worker_pipeline
        if queue is None:
            from llmtap.queue.base import open_queue

            queue = open_queue(settings)
        self.queue = queue
        self._use_backends(settings, backends, store=store, bodies=bodies, chain=chain)
        self.stats = WorkerStats()
        self._stopping = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._progress_at = time.monotonic()
        self._progress_mark = (0, 0, 0.0)
        #: Why the worker is not consuming (a backend it waits for at start), or None.
        self._starting: str | None = None
        #: Outages met while running, by what failed ("queue", "chain"): each ends on its own.
        self._outages: dict[str, str] = {}
        #: Batches whose last try failed (an ack or a dead-letter write), and the tries of all
        #: of them since the first failed: one outage, reported as one (`_batch_failed`).
        self._failing: set[int] = set()
        self._batch_tries = 0

    @property
    def waiting(self) -> str | None:
        """Why the worker is not consuming or storing now (`/healthz`), or None."""
        if self._starting is not None:
            return self._starting
        return next(iter(self._outages.values()), None)

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
            self._starting = str(e)
            self._task = asyncio.create_task(self._open_then_run(str(e)), name="llmtap-worker")
            return [f"worker    WAITING: {e} (consuming starts when it is back)", *self._notes()]
        except BaseException:
            await self._stack.aclose()
            raise
        self._task = asyncio.create_task(self._run(), name="llmtap-worker")
        line = f"worker    consuming {self.queue.description} → {self.backends.store_description()}"
        return [line, *self._notes()]

    def _notes(self) -> list[str]:
        """What a user would otherwise find out only from empty search results."""
        if self.settings.search_bytes == 0:
            return ["          search off (LLMTAP_SEARCH_BYTES=0): records stored now are not found by q="]
        if self.settings.search_scope == "turn":
            return [
                "          search by turn (LLMTAP_SEARCH_SCOPE=turn): q= finds a message in the request"
                " that added it to its conversation"
            ]
        return []

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
            start=self.policy.backoff_start,
            cap=self.policy.backoff_cap,
        )
        if not opened:
            return
        self._starting = None
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
        """Consume while up to `worker_pipeline` batches are in flight.

        A batch passes through three threads one after the other: the queue's (fetch), the
        event loop's (the chain), the store's writer, then the queue's again (ack). With one
        batch at a time two of them idle; with two, the next batch's chain runs while the last
        one is written. The GIL keeps the gain small (+7%, bench/README.md), but it is free.
        Order per partition holds whatever the backend hands out: a batch that shares a
        partition with one in flight starts only once that one is done (`_handle_after`).
        """
        failures = 0
        inflight: dict[asyncio.Task[None], frozenset[int]] = {}
        fg = self.foreground
        try:
            while not self._stopping.is_set():
                self._progress()
                if len(inflight) >= self.pipeline:
                    await self._reap(inflight)
                    continue
                if fg is not None and fg.active():
                    while inflight:  # the probe must see the loop without this worker's own work
                        await self._reap(inflight)
                    waited = fg.waited
                    await fg.wait_turn(self._pause, self._stopping.is_set)
                    DEFERRED.inc(fg.waited - waited)
                    if self._stopping.is_set():
                        break
                try:
                    # With a batch in flight, take only what is ready: waiting here would hold
                    # up nothing, but waiting for that batch frees its partitions sooner.
                    deliveries = await self.queue.consume(
                        self.settings.worker_batch_size, timeout=0.0 if inflight else 0.5
                    )
                except Exception as e:  # the loop must outlive any failure, or the worker idles silently
                    failures += 1
                    delay = self.policy.delay(failures)
                    self._outage("queue", f"queue: {e}")  # each time: /healthz names the cause now
                    if failures == 1 or failures % OUTAGE_LOG_EVERY == 0:  # not a line per retry
                        still = "" if failures == 1 else f" (still, after {failures} tries)"
                        if isinstance(e, BackendUnavailable):
                            log.warning("worker: queue unavailable%s, retrying in %.1fs: %s", still, delay, e)
                        else:
                            log.exception("worker: consuming failed%s, retrying in %.1fs", still, delay)
                    await self._pause(delay)
                    continue
                if failures:
                    log.warning("worker: the queue answers again after %d tries", failures)
                    self._outage("queue", None)
                failures = 0
                if fg is not None:
                    fg.taken(len(deliveries), self.settings.worker_batch_size)
                if not deliveries:
                    if inflight:
                        await self._reap(inflight)
                    continue
                if any(d.delivery_count > 1 for d in deliveries):
                    # Redelivered messages may be what killed the last worker process: each is
                    # handled alone (`_process`) with nothing else in flight, or an innocent
                    # record in another batch would be counted as begun each time the culprit
                    # kills the process, and dead-lettered with it.
                    while inflight:
                        await self._reap(inflight)
                    await self._handle_batch(deliveries)
                    continue
                parts = frozenset(d.partition for d in deliveries)
                before = [t for t, p in inflight.items() if p & parts]
                task = asyncio.create_task(self._handle_after(before, deliveries), name="llmtap-worker-batch")
                inflight[task] = parts
                if len(deliveries) * 4 < self.settings.worker_batch_size and self.linger > 0:
                    # A small batch means we are ahead of the producers: wait a little so the
                    # next batch is bigger. Every batch costs commits and fsyncs (queue ack,
                    # store write, body pack) whatever its size, so this trades a few tens of
                    # milliseconds of log lag for several times less CPU per record.
                    await self._pause(self.linger)
        finally:
            await self._finish(inflight)

    async def _handle_after(self, before: list[asyncio.Task[None]], deliveries: list[Delivery]) -> None:
        if before:
            await asyncio.wait(before)
        await self._handle_batch(deliveries)

    async def _reap(self, inflight: dict[asyncio.Task[None], frozenset[int]]) -> None:
        """Wait until a batch in flight is done; a batch never raises, but log it if one did."""
        done, _ = await asyncio.wait(inflight, return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            del inflight[t]
            if not t.cancelled() and t.exception() is not None:
                log.error("worker: a batch failed", exc_info=t.exception())

    async def _finish(self, inflight: dict[asyncio.Task[None], frozenset[int]]) -> None:
        """At stop, let the batches in flight finish (each gives up on its own when stopping);
        when this loop is cancelled (the stop deadline), cancel them: they are redelivered."""
        try:
            while inflight:
                await self._reap(inflight)
        except asyncio.CancelledError:
            for t in inflight:
                t.cancel()
            await asyncio.gather(*inflight, return_exceptions=True)
            raise

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
        # A store or queue that hangs (a frozen server, a network black hole) raises nothing for
        # minutes: say so while it lasts, instead of storing nothing without a word.
        loop = asyncio.get_running_loop()
        watch: list[asyncio.TimerHandle] = []

        # `/healthz` says so too (503, as in an outage): a worker whose batch hangs stores
        # nothing, and a probe that read "ok" kept it in service for as long as the hang lasted.
        stall = f"stall {id(watch)}"

        def still_running() -> None:
            why = (
                f"a batch of {len(deliveries)} records has been running for "
                f"{time.monotonic() - t0:.0f}s (a store or queue that hangs?)"
            )
            log.warning("worker: %s", why)
            self._outage(stall, why)
            watch[0] = loop.call_later(STALL_WARN_EVERY, still_running)

        watch.append(loop.call_later(STALL_WARN_EVERY, still_running))
        try:
            finished = await self._retry_batch(deliveries)
        finally:
            watch[0].cancel()
            self._outage(stall, None)
        if finished:
            self.stats.batches += 1
            BATCH_SECONDS.observe(time.monotonic() - t0)

    async def _retry_batch(self, deliveries: list[Delivery]) -> bool:
        """True once the batch is acknowledged; False if it was left for redelivery at stop.

        A failing ack or dead-letter write is an outage as a failing consume is: `/healthz`
        says so (503, naming the latest cause), and the log when it begins, about once a minute
        while it lasts and when it ends, for all the batches in flight together (a line per
        retry per batch was 17 lines in 12 s, while `/healthz` said ok).
        """
        failures = 0
        dead: set[tuple[int, int]] = set()  # dead-lettered in an earlier try of this batch
        begun: dict[tuple[int, int], int] = {}  # attempts counted in an earlier try of this batch
        key = id(deliveries)
        try:
            while True:
                try:
                    await self._process(deliveries, dead, begun)
                    self._batch_back(key)
                    return True
                except Abandoned:
                    log.info(
                        "worker: stopping during an outage; %d records left for redelivery", len(deliveries)
                    )
                    return False
                except Exception as e:  # a bug, or the queue failing on ack/dead-letter: same batch again
                    if self._stopping.is_set():
                        log.warning("worker: stopping; batch left for redelivery after: %s", e)
                        return False
                    failures += 1
                    delay = self.policy.delay(failures)
                    self._batch_failed(key, e, delay)
                    await self._pause(delay)
        finally:  # left for redelivery (a stop): no longer failing either
            self._failing.discard(key)
            if not self._failing:
                self._outage("batch", None)

    def _batch_failed(self, key: int, e: Exception, delay: float) -> None:
        """A try of batch `key` failed: report the outage, one for all the batches in flight."""
        begins = not self._failing
        self._failing.add(key)
        self._batch_tries = 1 if begins else self._batch_tries + 1
        outage = isinstance(e, BackendUnavailable)  # (an ack during a broker restart)
        self._outage("batch", f"queue: {e}" if outage else f"a batch fails: {type(e).__name__}: {e}")
        if not begins and self._batch_tries % OUTAGE_LOG_EVERY:
            return  # not a line per retry
        still = "" if begins else f" (still, after {self._batch_tries} tries)"
        if outage:
            log.warning("worker: queue unavailable%s, retrying the batch in %.1fs: %s", still, delay, e)
        else:
            log.exception("worker: batch failed%s, retrying in %.1fs", still, delay)

    def _batch_back(self, key: int) -> None:
        """Batch `key` went through: the outage ends once no batch in flight is failing."""
        if key not in self._failing:
            return
        self._failing.discard(key)
        if not self._failing:
            log.warning("worker: the batches go through again after %d tries", self._batch_tries)
            self._outage("batch", None)

    async def _process(
        self, deliveries: list[Delivery], dead: set[tuple[int, int]], begun: dict[tuple[int, int], int]
    ) -> None:
        """Redelivered messages one by one (each may be what killed the last worker), then the rest.

        A message handed out before without an ack may have crashed the worker *process* (a
        segfault, the OOM killer): no exception to catch, so it would come back forever and
        hold its partition. Handled alone, with a persisted count of attempts begun, it is
        dead-lettered after `worker_max_attempts` deliveries while the records around it are
        stored (`RetryPolicy.crash_reason`). Per partition the redelivered messages precede new
        ones, so order holds.
        """
        todo = [d for d in deliveries if (d.partition, d.offset) not in dead]
        suspects = [d for d in todo if d.delivery_count > 1]
        for d in suspects:
            if (d.partition, d.offset) in begun:  # a re-run of this batch: counted already
                n = begun[(d.partition, d.offset)]
            else:
                n = begun[(d.partition, d.offset)] = await self.queue.begin_attempt(d)
            reason = self.policy.crash_reason(n)
            if reason is not None:
                await self._dead_letter(d, reason, "crash", dead)
                log.error("worker: message %s/%s dead-lettered: %s", d.partition, d.offset, reason)
                continue
            try:
                await self._process_batch([d], dead)
            except (Abandoned, asyncio.CancelledError):
                # A stop is not the message's fault: neither during an outage (`Abandoned`) nor
                # at the stop deadline (cancelled): five SIGTERMs while the store hung on a lock
                # dead-lettered a good record as a crash. (A SIGKILL then still counts: nothing
                # tells it from a message that kills the worker, however slowly.)
                with contextlib.suppress(Exception):
                    await self.queue.forget_attempt(d)
                raise
        rest = [d for d in todo if d.delivery_count <= 1]
        if rest:
            await self._process_batch(rest, dead)

    async def _dead_letter(self, d: Delivery, reason: str, cause: str, dead: set[tuple[int, int]]) -> None:
        try:
            await self.queue.dead_letter(d, reason)
        except MessageRefused as e:
            # The letter is larger than the message it came from (the reason and offsets travel
            # with it) and the dead-letter place refuses it: retrying it would hold the partition
            # for good. Smaller letters, each keeping less, until one is taken.
            short = reason[:LETTER_REASON]
            for value, what in smaller_letters(d.value, short):
                log.error(
                    "worker: the dead-letter place refused message %s/%s (%s); %s",
                    d.partition,
                    d.offset,
                    e,
                    what,
                )
                try:
                    await self.queue.dead_letter(replace(d, value=value), f"{short} [{what}]")
                    break
                except MessageRefused as again:
                    e = again
            else:
                raise e
        dead.add((d.partition, d.offset))  # a re-run of the batch (ack failed) must not repeat it
        self._count_dead(cause)

    async def _process_batch(self, deliveries: list[Delivery], dead: set[tuple[int, int]]) -> None:
        work: list[tuple[Delivery, LogRecord]] = []
        for i, d in enumerate(deliveries):
            try:
                record = decode(d.value)
            except RecordError as e:
                await self._dead_letter(d, str(e), "decode", dead)
                log.error("worker: message %s/%s dead-lettered: %s", d.partition, d.offset, e)
            else:
                # What ingest refuses no worker stores: a message is not only a gateway's. But
                # counts a gateway added up past the bound are unknown, not a reason.
                limits.unknown_counts(record)
                why = limits.check(record)
                if why is None:
                    limits.bound(record)
                    work.append((d, record))
                else:
                    await self._dead_letter(d, f"invalid record: {why}", "decode", dead)
                    log.error("worker: record %s dead-lettered: %s", record.id[:100], why)
            if i % SLICE == SLICE - 1:  # in `llmtap up` the gateway's requests share this loop
                await asyncio.sleep(0)

        async def give_up(idx: int, reason: str) -> None:
            d, record = work[idx]
            await self._dead_letter(d, reason, "handler", dead)
            log.error("worker: record %s dead-lettered: %s", record.id, reason)

        ok = await run_with_attempts(
            self.chain,
            [r for _, r in work],
            self.policy,
            give_up=give_up,
            pause=self._pause,
            stopping=self._stopping.is_set,
            retried=self._retried,
            outage=lambda reason: self._outage("chain", reason),
        )
        if ok:
            await self.queue.ack([work[i][0] for i in ok])
            self.stats.processed += len(ok)
            PROCESSED.inc(len(ok))

    def _outage(self, kind: str, reason: str | None) -> None:
        """An outage of `kind` met while running (None: its end): `/healthz` says so while any
        lasts, as at start-up (one slot for both: the store's end cleared a queue outage)."""
        if reason is None:
            self._outages.pop(kind, None)
        else:
            self._outages[kind] = reason

    def _retried(self, kind: str, n: int) -> None:
        if kind == "transient":
            self.stats.transient_retries += 1
            RETRIES.labels("transient").inc()
        else:
            self.stats.record_retries += n
            RETRIES.labels("record").inc(n)

    def _count_dead(self, cause: str) -> None:
        self.stats.dead_lettered += 1
        DEAD_LETTERED.labels(cause).inc()

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self._progress_at < PROGRESS_EVERY:
            return
        processed, dead = self.stats.processed, self.stats.dead_lettered
        waited = self.foreground.waited if self.foreground is not None else 0.0
        p0, d0, w0 = self._progress_mark
        if processed != p0 or dead != d0:
            rate = (processed - p0) / (now - self._progress_at)
            log.info(
                "worker: %d records processed (%.0f/s), %d dead-lettered in the last %.0fs%s",
                processed - p0,
                rate,
                dead - d0,
                now - self._progress_at,
                f"; waited {waited - w0:.1f}s for the gateway's requests" if waited - w0 >= 0.5 else "",
            )
        self._progress_at, self._progress_mark = now, (processed, dead, waited)


#: How much of an unreadable message a letter keeps when the whole is too large for the letter,
#: and of the reason a smaller letter carries.
LETTER_HEAD = 16 * 1024
LETTER_REASON = 1000


def smaller_letters(value: bytes, reason: str) -> Iterator[tuple[bytes, str]]:
    """Letters the dead-letter place may take, each smaller than the last, and what each holds:
    the record without bodies and headers (replayed, its numbers are stored), then its plain
    fields; for bytes that are no record, their first `LETTER_HEAD` bytes; last, nothing but
    the reason."""
    try:
        record = decode(value)
    except RecordError:
        record = None
    if record is not None:
        yield (
            encode(lightened(record, reason)),
            f"the letter holds the record without its bodies and headers ({len(value)} bytes in full)",
        )
        yield (
            encode(stripped(record, reason)),
            f"the letter holds the record's plain fields ({len(value)} bytes in full)",
        )
    else:
        yield value[:LETTER_HEAD], f"the letter holds the first {LETTER_HEAD} of its {len(value)} bytes"
    yield b"", f"the letter holds none of its {len(value)} bytes"
