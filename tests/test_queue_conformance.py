"""The queue contract, checked the same way on every backend: SQLite, Redis Streams, Kafka and
SQS (a FIFO queue on ElasticMQ).

Real servers (scripts/services.sh) and real processes; each test counts what went in and what
came out. A backend whose server is not configured is skipped with the reason.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from llmtap.config import Settings
from llmtap.handlers.base import Handler, Item
from llmtap.handlers.chain import Chain
from llmtap.handlers.store import StoreHandler
from llmtap.queue.base import Delivery, Message, Queue
from llmtap.record import encode
from llmtap.store.sqlite import SQLiteStore
from llmtap.worker import WorkerService
from queue_helpers import (
    BACKENDS,
    Ledger,
    QueueSpec,
    check_exactly_once,
    connect,
    consume_loop,
    consumer_processes,
    group_members,
    keyed_records,
    make_spec,
    publish_in_batches,
    publish_retrying,
    record,
    skip_reason,
    wait_for,
)
from worker_helpers import make_record

pytestmark = pytest.mark.timeout(180)

Opener = Callable[..., Awaitable[Queue]]


# the server backends carry their service's marker, so `-m redis` / `-m kafka` select them
MARKED = [pytest.param(b, marks=[] if b == "sqlite" else [getattr(pytest.mark, b)]) for b in BACKENDS]


@pytest.fixture(params=MARKED)
def backend(request: pytest.FixtureRequest) -> str:
    reason = skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    return str(request.param)


@pytest.fixture
def spec(backend: str, tmp_path: Path) -> QueueSpec:
    return make_spec(backend, tmp_path)


@pytest.fixture
async def open_queue() -> AsyncIterator[Opener]:
    """Connect queues for a test and close them all at its end."""
    opened: list[Queue] = []

    async def open_(spec: QueueSpec, role: Any = "both", **options: Any) -> Queue:
        q = spec.build(**options)
        await connect(q, role)
        opened.append(q)
        return q

    yield open_
    for q in reversed(opened):
        await q.close()


async def consume_all(q: Queue, n: int, timeout: float = 90, batch: int = 100) -> list[Delivery]:
    """Consume and ack until `n` deliveries arrived."""
    out: list[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        assert time.monotonic() < deadline, f"got {len(out)} of {n} deliveries in {timeout}s"
        got = await q.consume(batch, 0.5)
        out += got
        await q.ack(got)
    return out


async def test_publish_consume_ack_once_in_key_order(spec: QueueSpec, open_queue: Opener) -> None:
    producer = await open_queue(spec, "producer")
    messages = keyed_records(keys=8, per_key=50)
    await publish_in_batches(producer, messages, 100)
    assert (await producer.status()).lag == len(messages)

    consumer = await open_queue(spec, "consumer")
    ledger = Ledger()
    for d in await consume_all(consumer, len(messages)):
        ledger.process(d)
    assert ledger.violations == []
    assert ledger.distinct == len(messages) and ledger.duplicates == 0
    # One key, one partition; the keys spread over several partitions.
    assert all(len(ps) == 1 for ps in ledger.partitions.values())
    assert len({p for ps in ledger.partitions.values() for p in ps}) > 1
    await wait_for_lag(consumer, 0)

    # Acked means never again, also for a consumer that joins afterwards.
    await consumer.close()
    again = await open_queue(spec, "consumer")
    assert await again.consume(100, 2.0) == []


async def wait_for_lag(q: Queue, lag: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (seen := (await q.status()).lag) != lag:
        assert time.monotonic() < deadline, f"lag stays {seen}, expected {lag}"
        await asyncio.sleep(0.2)


async def test_status_counts_unacked_records(spec: QueueSpec, open_queue: Opener) -> None:
    q = await open_queue(spec, "both")
    await q.publish(keyed_records(keys=10, per_key=10))
    assert (await q.status()).lag == 100
    got: list[Delivery] = []
    deadline = time.monotonic() + 30
    while not got:
        assert time.monotonic() < deadline
        got = await q.consume(40, 1.0)
    await q.ack(got)
    status = await q.status()
    assert status.lag == 100 - len(got)
    assert status.dead_letters == 0
    if status.waiting is None:
        assert len(status.partitions) == spec.partitions
    else:  # SQS: no partitions, but what waits and what is in flight
        assert (status.waiting, status.in_flight, status.partitions) == (100 - len(got), 0, [])


async def test_unacked_deliveries_are_redelivered_to_the_next_consumer(
    spec: QueueSpec, open_queue: Opener
) -> None:
    producer = await open_queue(spec, "producer")
    messages = keyed_records(keys=6, per_key=20)
    await producer.publish(messages)

    first = await open_queue(spec, "consumer")
    held: list[Delivery] = []
    deadline = time.monotonic() + 30
    while not held:
        assert time.monotonic() < deadline
        held = await first.consume(30, 1.0)
    await first.close()  # gone without acking

    second = await open_queue(spec, "consumer")
    got = await consume_all(second, len(messages))
    seen = Counter((d.partition, d.offset) for d in got)
    assert all(seen[(d.partition, d.offset)] >= 1 for d in held)
    assert {d.value for d in got} == {m.value for m in messages}


async def test_consumers_in_one_process_share_partitions_exactly_once(
    spec: QueueSpec, open_queue: Opener
) -> None:
    consumers = [await open_queue(spec, "consumer") for _ in range(3)]
    producer = await open_queue(spec, "producer")
    ledger = Ledger()
    per_consumer = [Ledger() for _ in consumers]
    stop = asyncio.Event()

    async def run(i: int) -> None:
        q = consumers[i]
        while not stop.is_set():
            got = await q.consume(50, 0.2)
            for d in got:
                ledger.process(d)
                per_consumer[i].process(d)
            await q.ack(got)

    tasks = [asyncio.create_task(run(i)) for i in range(len(consumers))]
    try:
        # Publish a steady stream until every consumer has had a share, so the group has
        # rebalanced while records were flowing.
        published: list[Message] = []
        seq = 0
        deadline = time.monotonic() + 60
        while seq < 40 or not all(c.distinct for c in per_consumer):
            assert time.monotonic() < deadline, f"work did not spread: {[c.distinct for c in per_consumer]}"
            batch = [record(f"key-{k}", seq) for k in range(12)]
            await producer.publish(batch)
            published += batch
            seq += 1
            await asyncio.sleep(0.05)
        await wait_for(lambda: ledger.distinct == len(published), 60, "every record processed")
        await wait_for_lag(producer, 0)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert ledger.violations == []
    assert ledger.duplicates == 0, "a record was processed twice without any crash"
    assert all(len(ps) == 1 for ps in ledger.partitions.values())


async def test_consumer_processes_share_partitions_exactly_once(
    spec: QueueSpec, open_queue: Opener, tmp_path: Path
) -> None:
    producer = await open_queue(spec, "producer")
    expected: set[tuple[str, int]] = set()
    with consumer_processes(spec, tmp_path, 3) as procs:
        await wait_for(lambda: all(p.log().ready for p in procs), 30, "consumers ready")
        # A steady stream until every process has had a share (the group settles meanwhile).
        seq = 0
        deadline = time.monotonic() + 60
        while seq < 60 or not all(p.log().acked for p in procs):
            assert time.monotonic() < deadline, "the processes did not share the work"
            await publish_retrying(producer, [record(f"key-{k}", seq) for k in range(12)])
            expected |= {(f"key-{k}", seq) for k in range(12)}
            seq += 1
            await asyncio.sleep(0.02)

        def done() -> bool:
            return {r for p in procs for r in p.log().acked} >= expected

        try:
            await wait_for(done, 90, "every record acked")
        finally:
            for p in procs:
                p.stop()
        logs = [p.log() for p in procs]
        assert all(log.closed for log in logs), [p.errors() for p in procs]
    check_exactly_once(logs, expected, killed=[])
    await wait_for_lag(producer, 0)


async def test_killed_consumer_is_taken_over_without_loss(
    spec: QueueSpec, open_queue: Opener, tmp_path: Path
) -> None:
    producer = await open_queue(spec, "producer")
    messages = keyed_records(keys=12, per_key=50)
    expected = {(f"key-{k}", s) for s in range(50) for k in range(12)}
    with consumer_processes(spec, tmp_path, 1, stall_after=30, batch=15) as stallers:
        staller = stallers[0]
        await wait_for(lambda: staller.log().ready, 30, "first consumer ready")
        await publish_in_batches(producer, messages, 100)
        await wait_for(lambda: staller.log().stalled, 60, "first consumer mid-batch")
        (tmp_path / "more").mkdir()
        with consumer_processes(spec, tmp_path / "more", 2) as procs:
            await wait_for(lambda: all(p.log().ready for p in procs), 30, "other consumers ready")
            # they join the group while the first one still lives (SQS has no group to join:
            # any consumer receives any message group not in flight)
            deadline = time.monotonic() + 60
            while spec.backend != "sqs" and await group_members(spec) < 3:
                assert time.monotonic() < deadline, "the consumers never formed a group of three"
                await asyncio.sleep(0.1)
            staller.kill()  # mid-batch: processed, not acked
            killed = staller.log()
            assert killed.unacked, "the killed consumer had nothing in flight"

            def done() -> bool:
                return {r for p in procs for r in p.log().acked} | set(killed.acked) >= expected

            try:
                await wait_for(done, 90, "every record acked after the takeover")
            finally:
                for p in procs:
                    p.stop()
            logs = [p.log() for p in procs]
    check_exactly_once([*logs, killed], expected, killed=[killed])
    # What it had not acked was processed again by the others.
    again = Counter(r for log in logs for r in log.acked)
    assert all(again[r] == 1 for r in killed.unacked)
    await wait_for_lag(producer, 0)


async def test_poison_messages_are_dead_lettered_and_replayed(spec: QueueSpec, open_queue: Opener) -> None:
    q = await open_queue(spec, "both")
    good = keyed_records(keys=4, per_key=25)
    poison = [Message(f"bad-{i}", b"\xff\x00 not json " + bytes([i])) for i in range(5)]
    await q.publish(good[:50] + poison + good[50:])

    async def run_until(pred: Callable[[], Awaitable[bool]], ledger: Ledger) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(consume_loop(q, ledger, stop))
        try:
            deadline = time.monotonic() + 60
            while not await pred():
                assert time.monotonic() < deadline, "timed out"
                assert not task.done(), task
                await asyncio.sleep(0.2)
        finally:
            stop.set()
            await task

    ledger = Ledger()

    async def all_dead() -> bool:
        return ledger.distinct == len(good) and (await q.status()).dead_letters == len(poison)

    await run_until(all_dead, ledger)
    letters = await q.dead_letters()
    assert sorted(d.value for d in letters) == sorted(m.value for m in poison)
    assert {d.key for d in letters} == {m.key for m in poison}
    assert all(d.reason.startswith("cannot decode") for d in letters)
    assert all(d.failed_at > time.time() - 120 for d in letters)
    assert (await q.status()).lag == 0  # dead-lettered means acked: they do not stall anything

    # Replay one, then the rest; nothing is replayed twice.
    first = letters[0]
    assert await q.replay_dead_letters([first.id]) == 1
    assert await q.replay_dead_letters([first.id]) == 0
    # An id naming no letter is nothing to replay on every queue (Redis said "cannot reach").
    assert await q.replay_dead_letters(["no-such-letter", "12-x", ""]) == 0
    left = await q.dead_letters()
    assert {d.id for d in left} == {d.id for d in letters} - {first.id}
    assert (await q.status()).dead_letters == len(poison) - 1
    assert await q.replay_dead_letters() == len(poison) - 1
    assert await q.dead_letters() == []
    assert await q.replay_dead_letters() == 0
    assert (await q.status()).dead_letters == 0

    # Replayed means published again: a consumer gets them (and, still garbage, sets them aside
    # again); the good records are not delivered again.
    async def dead_again() -> bool:
        return (await q.status()).dead_letters == len(poison)

    await run_until(dead_again, ledger)
    assert ledger.duplicates == 0 and ledger.violations == []
    assert sorted(d.value for d in await q.dead_letters()) == sorted(m.value for m in poison)

    # Discarded means gone for good (`llmtap dlq discard`): listed no more, never delivered again.
    # Found by the disk check: dead letters that can never be stored grew the queue for ever.
    again = await q.dead_letters()
    assert await q.discard_dead_letters([again[0].id]) == 1
    assert await q.discard_dead_letters([again[0].id, "no-such-letter"]) == 0
    assert await q.discard_dead_letters() == len(poison) - 1
    assert await q.dead_letters() == [] and (await q.status()).dead_letters == 0
    assert (await q.status()).lag == 0


async def test_a_worker_with_batches_in_flight_keeps_each_key_in_order(
    spec: QueueSpec, tmp_path: Path
) -> None:
    """`worker_pipeline`: a worker's batches overlap, yet each key's records go through the chain
    in publish order, on every backend (Kafka hands out more of a partition while a batch of it
    is in flight; the worker holds such a batch back itself), and every record is stored once."""
    keys, per_key = 12, 30
    producer = spec.build()
    await connect(producer, "producer")
    records = [
        make_record(id=f"k{k}-{seq:03d}", user_id=f"k{k}", properties={"seq": str(seq)})
        for seq in range(per_key)
        for k in range(keys)
    ]
    try:
        await publish_retrying(
            producer, [Message(key=r.user_id or "", value=encode(r), id=r.id) for r in records]
        )
    finally:
        await producer.close()

    class Recorder(Handler):
        """Checks each key's order and counts the batches inside the chain at once.

        A receive slower than a batch's handling (SQS on a busy machine) would leave nothing to
        overlap, so the first batch waits, bounded, until a second one is in the chain: with
        one batch at a time that never happens and the test fails on `most`."""

        name = "recorder"

        def __init__(self) -> None:
            self.next: dict[str, int] = {}
            self.violations: list[str] = []
            self.live = self.most = 0
            self.waited = False
            self.rng = random.Random(7)

        async def handle(self, items: Sequence[Item]) -> None:
            self.live += 1
            self.most = max(self.most, self.live)
            try:
                if not self.waited:  # the first batch waits for another one to join it
                    self.waited = True
                    deadline = time.monotonic() + 30
                    while self.most < 2 and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                # Uneven handling times, so a later batch could overtake an earlier one.
                await asyncio.sleep(self.rng.uniform(0.0, 0.05))
                for i in items:
                    key, seq = i.record.user_id or "", int(i.record.properties["seq"])
                    if seq < self.next.get(key, 0):
                        continue  # a redelivery of something handled: allowed (at least once)
                    if seq != self.next.get(key, 0):
                        self.violations.append(f"{key}: seq {seq} before {self.next.get(key, 0)}")
                    self.next[key] = seq + 1
            finally:
                self.live -= 1

    store = SQLiteStore(str(tmp_path / "store.db"))
    await store.connect()
    recorder = Recorder()
    settings = Settings(
        data_dir=tmp_path, worker_batch_size=15, worker_pipeline=3, worker_linger_ms=0, shutdown_timeout=10
    )
    worker = WorkerService(
        settings, queue=spec.build(), store=store, chain=Chain([recorder, StoreHandler(store)])
    )
    await worker.start()
    try:
        await wait_for(
            lambda: sum(recorder.next.values()) == len(records), 120, "every record through the chain", 0.2
        )
    finally:
        await worker.stop()
        await store.close()
    assert recorder.violations == []
    assert recorder.most >= 2, "batches never overlapped: the pipeline is not exercised"
    with sqlite3.connect(tmp_path / "store.db") as db:
        assert (
            db.execute("SELECT count(*), count(DISTINCT id) FROM requests").fetchone() == (len(records),) * 2
        )


async def test_inspecting_a_queue_creates_nothing(spec: QueueSpec, open_queue: Opener) -> None:
    """`llmtap status` and `dlq list` connect to inspect: a mistyped queue name made them create
    the topic (queue, streams) and report a healthy lag 0 (README: read-only commands create
    nothing). Now it is `QueueMissing`, again on a second look, until a producer creates it."""
    from llmtap.errors import QueueMissing

    for _ in range(2):  # the first look created nothing the second could find
        q = spec.build()
        with pytest.raises(QueueMissing, match="nothing was published to it yet"):
            await q.connect("inspect")
        await q.close()
    producer = await open_queue(spec, "producer")
    await producer.publish([record("k", 0)])
    q = await open_queue(spec, "inspect")
    st = await q.status()
    assert st.lag == 1 and st.dead_letters == 0
    assert len(st.partitions) == (0 if spec.backend == "sqs" else spec.partitions)  # SQS: totals only
