"""The publisher: captures in, durable records out, entirely off the latency path.

`Publisher.submit` is what a request pays for logging: one deque append and two integer
updates. A single background task does the rest in batches — every `publish_linger_ms`, or as
soon as `publish_batch_size` captures wait (a lone capture after a quiet spell at once): build
the records, write the bodies above the inline limit to the body store
(`llmtap.bodies.offload`), then hand the batch to the first `Sink` that takes it.

Sinks form a chain: `Publisher(sinks=[QueueSink(q), IngestSink(...), SpoolSink(...)])`. A sink
either makes the whole batch durable or raises `BackendUnavailable`; the batch then goes to the
next sink. Each sink encodes the records itself, because the record says which route it took
(`record.route`). When every sink refuses, the batch is held in memory and retried with
exponential backoff; batches keep their order. Memory is bounded by `publish_buffer_bytes`
(captures waiting plus the batch held). Past it, a capture goes to the `overflow` sink (the
disk spool) on a path of its own, so a queue that is slow rather than down does not make it
wait; a write there that fails is retried with the same backoff, its records kept. Only when
that path is full too (another `publish_buffer_bytes`) is a capture dropped — counted in
`dropped` and `llmtap_gateway_records_dropped_total`, and logged at ERROR with its id (in one
line a second for all given up in it), never silently.

One record must never cost the others theirs. A batch that every sink refuses for a reason
other than an outage (a record the queue, the server or the encoder will not take) is split in
halves, and the halves tried apart, down to the single record at fault; that record is then
published bare (`record.stripped`: its plain fields and the reason as its error) and only if even
that is refused is it given up, with an ERROR line naming it and the reason, and counted.

A record whose body is above the inline limit while the body store is down may only go to a sink
that keeps it locally (`Sink.large_bodies`: the disk spool), never into a message; the rest of
its batch goes on as usual (`llmtap.bodies.offload` says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from llmtap.bodies import offload
from llmtap.cooperate import SLICE
from llmtap.errors import BackendUnavailable
from llmtap.gateway.capture import Capture, RecordBuilder
from llmtap.queue.base import Message, Queue
from llmtap.record import LogRecord, Route, encode, lightened, partition_key, stripped

if TYPE_CHECKING:
    from llmtap.bodies.base import BodyStore
    from llmtap.config import Settings

log = logging.getLogger("llmtap.gateway")


_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
#: A batch that every sink rejects with something other than `BackendUnavailable` (a bug or a
#: record the backend refuses, not an outage) is given up after this many rounds.
_POISON_ROUNDS = 5
#: The same for a part of a split batch: the batch it came from already had its retries.
_PART_ROUNDS = 2
_WARN_EVERY = 10.0
_DROP_IDS_SHOWN = 20  # ids named per report of records given up
#: A sink that raised BackendUnavailable is skipped for this long (doubling up to the max).
_BREAKER_MIN = 0.25
_BREAKER_MAX = 10.0


class Sink(ABC):
    """One way to make a batch of records durable. Subclasses: queue, ingest endpoint, spool."""

    #: Written into `record.route` before the sink encodes the records.
    route: Route = "queue"
    #: Takes records holding bodies above the inline limit (`bodies.offload`): only a sink that
    #: keeps them on local disk, never one that puts them in a message.
    large_bodies: bool = False

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Open what the sink needs."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release it (called once, after the last batch)."""

    @abstractmethod
    async def send(self, records: Sequence[LogRecord]) -> None:
        """Make every record durable, or raise `BackendUnavailable` (the next sink gets them)."""


class QueueSink(Sink):
    """Publishes to the queue: one message per record, keyed by the partition key setting."""

    route: Route = "queue"

    def __init__(self, queue: Queue, partition_by: str = "tenant") -> None:
        self.queue = queue
        self.partition_by = partition_by
        #: Why the queue is not connected (the gateway started during an outage), else None.
        self.down: str | None = None

    async def send(self, records: Sequence[LogRecord]) -> None:
        if self.down is not None:
            raise BackendUnavailable(self.down)
        by = self.partition_by
        messages = []
        for r in records:
            r.route = "queue"
            messages.append(Message(key=partition_key(r, by), value=encode(r), id=f"{r.tenant}/{r.id}"))
        await self.queue.publish(messages)


class _Batch:
    __slots__ = ("bare", "big", "nbytes", "part", "poison_rounds", "reason", "records")

    def __init__(self, records: list[LogRecord], nbytes: int, big: bool) -> None:
        self.records = records
        self.big = big  # some record holds a body above the inline limit, not yet in the body store
        self.nbytes = nbytes
        self.poison_rounds = 0
        self.reason = ""  # why the last sink refused it
        self.part = False  # a part of a batch that was refused whole
        self.bare = False  # holds the stripped form of a record refused in full


class Publisher:
    """Batches captures into records and pushes them through the sink chain (see module doc)."""

    def __init__(
        self,
        settings: Settings,
        sinks: Sequence[Sink],
        bodies: BodyStore | None = None,
        *,
        overflow: Sink | None = None,
        gateway_id: str | None = None,
    ) -> None:
        if not sinks:
            raise ValueError("a publisher needs at least one sink")
        self.sinks = list(sinks)
        self._large_sink = any(s.large_bodies for s in self.sinks)
        self.overflow = overflow
        self.bodies = bodies
        self.batch_size = settings.publish_batch_size
        self.linger = settings.publish_linger_ms / 1000.0
        self.buffer_limit = settings.publish_buffer_bytes
        self.gateway_id = gateway_id or f"{socket.gethostname()}:{os.getpid()}"
        self.inline_limit = settings.inline_body_bytes  # the one inline limit (`bodies.offload`)
        self.builder = RecordBuilder(inline_body_bytes=self.inline_limit, gateway=self.gateway_id)

        # -- counters (read by /metrics and tests)
        self.submitted = 0
        self.published = 0  # records made durable by some sink
        self.batches = 0  # batches made durable (published / batches = mean batch size)
        self.failed = 0  # sink attempts that raised
        self.dropped = 0  # captures/records given up (buffer full, poison record, shutdown deadline)
        self.poisoned = 0  # records every sink refused in full (published bare, or dropped if not even that)
        #: Other parts of the gateway that may give up a record (the spool replayer): their
        #: counts join `llmtap_gateway_records_dropped_total`.
        self.dropped_elsewhere: list[Callable[[], int]] = []
        self.build_errors = 0
        #: Records also written to the spool because the queue had not taken them in time.
        self.hedged = 0
        self.spool_after = settings.publish_spool_after_ms / 1000.0
        self.body_uploads = 0
        self.body_store_failures = 0
        self.bodies_spooled = 0  # records sent to the spool with a body above the inline limit
        self._bodies_open_until = 0.0  # body store breaker: skipped until then after a failure
        self._bodies_cooldown = _BREAKER_MIN
        self.buffer_bytes = 0  # memory held: waiting captures + the batch in flight
        self.spill_bytes = 0  # memory held by captures on their way to the overflow sink
        self.spilled = 0  # captures sent to the overflow sink because the buffer was full
        self.routes: Counter[str] = Counter()
        self.requests: Counter[tuple[str, str]] = Counter()  # (provider, outcome)

        self._dq: deque[Capture] = deque()
        self._wake = asyncio.Event()
        self._spill: deque[Capture] = deque()
        self._spill_wake = asyncio.Event()
        self._spill_task: asyncio.Task[None] | None = None
        self._held: _Batch | None = None
        #: Captures taken off `_dq` / `_spill` and not yet held or published (being built, or a
        #: spill batch on its way to the spool). `pending` counts them and `_rescue` writes them,
        #: or they would be in memory only and invisible: a gateway reported 0 pending with 270
        #: records still on their way to the spool.
        self._building: list[Capture] = []
        self._spilling: list[Capture] = []
        self._parts: deque[_Batch] = deque()  # parts of a refused batch, tried before new captures
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._sent_at = -math.inf  # loop time the last batch was made durable
        self._last_warn: dict[str, float] = {}
        #: What failed and when it began (`_down`), to say once when it works again (`_back`).
        self._down_since: dict[str, float] = {}
        self.dropped_full = 0  # captures given up at once: memory and the spool path were full
        self._drops = 0  # records given up since the last report of them (`_report_drops`)
        self._drop_ids: list[str] = []
        self._open_until: dict[int, float] = {}  # id(sink) -> monotonic time it is tried again
        self._cooldown: dict[int, float] = {}

    # -- the hot path ---------------------------------------------------------------------------
    def submit(self, capture: Capture) -> None:
        """Queue a finished capture for publishing. O(1), never blocks, never raises."""
        size = capture.nbytes
        if self.buffer_bytes + size > self.buffer_limit:
            if self.overflow is not None and self.spill_bytes + size <= self.buffer_limit:
                # The queue is slower than the traffic (or down): this one goes to the overflow
                # sink (the disk spool) by a path of its own, so it does not wait behind them.
                self.spill_bytes += size
                self._spill.append(capture)
                self.submitted += 1
                if len(self._spill) == 1:
                    self._spill_wake.set()
                return
            self._dropped_now(capture.id)
            return
        self.buffer_bytes += size
        dq = self._dq
        dq.append(capture)
        self.submitted += 1
        n = len(dq)
        if n == 1 or n == self.batch_size:
            self._wake.set()

    def _submit_after_stop(self, capture: Capture) -> None:
        self.dropped += 1
        log.error("record %s finished after the publisher stopped: it could not be published", capture.id)

    def _dropped_now(self, request_id: str) -> None:
        """Count a record given up because memory and the spool are full; its id is logged
        within a second, at ERROR, with the others given up meanwhile (not here: this is the
        request's path, and one line per drop would flood the log in the very moment)."""
        self.dropped += 1
        self.dropped_full += 1
        self._drops += 1
        if len(self._drop_ids) < _DROP_IDS_SHOWN:
            self._drop_ids.append(request_id)
        if self._drops == 1:
            asyncio.get_running_loop().call_later(1.0, self._report_drops)

    @property
    def dropped_total(self) -> int:
        """Records given up here and by the spool's replayer (`llmtap_gateway_records_dropped`)."""
        return self.dropped + sum(f() for f in self.dropped_elsewhere)

    def _report_drops(self) -> None:
        if not self._drops:  # reported already (at stop)
            return
        n, ids = self._drops, self._drop_ids
        self._drops, self._drop_ids = 0, []
        more = f" and {n - len(ids)} more" if n > len(ids) else ""
        log.error(
            "publish buffer (%d bytes) and spool full: %d records lost in the last second, ids %s%s;"
            " %d lost since start (llmtap_gateway_records_dropped_total)",
            self.buffer_limit, n, ", ".join(ids), more, self.dropped,
        )  # fmt: skip

    @property
    def pending(self) -> int:
        """Captures not yet published (waiting + the batch in flight + spilling)."""
        held = len(self._held.records) if self._held is not None else 0
        parts = sum(len(b.records) for b in self._parts)
        in_hand = len(self._building) + len(self._spilling)
        return len(self._dq) + held + parts + len(self._spill) + in_hand

    # -- lifecycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        for sink in self._all_sinks():
            await sink.start()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="llmtap-publisher")
        if self.overflow is not None:
            self._spill_task = loop.create_task(self._run_spill(), name="llmtap-publisher-spill")

    def _all_sinks(self) -> list[Sink]:
        extra = [self.overflow] if self.overflow is not None and self.overflow not in self.sinks else []
        return self.sinks + extra

    async def stop(self, timeout: float) -> None:
        """Publish everything submitted so far (within `timeout` seconds), then close the sinks."""
        self._stopping = True
        self._wake.set()
        self._spill_wake.set()
        tasks = [t for t in (self._task, self._spill_task) if t is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout)
            if late:
                for task in late:
                    task.cancel()
                await asyncio.wait(late)
        # From here nothing publishes: a capture submitted now is lost, and says so at once (a
        # late one sat in memory unseen). Set on the instance: `submit` itself stays one branch.
        self.submit = self._submit_after_stop  # type: ignore[method-assign]
        if self.pending:  # the deadline came, or a capture arrived after the loop's last look
            ids = self._pending_ids()
            lost = self.pending - await self._rescue()
            if lost:
                self.dropped += lost
                # Named, as every other record given up is (the audit found only a count).
                more = f" and {lost - len(ids)} more" if lost > len(ids) else ""
                log.error(
                    "shutdown deadline reached: %d records could not be published, ids %s%s",
                    lost, ", ".join(ids), more,
                )  # fmt: skip
        if self._drops:  # given up in the last second: named now, the timer dies with the loop
            self._report_drops()
        for sink in self._all_sinks():
            try:
                await sink.close()
            except Exception as e:
                log.warning("closing %s sink failed: %s", sink.route, e)

    def _pending_ids(self) -> list[str]:
        """The first ids of what is still in memory, for the line that says they were lost."""
        ids: list[str] = []
        held = self._held.records if self._held is not None else []
        for r in [*held, *(r for part in self._parts for r in part.records)]:
            if len(ids) >= _DROP_IDS_SHOWN:
                return ids
            ids.append(r.id)
        for cap in [*self._building, *self._spilling, *self._dq, *self._spill]:
            if len(ids) >= _DROP_IDS_SHOWN:
                break
            ids.append(cap.id)
        return ids

    async def _rescue(self) -> int:
        """At the shutdown deadline, write what is still in memory to the overflow sink (the
        disk spool) in one go, skipping the slow ways that made us late. Returns how many."""
        if self.overflow is None:
            return 0
        # Bodies not in the body store yet stay inline: the spool takes them (`large_bodies`).
        records: list[LogRecord] = list(self._held.records) if self._held is not None else []
        for part in self._parts:
            records.extend(part.records)
        # A spill batch cut off mid-write may reach the spool twice: its records keep their ids,
        # and the store keeps one of each.
        for cap in [*self._building, *self._spilling, *self._dq, *self._spill]:
            try:
                records.append(self.builder.build(cap))
            except Exception as e:
                records.append(self.builder.fallback(cap, e))
        if not records:
            return 0
        try:
            sent = await self._send_apart(self.overflow, records)
        except Exception as e:
            log.error("shutdown: could not spool %d records either: %s", len(records), e)
            return 0
        self._dq.clear()
        self._spill.clear()
        self._building = []
        self._spilling = []
        self._parts.clear()
        self._held = None
        log.warning("stopping: spooled %d records not yet published to disk for the next start", sent)
        return len(records)

    async def flush(self) -> None:
        """Wait until everything submitted so far is published (tests, benchmarks)."""
        while self.pending or self.spill_bytes:
            self._wake.set()
            await asyncio.sleep(0.001)

    # -- the background task --------------------------------------------------------------------
    async def _run(self) -> None:
        dq = self._dq
        wake = self._wake
        backoff = _BACKOFF_MIN
        parts = self._parts
        while True:
            if not dq and self._held is None and not parts:
                if self._stopping:
                    return
                wake.clear()
                await wake.wait()
                continue
            if (
                self._held is None
                and not parts
                and len(dq) < self.batch_size
                and self.linger > 0
                and not self._stopping
                and not self._alone(len(dq))
            ):
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.linger):
                        await wake.wait()
            if self._held is None:
                if parts:
                    self._held = parts.popleft()
                else:
                    take = min(len(dq), self.batch_size)
                    caps = self._building = [dq.popleft() for _ in range(take)]
                    self._held = await self._build(caps)
                    self._building = []
            batch = self._held
            if await self._deliver(batch):
                self._sent_at = asyncio.get_running_loop().time()
                self._held = None
                self.buffer_bytes -= batch.nbytes
                backoff = _BACKOFF_MIN
                continue
            if batch.poison_rounds >= (_PART_ROUNDS if batch.part else _POISON_ROUNDS):
                self._held = None
                self._isolate(batch)
                backoff = _BACKOFF_MIN
                continue
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _BACKOFF_MAX)

    def _alone(self, waiting: int) -> bool:
        """A lone capture after a quiet spell (no batch sent for a linger) goes at once.

        Under light traffic the linger batches nothing: it only adds a wake-up of its own, and
        a process woken from sleep runs its first work several times slower (cold caches). The
        capture goes out right after its request, while the loop is awake anyway, and is durable
        sooner. A burst (more than one waiting) or steady traffic still lingers to fill a batch.
        """
        return waiting == 1 and asyncio.get_running_loop().time() - self._sent_at >= self.linger

    def _isolate(self, batch: _Batch) -> None:
        """A batch every sink refused (not an outage): find the record at fault instead of
        giving up the batch. Halves go back in front of the new captures, in order."""
        records = batch.records
        if len(records) > 1:
            mid = len(records) // 2
            first = _Batch(records[:mid], batch.nbytes // 2, batch.big)
            second = _Batch(records[mid:], batch.nbytes - first.nbytes, batch.big)
            first.part = second.part = True
            self._parts.appendleft(second)
            self._parts.appendleft(first)
            self._warn(
                "split",
                "every sink refused a batch of %d records (%s); trying its halves apart",
                len(records),
                batch.reason,
            )
            return
        record = records[0]
        if not batch.bare:
            self.poisoned += 1
            log.error(
                "every sink refused record %s (%s); publishing it bare, with that reason as its error",
                record.id,
                batch.reason,
            )
            bare = _Batch([stripped(record, batch.reason)], batch.nbytes, False)
            bare.part = bare.bare = True
            self._parts.appendleft(bare)
            return
        self.buffer_bytes -= batch.nbytes
        self.dropped += 1
        log.error("gave up on record %s: every sink refused even its bare form (%s)", record.id, batch.reason)

    async def _send_apart(self, sink: Sink, records: list[LogRecord]) -> int:
        """Send to one sink; if it refuses the lot for a reason other than an outage, send the
        records one by one (bare if need be), so one bad record costs only itself. Returns how
        many were sent; raises `BackendUnavailable` if the sink is down."""
        try:
            await sink.send(records)
        except BackendUnavailable:
            raise
        except Exception as e:
            self.failed += 1
            if len(records) == 1:
                return await self._send_one(sink, records[0], e)
            self._warn(
                "split",
                "%s sink refused %d records (%s); sending them one by one",
                sink.route,
                len(records),
                e,
            )
            sent = 0
            for r in records:
                try:
                    await sink.send([r])
                except BackendUnavailable:
                    raise
                except Exception as e1:
                    sent += await self._send_one(sink, r, e1)
                else:
                    self._count(sink, 1)
                    sent += 1
            return sent
        self._count(sink, len(records))
        return len(records)

    async def _send_one(self, sink: Sink, record: LogRecord, exc: Exception) -> int:
        reason = f"{type(exc).__name__}: {exc}"
        self.poisoned += 1
        try:
            try:  # too large, most likely: its numbers travel without its bodies and headers
                await sink.send([lightened(record, reason)])
            except BackendUnavailable:
                raise
            except Exception:
                await sink.send([stripped(record, reason)])
        except BackendUnavailable:
            raise
        except Exception as e:
            self.dropped += 1
            log.error(
                "gave up on record %s: the %s sink refused even its bare form (%s)", record.id, sink.route, e
            )
            return 0
        log.error(
            "the %s sink refused record %s (%s); sent it bare, with that reason",
            sink.route,
            record.id,
            reason,
        )
        self._count(sink, 1)
        return 1

    def _count(self, sink: Sink, n: int) -> None:
        self.published += n
        self.batches += 1
        self.routes[sink.route] += n

    async def _run_spill(self) -> None:
        """Overflow path: captures that did not fit the buffer go straight to `overflow`."""
        assert self.overflow is not None
        spill = self._spill
        while True:
            if not spill:
                if self._stopping:
                    return
                self._spill_wake.clear()
                await self._spill_wake.wait()
                continue
            caps = self._spilling = [spill.popleft() for _ in range(min(len(spill), self.batch_size))]
            batch = await self._build(caps)
            try:
                backoff = _BACKOFF_MIN
                while True:
                    try:
                        if batch.big:
                            await self._to_store(batch)  # or the spool keeps them inline
                        self.spilled += await self._send_apart(self.overflow, batch.records)
                        break
                    except Exception as e:
                        # These records are only in memory: keep them and try again (a disk
                        # briefly full, a segment replayed under our feet). What arrives
                        # meanwhile waits within the bound `submit` keeps; at the stop deadline
                        # this task is cancelled and `_rescue` writes `_spilling` once more.
                        self.failed += 1
                        self._warn(
                            "spill",
                            "overflow sink failed (%s); %d records held in memory only (%d MB),"
                            " retrying in %.2fs",
                            e,
                            self.pending,
                            (self.buffer_bytes + self.spill_bytes) >> 20,
                            backoff,
                        )
                        await asyncio.sleep(backoff)
                        backoff = min(backoff * 2, _BACKOFF_MAX)
            finally:
                self.spill_bytes -= batch.nbytes
            self._spilling = []  # not when cancelled at the deadline: `_rescue` writes them

    async def _build(self, caps: list[Capture]) -> _Batch:
        builder = self.builder
        records: list[LogRecord] = []
        nbytes = 0
        big = False
        limit = self.inline_limit
        rebuilds = builder.rebuild_errors
        for i, cap in enumerate(caps):
            nbytes += cap.nbytes
            try:
                record = builder.build(cap)
                if not big and not offload.fits(record, limit):
                    big = True
            except Exception as e:
                self.build_errors += 1
                self._warn(
                    "build", "could not build a record (%s: %s); published a bare one", type(e).__name__, e
                )
                try:
                    record = builder.fallback(cap, e)
                except Exception:  # not even the plain fields: nothing to publish
                    log.exception("dropped a capture that could not be turned into a record")
                    self.dropped += 1
                    continue
            records.append(record)
            self.requests[(record.provider, record.outcome)] += 1
            if i % SLICE == SLICE - 1:  # a big batch must not stall live requests
                await asyncio.sleep(0)
        if builder.rebuild_errors != rebuilds:
            self._warn(
                "rebuild",
                "could not rebuild the message of %d stream(s) (%s); stored them as they came",
                builder.rebuild_errors - rebuilds,
                builder.rebuild_error,
            )
        return _Batch(records, nbytes, big)

    async def _deliver(self, batch: _Batch) -> bool:
        if batch.big:
            await self._to_store(batch)
        outage = False
        now = time.monotonic()
        last = self.sinks[-1]
        todo = batch.records
        for sink in self.sinks:
            # Circuit breaker: a sink that just failed is skipped for a while (the last one never
            # is), so during an outage batches do not each wait out a timeout before reaching the
            # spool — that wait filled the buffer and, at shutdown, left records unwritten.
            if sink is not last and self._open_until.get(id(sink), 0.0) > now:
                outage = True
                continue
            send = todo
            if batch.big and not sink.large_bodies:
                # Bodies above the inline limit never go into a message: this sink takes the others.
                send = [r for r in todo if offload.fits(r, self.inline_limit)]
                if not send:
                    continue
            try:
                if await self._send(sink, send, last):
                    sink = last  # the spool took them while the queue hung: counted as its
            except BackendUnavailable as e:
                outage = True
                self.failed += 1
                batch.reason = str(e)
                wait = min(self._cooldown.get(id(sink), _BREAKER_MIN) * 2, _BREAKER_MAX)
                self._cooldown[id(sink)] = wait
                self._open_until[id(sink)] = time.monotonic() + wait
                self._warn(f"sink-{sink.route}", "%s unavailable, trying the next way: %s", sink.route, e)
                self._down(sink.route)
                continue
            except Exception as e:
                self.failed += 1
                batch.reason = f"{sink.route}: {type(e).__name__}: {e}"[:500]
                self._warn(f"sink-{sink.route}", "%s sink failed (%s: %s)", sink.route, type(e).__name__, e)
                continue
            self._count(sink, len(send))
            if self._down_since:
                self._back(sink.route)
            self._cooldown.pop(id(sink), None)
            self._open_until.pop(id(sink), None)
            if send is todo:
                if batch.big and sink.large_bodies:
                    self.bodies_spooled += sum(not offload.fits(r, self.inline_limit) for r in send)
                return True
            sent = {id(r) for r in send}
            todo = batch.records = [r for r in todo if id(r) not in sent]
        if batch.big and not self._large_sink:
            outage = True  # only the body store can take them, and it is down: not their fault
        if not outage:
            batch.poison_rounds += 1
        return False

    async def _send(self, sink: Sink, records: list[LogRecord], last: Sink) -> bool:
        """`sink.send`, but a publish that hangs (a broker frozen, not refusing) does not keep
        the records in memory only: after `spool_after` seconds they go to the disk spool too
        (True), and the queue's publish finishes or fails on its own. A record both take is
        stored once (one row per id); a gateway killed meanwhile lost nothing but the wait."""
        if self.spool_after <= 0 or sink is last or last.route != "spool":
            await sink.send(records)
            return False
        task = asyncio.ensure_future(sink.send(records))
        # A sink that failed or hung a moment ago (its breaker just let this batch through) may
        # still hang: its probe holds records in memory for a fraction of the wait only.
        after = self.spool_after if id(sink) not in self._cooldown else min(self.spool_after, 0.2)
        done, _ = await asyncio.wait({task}, timeout=after)
        if done:
            task.result()
            return False
        try:
            await last.send(records)
        except Exception:  # no spool either: wait for the queue as before
            await task
            return False
        task.add_done_callback(self._late_result)
        self.hedged += len(records)
        # Until its breaker closes, the next batches skip the hung queue instead of each waiting.
        wait = min(self._cooldown.get(id(sink), _BREAKER_MIN) * 2, _BREAKER_MAX)
        self._cooldown[id(sink)] = wait
        self._open_until[id(sink)] = time.monotonic() + wait
        self._warn(
            f"sink-{sink.route}-slow",
            "%s has not taken a batch in %.1fs: its records went to the disk spool too",
            sink.route,
            after,
        )
        self._down(sink.route)
        return True

    def _late_result(self, task: asyncio.Future[None]) -> None:
        """A publish left running after its records were spooled: its records are safe either
        way, but a failure is still a failed attempt (`llmtap_gateway_publish_failures_total`)."""
        if not task.cancelled() and task.exception() is not None:
            self.failed += 1

    async def _to_store(self, batch: _Batch) -> None:
        """Write the batch's bodies above the inline limit to the body store, before the records that
        point at them are published. If the body store is down (or skipped by its breaker), the
        bodies stay inline and `_deliver` sends those records to a `large_bodies` sink only."""
        if self.bodies is None or self._bodies_open_until > time.monotonic():
            return
        try:
            self.body_uploads += await offload.to_store(self.bodies, batch.records, above=self.inline_limit)
        except Exception as e:
            self.body_store_failures += 1
            self._bodies_cooldown = min(self._bodies_cooldown * 2, _BREAKER_MAX)
            self._bodies_open_until = time.monotonic() + self._bodies_cooldown
            self._warn("bodies", "body store unavailable; records with bodies above the limit spool: %s", e)
            self._down("body store")
            return
        if self._down_since:
            self._back("body store")
        self._bodies_cooldown = _BREAKER_MIN
        batch.big = False

    def _down(self, what: str) -> None:
        self._down_since.setdefault(what, time.monotonic())

    def _back(self, what: str) -> None:
        """One line when a way that failed takes records again: the warnings said it was down
        (once every few seconds), and nothing said it was not any more. Throttled like them, so
        a flapping queue is not a line per flap."""
        since = self._down_since.pop(what, None)
        if since is not None:
            self._warn(f"back-{what}", "%s works again (it failed for %.0fs)", what, time.monotonic() - since)

    def _warn(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last_warn.get(kind, -_WARN_EVERY) >= _WARN_EVERY:
            self._last_warn[kind] = now
            log.warning(msg, *args)

    # -- metrics --------------------------------------------------------------------------------
    def collector(self) -> Collector:
        """A Prometheus collector reading these counters at scrape time (no per-request cost)."""
        return _PublisherCollector(self)


class _PublisherCollector(Collector):
    def __init__(self, pub: Publisher) -> None:
        self.pub = pub

    def collect(self) -> Iterator[Metric]:
        p = self.pub
        req = CounterMetricFamily(
            "llmtap_gateway_requests",
            "Records built from requests, by provider and outcome (not yet: the ones still waiting in"
            " memory, llmtap_gateway_pending_records; never: the ones given up, ..._records_dropped)",
            labels=["provider", "outcome"],
        )
        for (provider, outcome), n in sorted(p.requests.items()):
            req.add_metric([provider, outcome], n)
        yield req
        yield CounterMetricFamily(
            "llmtap_gateway_captures",
            "Requests answered and captured: each becomes a record or is counted as dropped",
            value=p.submitted + p.dropped_full,
        )
        pub = CounterMetricFamily(
            "llmtap_gateway_records_published", "Records made durable, by route", labels=["route"]
        )
        for route in ("queue", "ingest", "spool"):
            pub.add_metric([route], p.routes.get(route, 0))
        yield pub
        yield CounterMetricFamily("llmtap_gateway_publish_batches", "Batches made durable", value=p.batches)
        yield CounterMetricFamily(
            "llmtap_gateway_records_spilled",
            "Records sent to the overflow sink (buffer full)",
            value=p.spilled,
        )
        yield CounterMetricFamily(
            "llmtap_gateway_publish_failures", "Sink attempts that failed", value=p.failed
        )
        yield CounterMetricFamily(
            "llmtap_gateway_records_dropped",
            "Records given up (buffer full, shutdown deadline, refused even bare)",
            value=p.dropped_total,
        )
        yield CounterMetricFamily(
            "llmtap_gateway_records_poisoned",
            "Records every sink refused in full (published bare with the reason, else dropped)",
            value=p.poisoned,
        )
        yield CounterMetricFamily(
            "llmtap_gateway_record_build_errors", "Records built bare after an error", value=p.build_errors
        )
        yield CounterMetricFamily(
            "llmtap_gateway_body_uploads", "Large bodies written to the body store", value=p.body_uploads
        )
        yield CounterMetricFamily(
            "llmtap_gateway_records_spooled_while_hung",
            "Records written to the spool too because the queue had not taken them in time",
            value=p.hedged,
        )
        yield CounterMetricFamily(
            "llmtap_gateway_records_spooled_for_bodies",
            "Records kept in the spool because a body above the inline limit found the body store down",
            value=p.bodies_spooled,
        )
        yield GaugeMetricFamily(
            "llmtap_gateway_publish_buffer_bytes",
            "Memory held by unpublished records",
            value=p.buffer_bytes + p.spill_bytes,
        )
        yield GaugeMetricFamily(
            "llmtap_gateway_pending_records", "Records not yet published", value=p.pending
        )
