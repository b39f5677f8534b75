"""Fallback sinks: ingest through a real `llmtap server`, the disk spool, and replay into a queue.

Counts what went in and what came out, and the route each record took.
"""

from __future__ import annotations

import asyncio
import os
import time
import types
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway_support import DirBodyStore
from llmtap.bodies import offload
from llmtap.bodies.offload import inline_body
from llmtap.config import Settings
from llmtap.errors import BackendUnavailable
from llmtap.gateway.sinks import REPLAY_CHUNK, IngestSink, SpoolReplayer, SpoolSink
from llmtap.gateway.spool import DiskSpool
from llmtap.queue.sqlite import SQLiteQueue
from llmtap.record import LogRecord, Usage, decode, decompress
from llmtap.server.app import ServerService
from llmtap.store import StatsQuery
from llmtap.testing.sinks import ListSink


def _record(i: int, tenant: str = "default") -> LogRecord:
    now = datetime.now(UTC)
    return LogRecord(
        id=str(uuid.uuid4()),
        tenant=tenant,
        provider="openai",
        target_url="http://upstream/v1/chat/completions",
        method="POST",
        path="/v1/chat/completions",
        model="gpt-4o-mini",
        started_at=now,
        ended_at=now,
        latency_ms=1.0 + i,
        status=200,
        usage=Usage(source="provider", prompt_tokens=10, completion_tokens=i, total_tokens=10 + i),
        user_id=f"u{i % 3}",
    )


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[ServerService]:
    settings = Settings(host="127.0.0.1", server_port=0, data_dir=tmp_path / "data", ingest_token="s3cret")
    svc = ServerService(settings)
    await svc.start()
    yield svc
    await svc.stop()


async def test_ingest_sink_stores_through_the_server_with_route_ingest(server: ServerService) -> None:
    sink = IngestSink(f"http://127.0.0.1:{server.port}", "s3cret")
    await sink.start()
    records = [_record(i) for i in range(25)]
    await sink.send(records)
    await sink.close()
    await server.ingest.drained()  # the answer means durable on the server; stored right after
    for r in records:
        row = await server.store.get_request("default", r.id)
        assert row is not None and row["route"] == "ingest"
    stats = await server.store.stats("default", StatsQuery())
    assert stats["overall"]["count"] == 25


async def test_ingest_sink_wrong_token_or_dead_server_is_an_outage(server: ServerService) -> None:
    bad = IngestSink(f"http://127.0.0.1:{server.port}", "wrong")
    await bad.start()
    with pytest.raises(BackendUnavailable, match="401"):
        await bad.send([_record(1)])
    await bad.close()
    dead = IngestSink("http://127.0.0.1:1", "s3cret", timeout=2)
    await dead.start()
    with pytest.raises(BackendUnavailable, match="unreachable"):
        await dead.send([_record(1)])
    await dead.close()


async def test_spool_then_replay_into_a_real_queue_keeps_every_record_and_key(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    sink = SpoolSink(spool, partition_by="user_id")
    records = [_record(i, tenant="acme") for i in range(1200)]
    for i in range(0, 1200, 300):
        await sink.send(records[i : i + 300])
    await sink.close()
    assert spool.pending()

    q = SQLiteQueue(str(tmp_path / "queue.db"), partitions=4)
    await q.connect("both")
    try:
        replayer = SpoolReplayer(DiskSpool(tmp_path / "spool", max_bytes=50_000_000), q)
        assert await replayer.replay_once() == 1200
        assert not spool.pending()
        got: list[LogRecord] = []
        keys: dict[str, str] = {}
        while len(got) < 1200:
            ds = await q.consume(500, timeout=1)
            assert ds, "queue ran dry early"
            for d in ds:
                r = decode(d.value)
                got.append(r)
                keys[r.id] = d.key
            await q.ack(ds)
        assert sorted(r.id for r in got) == sorted(r.id for r in records)
        assert all(r.route == "spool" for r in got)
        assert all(keys[r.id] == r.user_id for r in got)  # partition key preserved
    finally:
        await q.close()


class _FlakyQueue(SQLiteQueue):
    fail_after: int | None = None
    published = 0

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        if self.fail_after is not None and self.published >= self.fail_after:
            raise BackendUnavailable("broker went away")
        await super().publish(messages)
        self.published += 1


async def test_replay_cut_short_by_an_outage_keeps_the_segment_and_loses_nothing(tmp_path: Path) -> None:
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    sink = SpoolSink(spool)
    records = [_record(i) for i in range(1100)]  # replays in chunks of REPLAY_CHUNK (100)
    await sink.send(records)
    await sink.close()
    q = _FlakyQueue(str(tmp_path / "queue.db"), partitions=2)
    await q.connect("both")
    try:
        q.fail_after = 1
        replayer = SpoolReplayer(spool, q)
        with pytest.raises(BackendUnavailable):
            await replayer.replay_once()
        assert spool.pending()  # the segment stays until every batch went through
        q.fail_after = None
        assert await replayer.replay_once() == 1100
        assert not spool.pending()
        ids: list[str] = []
        while True:
            ds = await q.consume(1000, timeout=0.5)
            if not ds:
                break
            ids += [decode(d.value).id for d in ds]
            await q.ack(ds)
        # at least once: the first batch twice, every record present
        assert set(ids) == {r.id for r in records}
        assert len(ids) == 1100 + REPLAY_CHUNK
    finally:
        await q.close()


class _SizeLimitedQueue(SQLiteQueue):
    """Refuses a batch holding a message over 64 KiB, as Kafka does (MessageSizeTooLarge)."""

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        if any(len(m.value) > 65536 for m in messages):
            raise ValueError("MessageSizeTooLargeError: the message is too large")
        await super().publish(messages)


class _BrokenDriverQueue(SQLiteQueue):
    """A driver that fails on what it reads back (redis-py 8.2's HELLO check on an echo)."""

    broken = True

    async def publish(self, messages):  # type: ignore[no-untyped-def]
        if self.broken:
            raise AttributeError("'list' object has no attribute 'get'")
        await super().publish(messages)


async def test_a_driver_failure_is_an_outage_for_the_spool_not_a_refusal(tmp_path: Path) -> None:
    """The packaging audit: with redis-py 8.2 an AttributeError from the driver was taken for the
    queue refusing each record: they went bare, then were dropped, and the segment deleted."""
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    sink = SpoolSink(spool, partition_by="user_id")
    records = [_record(i) for i in range(5)]
    await sink.send(records)
    await sink.close()
    q = _BrokenDriverQueue(str(tmp_path / "queue.db"), partitions=2)
    await q.connect("both")
    try:
        replayer = SpoolReplayer(spool, q)
        with pytest.raises(BackendUnavailable, match="the queue failed: AttributeError"):
            await replayer.replay_once()
        assert spool.pending() and replayer.dropped == 0
        q.broken = False
        assert await replayer.replay_once() == 5
        ds = await q.consume(100, timeout=0.5)
        assert {decode(d.value).id for d in ds} == {r.id for r in records}
        assert all(decode(d.value).error is None for d in ds)  # whole, not bare (with a reason)
    finally:
        await q.close()


async def test_one_bad_record_costs_the_spool_only_itself(tmp_path: Path) -> None:
    """Issue 7: a record with a header byte that was not UTF-8 could not be spooled (the whole
    batch failed), and a spooled record the queue refuses blocked its segment's replay forever."""
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    sink = SpoolSink(spool, partition_by="user_id")
    records = [_record(i) for i in range(20)]
    records[3].request_headers = {"x-odd": "caf\udcff"}
    records[4].user_id = "u\udcfe"  # also the partition key
    records[11].request_headers = {"x-huge": "z" * 100_000}
    await sink.send(records)
    await sink.close()
    q = _SizeLimitedQueue(str(tmp_path / "queue.db"), partitions=2)
    await q.connect("both")
    try:
        replayer = SpoolReplayer(spool, q)
        assert await replayer.replay_once() == 20
        assert not spool.pending() and replayer.dropped == 0
        got: dict[str, LogRecord] = {}
        while True:
            ds = await q.consume(1000, timeout=0.5)
            if not ds:
                break
            got.update((r.id, r) for r in (decode(d.value) for d in ds))
            await q.ack(ds)
        assert set(got) == {r.id for r in records}
        assert got[records[3].id].request_headers == {"x-odd": "caf\\xff"}
        assert got[records[4].id].user_id == "u\\xfe"
        bare = got[records[11].id]
        assert bare.request_headers == {} and bare.error and "MessageSizeTooLarge" in bare.error
    finally:
        await q.close()


async def test_a_spooled_record_the_queue_refuses_goes_whole_to_ingest_or_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The queue audit lowered Kafka's message.max.bytes: every spooled record was published
    bare at replay (bodies and headers gone for good, over a setting), though the ingest
    endpoint took them whole once back. Now the ingest endpoint takes it whole; while that is
    down the record waits on disk (for `WHOLE_WAIT`), and only then goes bare."""
    from llmtap.gateway import sinks as sinks_module

    async def spooled(name: str) -> tuple[DiskSpool, list[LogRecord]]:
        spool = DiskSpool(tmp_path / name, max_bytes=50_000_000)
        records = [_record(i) for i in range(5)]
        records[2].request_headers = {"x-huge": "z" * 100_000}  # past the queue's limit
        sink = SpoolSink(spool)
        await sink.send(records)
        await sink.close()
        return spool, records

    q = _SizeLimitedQueue(str(tmp_path / "queue.db"), partitions=2)
    await q.connect("both")
    ingest = ListSink("ingest")
    clock = [1000.0]
    # The module's own `time` (the event loop's clock stays the real one).
    monkeypatch.setattr(sinks_module, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    publishes = 0
    publish = q.publish

    async def counted(messages):  # type: ignore[no-untyped-def]
        nonlocal publishes
        publishes += 1
        await publish(messages)

    monkeypatch.setattr(q, "publish", counted)
    try:
        spool, records = await spooled("a")
        ingest.down = True
        replayer = SpoolReplayer(spool, q, whole=ingest)
        # The record that waits holds back neither the others nor the next tries: rev13 saw
        # the records before it published again at every try (2,035 messages for 300 records
        # in 80 s) and every record after it held back.
        assert await replayer.replay_once() == 4
        tried = publishes
        for _ in range(3):  # its own segment, left alone until `HELD_RETRY` (rev14: resent each second)
            assert await replayer.replay_once() == 0
        assert publishes == tried and spool.pending()  # it waits, on disk
        deliveries = await q.consume(1000, timeout=0.5)
        await q.ack(deliveries)
        published = sorted(decode(d.value).id for d in deliveries)
        assert published == sorted(r.id for i, r in enumerate(records) if i != 2)
        # Another gateway sharing the spool leaves it alone too (rev15: they rewrote each
        # other's every second): its age on disk says when it may be tried.
        assert await SpoolReplayer(spool, q, whole=ingest).replay_once() == 0 and publishes == tried
        clock[0] += sinks_module.HELD_RETRY
        assert await replayer.replay_once() == 0 and publishes > tried  # tried again: still down
        ingest.down = False
        clock[0] += sinks_module.HELD_RETRY
        assert await replayer.replay_once() == 1
        assert not spool.pending() and replayer.dropped == 0 and replayer.replayed == 5
        (whole,) = ingest.records
        assert whole.id == records[2].id and whole.request_headers == {"x-huge": "z" * 100_000}
        assert whole.error is None
        assert not await q.consume(1000, timeout=0.2)  # nothing published twice
        # Waited long enough: bare, as before, so one record never holds the spool for good.
        # The wait runs from the first refusal on the monotonic clock: rev13's segment, named
        # by a gateway whose clock was 30 days ahead, waited for days (its name's stamp).
        spool, records = await spooled("b")
        (seg,) = spool.segments_for_replay()
        ahead = time.time_ns() + 30 * 86400 * 10**9
        seg.rename(seg.with_name(f"{ahead:020d}-{seg.name.partition('-')[2]}"))
        ingest.down = True
        replayer = SpoolReplayer(spool, q, whole=ingest)
        assert await replayer.replay_once() == 4  # the others go; one waits
        clock[0] += sinks_module.WHOLE_WAIT - 1
        assert await replayer.replay_once() == 0 and spool.pending()
        clock[0] += sinks_module.HELD_RETRY  # its next try, past the wait
        assert await replayer.replay_once() == 1 and not spool.pending()
        bare = [decode(d.value) for d in await q.consume(1000, timeout=0.5)]
        bare = [r for r in bare if r.id == records[2].id and r.request_headers == {}]
        assert bare and bare[0].error and "MessageSizeTooLarge" in bare[0].error
        # A spool more than half full: the waiting record's old segment, deleted right after,
        # leaves it the room (rev14: refused as "spool full" and published at once).
        spool, records = await spooled("c")
        (seg,) = spool.segments_for_replay()
        spool.max_bytes = seg.stat().st_size + 1000
        replayer = SpoolReplayer(spool, q, whole=ingest)
        assert await replayer.replay_once() == 4 and spool.pending() and replayer.dropped == 0
    finally:
        await q.close()


async def test_a_record_too_large_for_the_queue_is_replayed_with_its_bodies_in_the_body_store(
    tmp_path: Path,
) -> None:
    """SQS takes 256 KiB a message; a record with three inline bodies of up to the inline limit
    (64 KiB each, more in base64) is larger. With the ingest endpoint down it went to the spool,
    and the replay published it bare: no user, no properties, no bodies, no tokens, no cost.
    Now its bodies go to the body store and the record goes whole; while the body store is
    down it waits on disk."""
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    records = [_record(i) for i in range(3)]
    big = records[1]
    big.properties = {"feature": "chat"}
    noise = [os.urandom(30_000) for _ in range(3)]  # incompressible: zstd cannot save it
    big.request_body = inline_body(noise[0], size=30_000, truncated=False, content_type=None, limit=65536)
    big.response_body = inline_body(noise[1], size=30_000, truncated=False, content_type=None, limit=65536)
    big.response_events = inline_body(noise[2], size=30_000, truncated=False, content_type=None, limit=65536)
    await SpoolSink(spool).send(records)
    q = _SizeLimitedQueue(str(tmp_path / "queue.db"), partitions=2)
    await q.connect("both")
    bodies = DirBodyStore(tmp_path / "bodies")
    await bodies.connect()
    ingest = ListSink("ingest")
    ingest.down = True  # the way it takes does not wait for ingest (rev14: held for 10 minutes)
    try:
        bodies.down = True
        with pytest.raises(BackendUnavailable):  # no ingest sink: the segment waits as it is
            await SpoolReplayer(spool, q, bodies=bodies).replay_once()
        replayer = SpoolReplayer(spool, q, bodies=bodies, whole=ingest)
        assert await replayer.replay_once() == 2  # the others go; it waits, whole
        assert spool.pending() and replayer.dropped == 0
        bodies.down = False
        for held in spool.segments_for_replay():  # its retry is due (`HELD_RETRY` since it was held)
            os.utime(held, (time.time() - 60, time.time() - 60))
        replayer = SpoolReplayer(spool, q, bodies=bodies, whole=ingest)
        assert await replayer.replay_once() == 1
        assert not spool.pending() and replayer.dropped == 0 and bodies.puts == 3
        assert not ingest.records
        got: dict[str, LogRecord] = {}
        while ds := await q.consume(1000, timeout=0.5):
            got.update((r.id, r) for r in (decode(d.value) for d in ds))
            await q.ack(ds)
        assert set(got) == {r.id for r in records}
        whole = got[big.id]
        assert whole.error is None and whole.properties == {"feature": "chat"} and whole.user_id == "u1"
        assert whole.usage.completion_tokens == 1
        for part, data in zip(("request_body", "response_body", "response_events"), noise, strict=True):
            body = getattr(whole, part)
            assert body.data is None and body.ref is not None
            stored = await bodies.get(body.ref)
            assert stored is not None
            assert (decompress(stored) if body.encoding == "zstd" else stored) == data, part
    finally:
        await q.close()


class _LoopBodyStore(DirBodyStore):
    """Records the event loop each write ran on (a real S3 client is bound to one loop)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.loops: list[asyncio.AbstractEventLoop] = []

    async def put_many(self, items: Sequence[tuple[str, bytes]]) -> list[str]:
        self.loops.append(asyncio.get_running_loop())
        return await super().put_many(items)


@pytest.mark.parametrize("threaded", [False, True], ids=["same-loop", "replay-thread"])
async def test_spooled_bodies_above_the_inline_limit_go_to_the_body_store_before_the_queue(
    tmp_path: Path, threaded: bool
) -> None:
    """Issue 9: a record spooled with a body above the inline limit (the body store was down) is
    replayed only once its body is in the body store, with a reference in its message; while
    the body store is still down its segment stays as it is and nothing is published."""
    limit = 4096
    spool = DiskSpool(tmp_path / "spool", max_bytes=50_000_000)
    records = [_record(i) for i in range(10)]
    big_bytes = os.urandom(300_000)  # incompressible: zstd keeps it ~300 KB
    records[4].request_body = inline_body(
        big_bytes, size=len(big_bytes), truncated=False, content_type="application/octet-stream", limit=limit
    )
    records[7].response_body = inline_body(
        b'{"ok": true}', size=12, truncated=False, content_type=None, limit=limit
    )
    assert not offload.fits(records[4], limit) and offload.fits(records[7], limit)
    sink = SpoolSink(spool)
    await sink.send(records)
    await sink.close()
    path = str(tmp_path / "queue.db")
    q = SQLiteQueue(path, partitions=2)
    await q.connect("both")
    bodies = _LoopBodyStore(tmp_path / "bodies")
    bodies.down = True
    factory = (lambda: SQLiteQueue(path, partitions=2)) if threaded else None
    replayer = SpoolReplayer(spool, q, bodies=bodies, inline_limit=limit, queue_factory=factory)
    try:
        with pytest.raises(BackendUnavailable):
            await replayer.replay_once()
        assert spool.pending() and (await q.status()).lag == 0  # nothing published twice later
        bodies.down = False
        assert await replayer.replay_once() == 10
        assert not spool.pending() and replayer.bodies_stored == 1
        assert set(bodies.loops) == {asyncio.get_running_loop()}  # the caller's loop, thread or not
        got: dict[str, LogRecord] = {}
        sizes: list[int] = []
        while True:
            ds = await q.consume(1000, timeout=0.5)
            if not ds:
                break
            sizes += [len(d.value) for d in ds]
            got.update((r.id, r) for r in (decode(d.value) for d in ds))
            await q.ack(ds)
    finally:
        await replayer.stop()
        await q.close()
    assert set(got) == {r.id for r in records} and len(sizes) == 10
    assert max(sizes) < 4 * limit  # the big body is no longer inline
    big = got[records[4].id].request_body
    assert big is not None and big.data is None and big.ref is not None and big.size == len(big_bytes)
    stored = await bodies.get(big.ref)
    assert stored is not None and decompress(stored) == big_bytes
    small = got[records[7].id].response_body
    assert small is not None and small.data == b'{"ok": true}' and small.ref is None  # small stays inline
